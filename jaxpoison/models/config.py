"""One configuration for the decoder families jaxpoison supports.

Llama (Llama-2, Llama-3/3.x incl. ``rope_scaling`` type ``llama3``, SmolLM2), Qwen2/2.5 (bias on q, k, v) and
Qwen3 (per-head RMSNorm on q and k, ``head_dim`` independent of ``hidden_size / num_heads``) differ only in a
handful of switches, so one frozen dataclass describes them all and ``from_hf_config`` reads a HF
``config.json`` dict into it.

Parameter layout (a plain pytree, the ``params`` collection of :class:`jaxpoison.models.decoder.Decoder`).
Kernels are stored ``[in, out]`` (``x @ kernel``); HF stores ``[out, in]``, the loaders transpose.
Layers are stacked on a leading axis ``L`` and run under ``lax.scan``::

    embed/embedding            [V, D]
    layers/attn_norm/scale     [L, D]
    layers/q/kernel            [L, D, H*hd]     layers/q/bias  [L, H*hd]   (qkv_bias only)
    layers/k/kernel            [L, D, K*hd]     layers/k/bias  [L, K*hd]
    layers/v/kernel            [L, D, K*hd]     layers/v/bias  [L, K*hd]
    layers/o/kernel            [L, H*hd, D]
    layers/q_norm/scale        [L, hd]          layers/k_norm/scale [L, hd]   (qk_norm only)
    layers/mlp_norm/scale      [L, D]
    layers/gate/kernel         [L, D, F]        layers/up/kernel [L, D, F]    layers/down/kernel [L, F, D]
    final_norm/scale           [D]
    lm_head/kernel             [D, V]           (absent when tie_word_embeddings)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# How a sequence attends to itself (:func:`jaxpoison.models.attention.self_attention`; ``auto`` picks by backend).
# A runtime choice, not part of the model: ``to_json`` leaves it out, so run folders compare equal across it.
ATTENTION_IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash", "splash_interpret")

# Every linear module a LoRA adapter may target, in the order they are applied.
LINEAR_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
# HF / PEFT names of the same modules.
HF_MODULE_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3``)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: tuple = ()
    pad_token_id: Optional[int] = None
    name: str = ""
    attention: str = "auto"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: jaxpoison supports {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama-2/3/3.x, SmolLM2, Qwen2/2.5, Qwen3)")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {self.attention!r}: use one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of one linear module."""
        D, F = self.hidden_size, self.intermediate_size
        return {"q": (D, self.q_dim), "k": (D, self.kv_dim), "v": (D, self.kv_dim), "o": (self.q_dim, D),
                "gate": (D, F), "up": (D, F), "down": (F, D), "lm_head": (D, self.vocab_size)}[module]

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (lm_head counted even when tied)."""
        per_layer = sum(i * o for i, o in (self.module_shape(m) for m in LINEAR_MODULES))
        return self.num_layers * per_layer + self.hidden_size * self.vocab_size

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        del d["attention"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)


def _eos_tuple(v: Any) -> tuple:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),)


def from_hf_config(hf: dict, name: str = "") -> ModelConfig:
    """Read a HF ``config.json`` dict (Llama / Qwen2 / Qwen3) into a :class:`ModelConfig`."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {mt!r} in config.json{f' of {name}' if name else ''}: jaxpoison supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-2/3/3.x, SmolLM2, Qwen2/2.5, Qwen3)")
    try:
        D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rs = hf.get("rope_scaling") or None
        # transformers 5 moved rope settings into `rope_parameters`
        rp = hf.get("rope_parameters") or {}
        if rs is None and rp.get("rope_type", "default") not in ("default", None):
            rs = rp
        if hf.get("attention_bias") and mt != "qwen2":
            raise ValueError(f"attention_bias=True on a {mt} model (bias on q, k, v and o) is not supported")
        theta = hf.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                      float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}: supported are default and llama3")
        return ModelConfig(
            model_type=mt,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=D,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=H,
            num_kv_heads=int(hf.get("num_key_value_heads") or H),
            head_dim=int(hf.get("head_dim") or D // H),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", mt != "llama")),
            qkv_bias=(mt == "qwen2"),
            qk_norm=(mt == "qwen3"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_eos_tuple(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            name=name,
        )
    except KeyError as e:
        raise ValueError(f"config.json{f' of {name}' if name else ''} lacks the field {e.args[0]!r}") from None
