"""Torch-free weight I/O for HF checkpoints: safetensors -> numpy -> the layout of :mod:`.config`.

A model is a local directory (``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` with
shards) or a hub id, which ``huggingface_hub`` resolves into such a directory (only where the hub is
reachable: an offline machine gets an error that says so and what to do instead).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable, Optional

import numpy as np

from .config import ModelConfig, from_hf_config

_LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "self_attn.q_proj.weight": ("q", "kernel"), "self_attn.q_proj.bias": ("q", "bias"),
    "self_attn.k_proj.weight": ("k", "kernel"), "self_attn.k_proj.bias": ("k", "bias"),
    "self_attn.v_proj.weight": ("v", "kernel"), "self_attn.v_proj.bias": ("v", "bias"),
    "self_attn.o_proj.weight": ("o", "kernel"),
    "self_attn.q_norm.weight": ("q_norm", "scale"), "self_attn.k_norm.weight": ("k_norm", "scale"),
    "mlp.gate_proj.weight": ("gate", "kernel"), "mlp.up_proj.weight": ("up", "kernel"),
    "mlp.down_proj.weight": ("down", "kernel"),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class WeightsError(ValueError):
    """A checkpoint that cannot be read as the model its config describes."""


def expected_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the HF tensors (HF [out, in] orientation) that a config implies, per layer-free name."""
    D, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    s = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (cfg.q_dim, D), "self_attn.k_proj.weight": (cfg.kv_dim, D),
        "self_attn.v_proj.weight": (cfg.kv_dim, D), "self_attn.o_proj.weight": (D, cfg.q_dim),
        "mlp.gate_proj.weight": (cfg.intermediate_size, D), "mlp.up_proj.weight": (cfg.intermediate_size, D),
        "mlp.down_proj.weight": (D, cfg.intermediate_size),
    }
    if cfg.qkv_bias:
        s.update({"self_attn.q_proj.bias": (cfg.q_dim,), "self_attn.k_proj.bias": (cfg.kv_dim,),
                  "self_attn.v_proj.bias": (cfg.kv_dim,)})
    if cfg.qk_norm:
        s.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    top = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (V, D)
    return {"layer": s, "top": top}


def resolve_model_dir(spec: str) -> pathlib.Path:
    """A local HF directory as is; otherwise a hub id resolved by ``huggingface_hub`` (config + weights only)."""
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"--model {spec!r} is a file, not a directory: give a HF model directory "
                                "(config.json + *.safetensors), a hub id, or 'smollm2-135m'")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        raise FileNotFoundError(
            f"--model {spec!r} is neither a directory nor a known name: give 'smollm2-135m' (embedded), a local "
            "HF model directory (config.json + model.safetensors), or a hub id such as 'Qwen/Qwen3-4B-Base'")
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(
            spec, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                                  "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json",
                                  "chat_template*"]))
    except Exception as e:  # offline, unknown repo, gated repo ...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise FileNotFoundError(
            f"could not fetch hub model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            + ("HF_HUB_OFFLINE is set. " if offline else "")
            + "Without hub access, download it elsewhere (`huggingface-cli download " + spec + "`) and pass the "
            "local directory, or use the embedded default `--model smollm2-135m`.") from None


def safetensors_files(d: pathlib.Path) -> list[pathlib.Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: the index names shard file(s) that are missing: {', '.join(missing)}; "
                                    "re-download the model (all shards) into this directory")
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    if list(d.glob("*.bin")) or list(d.glob("*.pth")):
        raise FileNotFoundError(f"{d} has only PyTorch pickle weights (*.bin): jaxpoison reads safetensors only; "
                                "convert with `transformers` (save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_hf_config(d: pathlib.Path, name: str = "") -> ModelConfig:
    f = d / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{d} has no config.json: not a HF model directory")
    return from_hf_config(json.loads(f.read_text()), name=name or d.name)


def load_hf_params(d: pathlib.Path, cfg: ModelConfig, dtype=np.float32,
                   place: Optional[Callable[[tuple, np.ndarray], object]] = None) -> dict:
    """Read safetensors into the stacked layout, checking every shape against the config.

    ``place(path, array)`` (optional) puts each finished array where it belongs (e.g. ``jax.device_put`` with a
    sharding) as soon as it is complete, so host memory holds one stacked tensor at a time beyond the model.
    """
    from safetensors import safe_open

    shapes = expected_shapes(cfg)
    L = cfg.num_layers
    layers: dict = {}
    top: dict = {}
    seen_layers: dict = {}
    for f in safetensors_files(d):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                m = _LAYER_RE.match(key)
                if m:
                    i, rest = int(m.group(1)), m.group(2)
                    if rest not in shapes["layer"] or i >= L:
                        continue  # e.g. rotary inv_freq buffers of old checkpoints
                    arr = st.get_tensor(key)
                    want = shapes["layer"][rest]
                    if tuple(arr.shape) != want:
                        raise WeightsError(f"{f.name}: tensor {key} has shape {tuple(arr.shape)} but config.json "
                                           f"implies {want}: the weights do not belong to this config")
                    mod, leaf = _LAYER_MAP[rest]
                    if leaf == "kernel":
                        arr = arr.T
                    buf = layers.setdefault(mod, {}).setdefault(leaf, np.empty((L,) + arr.shape, dtype))
                    buf[i] = arr.astype(dtype)
                    seen_layers.setdefault(rest, set()).add(i)
                elif key in shapes["top"]:
                    arr = st.get_tensor(key)
                    if tuple(arr.shape) != shapes["top"][key]:
                        raise WeightsError(f"{f.name}: tensor {key} has shape {tuple(arr.shape)} but config.json "
                                           f"implies {shapes['top'][key]}: the weights do not belong to this config")
                    top[key] = arr.astype(dtype)
    missing = [f"model.layers.{{{','.join(map(str, sorted(set(range(L)) - seen_layers.get(k, set()))))}}}.{k}"
               for k in shapes["layer"] if seen_layers.get(k, set()) != set(range(L))]
    missing += [k for k in shapes["top"] if k not in top]
    if missing:
        raise WeightsError(f"{d}: tensors missing from the safetensors files: {'; '.join(missing[:6])}"
                           + (" ..." if len(missing) > 6 else ""))
    params = {
        "embed": {"embedding": top["model.embed_tokens.weight"]},
        "layers": layers,
        "final_norm": {"scale": top["model.norm.weight"]},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": top["lm_head.weight"].T.copy()}
    if place is not None:
        params = _place_tree(params, place)
    return params


def _place_tree(tree, place, path=()):
    if isinstance(tree, dict):
        return {k: _place_tree(v, place, path + (k,)) for k, v in tree.items()}
    return place(path, tree)


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict:
    """The inverse of :func:`load_hf_params` (numpy, HF names and orientation); used by tests and export."""
    inv = {v: k for k, v in _LAYER_MAP.items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    for mod, leaves in params["layers"].items():
        for leaf, arr in leaves.items():
            arr = np.asarray(arr)
            for i in range(cfg.num_layers):
                a = arr[i].T if leaf == "kernel" else arr[i]
                out[f"model.layers.{i}.{inv[(mod, leaf)]}"] = np.ascontiguousarray(a)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return out
