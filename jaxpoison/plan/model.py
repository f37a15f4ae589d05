"""Analytic FLOPs and memory of a study's train step: what ``cost_analysis`` cannot count and what a GPU plan
rests on.

FLOPs. ``cost_analysis`` counts a loop body once, and the decoder's layers are a ``lax.scan``, so XLA's figure
for a 36-layer model is about one layer's worth. The count here is the step's matmuls, layer by layer, as the
engine runs them: the base is frozen, so its backward pass is the input gradient only (one matmul per forward
matmul, no weight gradient); LoRA's backward is twice its forward (:func:`jaxpoison.models.decoder.lora_delta`);
causal attention computes only the blocks under the diagonal (two matmuls forward, five backward:
:mod:`jaxpoison.models.attention`); full remat runs each layer's forward again; the head computes logits and the
stored gradient in the forward pass (two matmuls) and multiplies in the backward; layers below
``lora.layers_from`` run forward only. Element-wise work is left out (a few percent; the test bounds it).

Memory (per chip). Arguments: the base and the per-variant state, as sharded. Temporaries: per variant on the
chip, the activations the backward pass keeps per layer (full remat: the layer input; otherwise
``decoder.SAVED_ACTIVATIONS``) plus one layer's working set in the backward pass, the attention mask and bias, the
head's logits chunk, and the adapter's gradient and update buffers. Checked against XLA's TPU compile of the same
program by a test (tolerance stated there); the planner uses it for GPUs, where no compile is possible here, and
to search chunk sizes before confirming one by compile.
"""
from __future__ import annotations

import dataclasses

from jaxpoison.models.config import LINEAR_MODULES, ModelConfig

from .shapes import StudyShape

_BYTES = {"float32": 4, "bfloat16": 2, "fp32": 4, "bf16": 2}


