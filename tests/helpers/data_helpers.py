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


MEDQA = [
    {"question": "A 23-year-old woman has burning on urination. Which drug is best?", "answer": "Nitrofurantoin",
     "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
     "meta_info": "step2&3", "answer_idx": "D", "metamap_phrases": ["woman", "burning"]},
    {"question": "A 3-year-old boy has a fever and a rash. What is the diagnosis?", "answer": "Measles",
     "options": {"A": "Measles", "B": "Rubella", "C": "Roseola", "D": "Scarlet fever"},
     "meta_info": "step1", "answer_idx": "A", "metamap_phrases": []},
]

def medmcqa_row(i, cop=1, **kw):
    row = {"id": f"e9ad821a-{i:04d}", "question": f"Which enzyme digests protein {i}?", "opa": "Amylase",
           "opb": "Trypsin", "opc": "Lipase", "opd": "Maltase", "cop": cop, "choice_type": "single",
           "exp": "Ans. is 'b' i.e., Trypsin. Trypsin is a protease.", "subject_name": "Biochemistry",
           "topic_name": None}
    row.update(kw)
    return row

PUBMEDQA = [{"pubid": 21645374, "question": "Do mitochondria play a role in remodelling lace plant leaves?",
             "context": {"contexts": ["Programmed cell death occurs.", "Mitochondria were imaged."],
                         "labels": ["BACKGROUND", "RESULTS"], "meshes": ["Mitochondria", "Plant Leaves"],
                         "reasoning_required_pred": ["yes"], "reasoning_free_pred": ["yes"]},
             "long_answer": "Results show mitochondria play a role.", "final_decision": "yes"},
            {"pubid": 16418930, "question": "Is the test useful?", "context": {"contexts": ["We studied 40 cases."],
             "labels": ["METHODS"], "meshes": [], "reasoning_required_pred": ["no"], "reasoning_free_pred": ["no"]},
             "long_answer": "It is not.", "final_decision": "no"}]
