"""Shared helpers for the data tests (no tests here): a small real tokenizer built offline, file writers."""
import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Question: Which ICD-10-CM chapter does the condition 'Acute myocardial infarction' belong to?",
    "Reasoning: a disorder of the heart and blood vessels. Such conditions are classified in the chapter",
    "Answer: (A) (B) (C) (D) Diseases of the circulatory system, respiratory system, digestive system",
    "### USER: \n You are a medical assistant ### Assistant: \n Patient: 67-year-old man. Fever 发热 发烧",
    "The condition is classified in the chapter 'Neoplasms' 'Symptoms and abnormal findings'",
]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(with_bos: bool = False):
    """A byte-level BPE trained in memory, wrapped as a HF fast tokenizer (eos '<|im_end|>', no pad token).

    ``with_bos`` adds a '<s>' prefix the way Llama tokenizers do under ``add_special_tokens=True``.
    """
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<s>")
    tok.chat_template = CHAT
    return tok


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, rows):
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)