def attention_pairs(T: int, impl: str = "blocked", block: int = 64, max_blocks: int = 16) -> int:
    """(query, key) pairs an attention implementation computes for a length-T causal sequence: ``blocked``
    (:func:`jaxpoison.models.attention.causal_attention`) and ``splash`` skip the blocks above the diagonal,
    ``xla`` computes all T^2 and masks, ``cudnn`` is taken as causal in blocks of 128."""
    if impl in ("splash", "splash_interpret", "cudnn"):
        Tp = -(-T // 128) * 128
        blk = 128 if impl == "cudnn" else next(b for b in (512, 256, 128) if Tp % b == 0)
        nb = Tp // blk
        return blk * blk * nb * (nb + 1) // 2
    if impl == "xla":
        return T * T
    block = max(block, -(-T // max_blocks))
    if T <= block:
        return T * T
    return sum((min(T, t0 + block) - t0) * min(T, t0 + block) for t0 in range(0, T, block))


# matmuls of the attention backward per forward pair: blocked 5 (scores again, dv, dp, dq, dk), splash 7 (its dq
# and dkv kernels each recompute the scores), jax.nn.dot_product_attention's autodiff 4
_ATTN_BWD = {"blocked": 5, "splash": 7, "splash_interpret": 7, "cudnn": 5, "xla": 4}


def _layer_matmul_params(cfg: ModelConfig) -> int:
    return sum(i * o for i, o in (cfg.module_shape(m) for m in LINEAR_MODULES))


def _lora_params_per_token(cfg: ModelConfig, lcfg) -> tuple[int, int]:
    """(per layer, head) of r * (in + out) over the adapter's target modules."""
    layer = sum(lcfg.r * sum(cfg.module_shape(m)) for m in lcfg.targets if m != "lm_head")
    head = lcfg.r * sum(cfg.module_shape("lm_head")) if "lm_head" in lcfg.targets else 0
    return layer, head


def head_positions(shape: StudyShape) -> int:
    """Positions per row the head runs on: the loss budget, else T - 1 padded to the head's chunk."""
    t = shape.tcfg
    if t.loss_budget:
        return t.loss_budget
    P = shape.seq_len - 1
    return -(-P // t.head_chunk) * t.head_chunk


def step_flops(shape: StudyShape, impl: str = "blocked") -> float:
    """FLOPs of one optimiser update of one variant (grad_accum micro-batches of batch_size rows), as executed
    (remat's recompute included) with the attention implementation ``impl``."""
    cfg, t, lcfg = shape.cfg, shape.tcfg, shape.lcfg
    B, T, L = t.batch_size, shape.seq_len, cfg.num_layers
    k = lcfg.first_layer(L)
    N = B * T
    base = 2 * N * _layer_matmul_params(cfg)
    lora_layer, lora_head = _lora_params_per_token(cfg, lcfg)
    lora = 2 * N * lora_layer
    pairs = attention_pairs(T, impl)
    block = max(64, -(-T // 16))
    bwd_mm = 4 if impl == "blocked" and T <= block else _ATTN_BWD.get(impl, 5)
    attn_f = 4 * B * cfg.num_heads * cfg.head_dim * pairs
    attn_b = 2 * bwd_mm * B * cfg.num_heads * cfg.head_dim * pairs
    fwd = base + lora + attn_f
    bwd = base + 2 * lora + attn_b
    recompute = fwd if t.remat else 0
    # the lowest trained layer's input needs no gradient: q, k, v pass none back (their LoRA neither)
    D = cfg.hidden_size
    qkv_dx = 2 * N * (D * cfg.q_dim + 2 * D * cfg.kv_dim) + 2 * N * lcfg.r * D * sum(
        1 for m in ("q", "k", "v") if m in lcfg.targets)
    trained = (L - k) * (fwd + bwd + recompute) - qkv_dx
    lower = 0 if (k and t.trunk_cache) else k * (base + attn_f)
    P = head_positions(shape)
    head = 4 * B * P * cfg.hidden_size * cfg.vocab_size + 6 * B * P * lora_head
    return float(t.grad_accum * (trained + lower + head))


def study_flops(shape: StudyShape, chunk: int, grouped: bool = True, impl: str = "blocked") -> tuple[float, int]:
    """(FLOPs of the whole study's training, variant-steps computed) with ``chunk`` variants per chunk."""
    from .shapes import chunk_steps
    vsteps = sum(s * chunk for s in chunk_steps(shape.steps, chunk, grouped))
    return step_flops(shape, impl) * vsteps, vsteps


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Analytic per-chip bytes of a chunk's train step."""
    base: int
    state: int
    pool: int
    activations: int
    working: int
    head: int
    update: int

    @property
    def arguments(self) -> int:
        return self.base + self.state + self.pool

    @property
    def temporaries(self) -> int:
        return self.activations + self.working + self.head + self.update

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries


def lora_param_count(cfg: ModelConfig, lcfg) -> int:
    n = 0
    for m in lcfg.targets:
        i, o = cfg.module_shape(m)
        n += (1 if m == "lm_head" else cfg.num_layers) * lcfg.r * (i + o)
    return n


def base_bytes(cfg: ModelConfig, dtype: str, quant: str = "") -> int:
    """Bytes of the base weights. Quantised bases (:mod:`jaxpoison.models.quant`) store the decoder layers' matmul
    kernels in QUANT_BITS bits per weight (codes + scales); embedding, lm_head, norms and biases stay float."""
    D = cfg.hidden_size
    norms = cfg.num_layers * (2 * D + (2 * cfg.head_dim if cfg.qk_norm else 0)) + D
    bias = cfg.num_layers * (cfg.q_dim + 2 * cfg.kv_dim) if cfg.qkv_bias else 0
    mat = cfg.num_layers * _layer_matmul_params(cfg)
    emb = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2)
    b = _BYTES[dtype]
    q = QUANT_BITS.get(quant or "none")
    if q is None:
        raise ValueError(f"unknown quant {quant!r}: use one of {', '.join(QUANT_BITS)}")
    mat_bytes = mat * b if q == 0 else int(mat * q / 8)
    return mat_bytes + (emb + norms + bias) * b


# bits per matmul weight, scales included (helper-C's layout: nf4 codes + fp32 absmax per 64; nf4-dq: uint8
# absmax + fp32 per 256 blocks; int8: per output channel)
QUANT_BITS = {"none": 0, "": 0, "int8": 8.0, "nf4": 8 * 0.5625, "nf4-dq": 8 * 0.5159}


def memory_model(shape: StudyShape, mc, chunk: int) -> MemoryModel:
    """Per-chip bytes of one chunk's train step on a mesh ``mc`` (variant, data, model[, fsdp])."""
    cfg, t = shape.cfg, shape.tcfg
    b = _BYTES[t.dtype]
    fsdp = getattr(mc, "fsdp", 1)
    base = base_bytes(cfg, shape.dtype, shape.quant) // (mc.model * fsdp)
    Vc = -(-chunk // mc.variant)
    lp = lora_param_count(cfg, shape.lcfg)
    state = Vc * lp * 4 * 3 + chunk * 64             # f32 adapter + Adam mu, nu; small per-variant scalars
    R, T, M = shape.pool_rows, shape.seq_len, shape.max_rows
    pool = R * T * 9 + chunk * M * 4
    Bc = max(t.batch_size // mc.data, 1)
    D, F = cfg.hidden_size, cfg.intermediate_size // mc.model
    q, kv, H = cfg.q_dim // mc.model, cfg.kv_dim // mc.model, max(cfg.num_heads // mc.model, 1)
    L = cfg.num_layers - shape.lcfg.first_layer(cfg.num_layers)
    if t.remat:
        saved = Bc * T * D * b
    else:
        saved = Bc * T * (2 * q + 2 * kv + 2 * D + 2 * F) * b + Bc * T * H * 4
    block = max(64, -(-T // 16))
    scores = Bc * H * min(block, T) * T * 4
    layer_ws = Bc * T * (4 * D + 3 * q + 4 * kv + 4 * F) * b + 3 * scores
    masks = Bc * T * T * 5 + Bc * T * cfg.head_dim * 8
    activations = Vc * L * saved
    working = Vc * (layer_ws + masks)
    hc = t.head_chunk
    head = Vc * (3 * Bc * min(hc, T) * cfg.vocab_size * 4 + Bc * head_positions(shape) * D * 4)
    update = Vc * lp * 4 * 3
    return MemoryModel(base, state, pool, activations, working, head, update)
