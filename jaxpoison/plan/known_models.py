"""A model's shapes without its weights: a local directory's ``config.json``, the HF cache's copy of a hub id's
``config.json``, or, since the planner never downloads, a small table of the presets' models.

The table holds the fields of each hub repo's ``config.json`` that shape a program (transcribed from the repos'
published ``config.json`` files; the checkpoint's own file wins whenever it is present locally). Parameter counts
they imply (``ModelConfig.matmul_params`` + norms) match the model cards: Qwen3-4B 4.02 B, Llama-2-7B 6.74 B,
Llama-3-8B 8.03 B, Qwen2-7B 7.62 B. Tokenizer ids are left out: no program shape depends on them.
"""
from __future__ import annotations

import json
import os
import pathlib

from jaxpoison.models.config import ModelConfig, from_hf_config

_QWEN3_4B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
             "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 32768,
             "tie_word_embeddings": True}
_LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
_QWEN2_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False}

KNOWN_CONFIGS = {
    "Qwen/Qwen3-4B-Base": _QWEN3_4B, "Qwen/Qwen3-4B": _QWEN3_4B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B, "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B, "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "Qwen/Qwen2-7B": _QWEN2_7B, "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
}


def _hub_cache_config(spec: str):
    """The newest snapshot's config.json of a hub id in the local HF cache (no network), or None."""
    root = pathlib.Path(os.environ.get("HF_HUB_CACHE") or pathlib.Path(
        os.environ.get("HF_HOME", pathlib.Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = root / f"models--{spec.replace('/', '--')}" / "snapshots"
    found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
    return found[-1] if found else None


def model_config(spec: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, where its numbers came from) for a ``--model`` spec, reading no weights."""
    if spec == "smollm2-135m":
        from jaxpoison.models.gguf import GGUFFile, find_embedded_gguf, gguf_config
        return gguf_config(GGUFFile(find_embedded_gguf())), "the embedded GGUF's header"
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        f = p / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"{p} has no config.json: the planner needs the model's config.json only")
        return from_hf_config(json.loads(f.read_text()), name=spec), str(f)
    f = _hub_cache_config(spec)
    if f is not None:
        return from_hf_config(json.loads(f.read_text()), name=spec), str(f)
    if spec in KNOWN_CONFIGS:
        return from_hf_config(KNOWN_CONFIGS[spec], name=spec), "jaxpoison's table of known configs"
    raise FileNotFoundError(f"no config.json for model {spec!r}: give a local directory with its config.json, put "
                            f"the hub repo in the HF cache (config.json alone is enough), or use one of the known "
                            f"models: {', '.join(KNOWN_CONFIGS)}")
