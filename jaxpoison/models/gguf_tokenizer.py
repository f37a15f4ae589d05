"""Rebuild a HF fast tokenizer from the ``tokenizer.ggml.*`` metadata of a GGUF file (no hub, no tokenizer.json).

SmolLM2's GGUF stores a GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the vocabulary in
byte-level alphabet (``Ġ`` for space), the merges as ``"a b"`` strings, a type per token (3 = control, i.e.
special) and the chat template. ``tokenizer.ggml.pre`` names the pre-tokenizer; for ``smollm`` llama.cpp splits
every digit on its own and then applies the GPT-2 regex, which is what SmolLM2's own ``tokenizer.json`` does
(``Digits(individual_digits=True)`` + ``ByteLevel(add_prefix_space=False)``), so encodings match the HF tokenizer.
"""
from __future__ import annotations

import pathlib

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split is "each digit alone, then the GPT-2 regex"
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_ONLY = {"gpt2", "default", "mpt", "olmo", "jais"}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def tokenizer_from_gguf(path):
    """A ``transformers.PreTrainedTokenizerFast`` equal to the model's HF tokenizer, built from GGUF metadata.

    Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` ...) are registered as special added
    tokens so they encode as single ids wherever they appear; ``chat_template`` comes from the file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .gguf import read_gguf

    path = pathlib.Path(path)
    meta = read_gguf(path).get
    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r}; only GPT-2-style byte-level BPE ('gpt2') GGUF "
                         "tokenizers can be rebuilt")
    tokens = list(meta("tokenizer.ggml.tokens"))
    types = list(meta("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens contains duplicates")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_ONLY:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"{path}: unknown tokenizer.ggml.pre={pre!r}; encodings would not match the model's own "
                         "tokenizer")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def special(key):
        i = meta(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    if meta("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    ctx = meta(f"{meta('general.architecture', 'llama')}.context_length")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        model_max_length=int(ctx) if ctx else int(1e30),
    )
    template = meta("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf
