"""A quantised frozen base: QLoRA's NF4 (optionally with double-quantised scales) and int8, dequantised per layer.

The seed fine-tuned a 4-bit NF4 base (bitsandbytes ``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``, bf16 compute,
double quantisation commented out). Here a quantised kernel is a :class:`QuantKernel` pytree that sits at the tree
path of the kernel it replaces (``base["layers"]["q"]["kernel"]`` ...), so every function that takes the base
takes a quantised one unchanged. :class:`jaxpoison.models.decoder.Linear` finds it and dequantises it to the
compute dtype; since ``Linear`` runs inside the layer scan, only one layer's kernels are ever dequantised at a
time (and the training step's remat policy recomputes them in the backward pass instead of saving them). LoRA
stays on top as before: ``x @ deq(W) + s * x @ A @ B``.

Which weights: the linear layers of the decoder layers (q, k, v, o, gate, up, down), as QLoRA and bitsandbytes
quantise ``nn.Linear`` modules; the embedding, the norms, the biases and the lm_head stay in the base's float dtype
(bitsandbytes also leaves ``lm_head`` unquantised, and the embedding is a gather, not a matmul).

Formats (``in`` = the kernel's input dim, ``out`` its output dim; leaves keep the kernel's leading dims):

* ``nf4``: the 16-level NormalFloat code book of QLoRA (Dettmers et al. 2023, section 3; quantiles of N(0, 1)
  with an exact zero, normalised to [-1, 1]), blocks of 64 consecutive weights of one output channel along ``in``
  (the HF ``[out, in]`` weight in row-major order, which is what bitsandbytes blocks), absmax per block. A weight
  goes to the code whose value is nearest ``w / absmax`` (ties to the lower code, as bitsandbytes' CPU path).
  ``codes`` uint8 [..., in_pad / 2, out] (element 2j in the high nibble, 2j + 1 in the low one, bitsandbytes'
  packing), ``scale`` fp32 [..., in_pad / 64, out]; ``in`` is padded with zeros to a multiple of 64.
* ``nf4-dq``: QLoRA's double quantisation: the absmax scales minus their mean (``offset``, fp32 per layer) are
  quantised with bitsandbytes' 8-bit dynamic code map in blocks of 256 (in bitsandbytes' order, the scales of
  one output channel after another), each block with an fp32 absmax (``scale2``); ``scale`` is then uint8.
* ``int8``: absmax int8 per output channel (``codes`` int8 [..., in, out], ``scale`` fp32 [..., 1, out]), the
  row-wise weight format of LLM.int8 / bitsandbytes ``Int8Params``. Per channel rather than blockwise because
  8 bits already bound the error to absmax / 254 (1/7 of NF4's relative step), the scale factors out of the matmul
  (``(x @ q) * s``, so an int8 matmul can use it later) and it costs 1 + 4 / in bytes per weight.

Bytes per weight (codes + scales): nf4 0.5 + 4/64 = 0.5625; nf4-dq 0.5 + 1/64 + 4/(64*256) = 0.5159;
int8 1 + 4/in (1.001 for in = 4096); bf16 2. See :func:`bytes_per_param`.

Quantising is a function of the loaded base (:func:`quantize_base`), applied kernel by kernel and, within a stacked
``[L, in, out]`` kernel, layer by layer, so the fp32 temporaries are one layer's weights at a time.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

QUANT_KINDS = ("none", "int8", "nf4", "nf4-dq")
NF4_BLOCK = 64          # weights per absmax (QLoRA, bitsandbytes' default blocksize for 4-bit)
DQ_BLOCK = 256          # absmax scales per second-level scale (QLoRA's double quantisation)
QUANTIZED_MODULES = ("q", "k", "v", "o", "gate", "up", "down")

# QLoRA's NF4 code book: bitsandbytes.functional.get_4bit_type("nf4"), i.e. create_normal_map(0.9677083) --
# 8 positive and 7 negative quantiles of N(0, 1) at equal probability steps from offset = 1 - (1/30 + 1/32) / 2
# to 1/2, plus an exact 0, divided by the largest. tests/models/test_quant.py rebuilds it from scipy's normal quantiles.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# decision bounds: a normalised weight x gets code i with bound[i-1] < x <= bound[i] (fp32 midpoints)
NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code map (``functional.create_dynamic_map``, Dettmers 2015): a dynamic
    exponent with a shrinking linear fraction, 256 values in [-1, 1], sorted. Used for the double-quantised
    absmax scales."""
    data = []
    non_sign = total_bits - 1
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign - max_exponent_bits) + 1)
        b = _linspace32(0.1, 1, n)
        means = (b[:-1] + b[1:]) / np.float32(2)
        data += (np.float32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (np.float32(-(10 ** (-(max_exponent_bits - 1) + i))) * means).tolist()
    if extra > 0:
        b = _linspace32(0.1, 1, extra + 1)
        means = (b[:-1] + b[1:]) / np.float32(2)
        data += (np.float32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (np.float32(-(10 ** (-(max_exponent_bits - 1) + i))) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.asarray(data, np.float32))


def _linspace32(start, end, steps):
    """``torch.linspace(start, end, steps, dtype=float32)`` as torch's vectorised CPU kernel computes it: an fp32
    step, ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the second, each a fused
    multiply-add (one rounding; the fp64 product of two fp32 numbers is exact)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = (np.float64(start) + step * i).astype(np.float32)
    hi = (np.float64(end) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, lo, hi)


DYNAMIC_CODE = dynamic_map()


class QuantError(ValueError):
    """An unknown quantisation kind, or a tree that cannot be quantised as asked."""


def parse_quant(kind: str) -> str:
    """The kind itself, or a clear error naming the allowed values."""
    if kind not in QUANT_KINDS:
        raise QuantError(f"quant={kind!r} is not a known quantisation: use one of {', '.join(QUANT_KINDS)} "
                         "('nf4' = QLoRA's 4-bit NormalFloat, 'nf4-dq' = with double-quantised scales, "
                         "'int8' = absmax int8 per output channel, 'none' = the float base)")
    return kind


@struct.dataclass
class QuantKernel:
    """A quantised ``[..., in, out]`` kernel; see the module docstring for the leaves of each ``kind``."""
    codes: Array
    scale: Array
    scale2: Optional[Array] = None
    offset: Optional[Array] = None
    kind: str = struct.field(pytree_node=False, default="nf4")
    in_features: int = struct.field(pytree_node=False, default=0)

    @property
    def shape(self) -> tuple:
        """The shape of the kernel it stands for (leading dims of the leaves, then in, out)."""
        return tuple(self.codes.shape[:-2]) + (self.in_features, self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantKernel)


def bytes_per_param(kind: str, in_features: int = 4096, out_features: int = 4096) -> float:
    """Stored bytes per weight of a decoder-layer kernel in format ``kind`` ('none': bf16 = 2)."""
    kind = parse_quant(kind)
    if kind == "none":
        return 2.0
    if kind == "int8":
        return 1.0 + 4.0 / in_features
    nb = -(-in_features // NF4_BLOCK)
    n = nb * NF4_BLOCK * out_features
    if kind == "nf4":
        return (n / 2 + 4 * nb * out_features) / (in_features * out_features)
    n2 = -(-nb * out_features // DQ_BLOCK)
    return (n / 2 + nb * out_features + 4 * n2 + 4) / (in_features * out_features)


# ---- quantise ------------------------------------------------------------------------------------------------------
@jax.jit
def _nf4_layer(w: Array):
    """[in, out] -> (codes uint8 [in_pad/2, out], absmax fp32 [in_pad/64, out]); bitsandbytes' arithmetic:
    ``clip(w * (1 / absmax), -1, 1)`` bucketed at the fp32 code midpoints. (bitsandbytes clamps absmax to 1e-38, a
    subnormal that XLA flushes to zero, so a zero block is handled explicitly.)"""
    i, o = w.shape
    nb = -(-i // NF4_BLOCK)
    w = jnp.pad(w.astype(jnp.float32), ((0, nb * NF4_BLOCK - i), (0, 0))).reshape(nb, NF4_BLOCK, o)
    absmax = jnp.abs(w).max(axis=1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)    # an all-zero block: codes of 0
    x = jnp.clip(w * inv[:, None, :], -1.0, 1.0)
    q = jnp.searchsorted(jnp.asarray(NF4_BOUNDS), x, side="left").astype(jnp.uint8).reshape(nb * NF4_BLOCK // 2, 2, o)
    return (q[:, 0] << 4) | q[:, 1], absmax


@jax.jit
def _dq_layer(absmax: Array, offset: Array):
    """Double quantisation of one layer's absmax [nb, out] (bitsandbytes ``quantize_4bit(compress_statistics=True)``):
    ``absmax - offset`` (offset = their mean, :func:`_mean`) in blocks of 256 of the channel-major order, each value
    divided by its block's absmax and sent to the nearest code of the dynamic map, ties to the lower code, with the
    map's first value read as -1 (bitsandbytes' CPU ``quantize_cpu``: binary search, then the nearer neighbour)."""
    nb, o = absmax.shape
    flat = (absmax - offset).T.reshape(-1)
    n2 = -(-flat.size // DQ_BLOCK)
    blocks = jnp.pad(flat, (0, n2 * DQ_BLOCK - flat.size)).reshape(n2, DQ_BLOCK)
    a2 = jnp.abs(blocks).max(axis=1)
    x = jnp.where(a2[:, None] > 0, blocks / jnp.where(a2 > 0, a2, 1.0)[:, None], 0.0)
    code = jnp.asarray(DYNAMIC_CODE).at[0].set(-1.0)
    left = jnp.clip(jnp.searchsorted(code, x, side="right") - 1, 0, DYNAMIC_CODE.size - 2)
    nearer_right = jnp.abs(x - code[left + 1]) < jnp.abs(x - code[left])
    q = (left + nearer_right).astype(jnp.uint8)
    return q.reshape(-1)[:flat.size].reshape(o, nb).T, a2, offset


@jax.jit
def _int8_layer(w: Array):
    """[in, out] -> (codes int8 [in, out], absmax fp32 [1, out]): round(127 w / absmax) per output channel."""
    w = w.astype(jnp.float32)
    absmax = jnp.abs(w).max(axis=0, keepdims=True)
    q = jnp.round(w * jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), absmax


def _mean(x) -> Array:
    """fp32 mean accumulated in fp64 on the host (one layer's scales, 1/64 of its weights): the correctly rounded
    mean, which is what torch's cascade sum gives bitsandbytes; an fp32 XLA reduction can be an ulp off."""
    return jnp.float32(np.asarray(x, np.float64).mean())


def quantize_kernel(w, kind: str, double: bool = False) -> QuantKernel:
    """Quantise a ``[..., in, out]`` kernel (numpy or jax), one ``[in, out]`` slice at a time. ``kind`` 'nf4' with
    ``double`` is the same as 'nf4-dq'."""
    kind = parse_quant(kind)
    if kind == "nf4-dq":
        kind, double = "nf4", True
    if kind == "none":
        raise QuantError("quantize_kernel: kind 'none' leaves a kernel as it is; do not call it")
    if double and kind != "nf4":
        raise QuantError(f"double quantisation is defined for nf4 scales only, not {kind!r}")
    if getattr(w, "ndim", 0) < 2:
        raise QuantError(f"a kernel is [..., in, out]; got shape {getattr(w, 'shape', None)}")
    lead, (i, o) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    if isinstance(w, jax.ShapeDtypeStruct):
        return abstract_kernel(w.shape, "nf4-dq" if double else kind)
    flat = w.reshape((-1, i, o)) if lead else w[None]
    fn = _int8_layer if kind == "int8" else _nf4_layer
    # a kernel over several devices: one layer's program (its collectives, where ``in`` is split across blocks)
    # at a time; XLA:CPU's devices deadlock with several collective programs in flight
    sync = isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer) and len(w.sharding.device_set) > 1
    parts = []
    for n in range(flat.shape[0]):
        parts.append(fn(jnp.asarray(flat[n])))
        if sync:
            jax.block_until_ready(parts[-1])
    codes = jnp.stack([p[0] for p in parts])
    scale = jnp.stack([p[1] for p in parts])
    scale2 = offset = None
    if double:
        dq = [_dq_layer(s, _mean(s)) for s in scale]
        scale = jnp.stack([d[0] for d in dq])
        scale2 = jnp.stack([d[1] for d in dq])
        offset = jnp.stack([d[2] for d in dq])
    shape_back = lambda x: None if x is None else x.reshape(lead + x.shape[1:]) if lead else x[0]
    q = QuantKernel(shape_back(codes), shape_back(scale), shape_back(scale2), shape_back(offset),
                    kind="nf4-dq" if double else kind, in_features=i)
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        q = jax.tree.map(lambda x: jax.block_until_ready(jax.device_put(x, like_kernel(sharding, x.shape))), q)
    return q


def like_kernel(sharding: "jax.sharding.NamedSharding", shape: tuple) -> "jax.sharding.NamedSharding":
    """The kernel's sharding for one of its quantised leaves: its partition spec cut to the leaf's ndim, without
    the mesh axes that do not divide the leaf's dim (a scale of 1 row, a small second-level scale)."""
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * len(shape)

    def fits(axes, dim):
        axes = axes if isinstance(axes, tuple) else (axes,)
        return dim % int(np.prod([mesh.shape[a] for a in axes])) == 0

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        *[a if a is None or fits(a, d) else None for a, d in zip(spec, shape)]))


def kernel_transform(kind: str):
    """``transform(path, array)`` for :func:`jaxpoison.models.lm.load_model`: quantises each decoder-layer kernel
    as soon as it is placed (so the float kernel of one module, not the whole float base, is the peak), and
    leaves every other array as it is."""
    kind = parse_quant(kind)

    def transform(path: tuple, x):
        if kind != "none" and len(path) == 3 and path[0] == "layers" and path[1] in QUANTIZED_MODULES \
                and path[2] == "kernel":
            return quantize_kernel(x, kind)
        return x

    return transform


def abstract_kernel(shape: tuple, kind: str) -> QuantKernel:
    """The :class:`QuantKernel` of a ``shape`` = [..., in, out] kernel with ``jax.ShapeDtypeStruct`` leaves (the
    planner compiles against it without weights); :func:`quantize_kernel` returns it for an abstract kernel."""
    kind = parse_quant(kind)
    *lead, i, o = shape
    lead, sds = tuple(lead), jax.ShapeDtypeStruct
    if kind == "int8":
        return QuantKernel(sds(lead + (i, o), jnp.int8), sds(lead + (1, o), jnp.float32), kind=kind, in_features=i)
    nb = -(-i // NF4_BLOCK)
    codes = sds(lead + (nb * NF4_BLOCK // 2, o), jnp.uint8)
    if kind == "nf4":
        return QuantKernel(codes, sds(lead + (nb, o), jnp.float32), kind=kind, in_features=i)
    n2 = -(-nb * o // DQ_BLOCK)
    return QuantKernel(codes, sds(lead + (nb, o), jnp.uint8), sds(lead + (n2,), jnp.float32),
                       sds(lead, jnp.float32), kind=kind, in_features=i)


def quantize_base(base: dict, kind: str, double: bool = False) -> dict:
    """The base tree with the kernels of the decoder layers' linear modules quantised (``kind`` 'none': the tree
    unchanged). Everything else (embedding, norms, biases, lm_head) is the same object as before. An abstract base
    (``jax.ShapeDtypeStruct`` leaves) gets abstract quantised kernels (:func:`abstract_kernel`)."""
    kind = parse_quant(kind)
    if kind == "none" and not double:
        return base
    if kind == "none":
        raise QuantError("double quantisation needs quant='nf4'")
    if "layers" not in base:
        raise QuantError("quantize_base expects the decoder's base tree ({'embed', 'layers', 'final_norm', ...})")
    layers = dict(base["layers"])
    for m in QUANTIZED_MODULES:
        if m in layers and "kernel" in layers[m]:
            w = layers[m]["kernel"]
            if is_quantized(w):
                raise QuantError(f"layers/{m}/kernel is already quantised ({w.kind}); load the float base again")
            layers[m] = {**layers[m], "kernel": quantize_kernel(w, kind, double)}
    return {**base, "layers": layers}


def base_quant(base: dict) -> str:
    """The quantisation of a base tree: 'none' or the kind of its quantised kernels."""
    kinds = {x.kind for x in jax.tree.leaves(base.get("layers", {}), is_leaf=is_quantized) if is_quantized(x)}
    return kinds.pop() if len(kinds) == 1 else "none" if not kinds else "mixed"


# ---- dequantise ----------------------------------------------------------------------------------------------------
def _dq_absmax(q: QuantKernel) -> Array:
    """The fp32 absmax [..., nb, out] of a double-quantised kernel (bitsandbytes: code[q] * absmax2 + offset)."""
    s = q.scale
    nb, o = s.shape[-2:]
    flat = jnp.swapaxes(s, -1, -2).reshape(s.shape[:-2] + (nb * o,))
    n2 = q.scale2.shape[-1]
    pad = n2 * DQ_BLOCK - nb * o
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
    vals = jnp.asarray(DYNAMIC_CODE)[flat.astype(jnp.int32)].reshape(flat.shape[:-1] + (n2, DQ_BLOCK))
    # op by op this is bitsandbytes' arithmetic bit for bit; inside a jit XLA:CPU contracts the multiply and the add
    # below into one FMA (no barrier or bitcast stops it), which can move the scale by 1 ulp (tests/models/test_quant.py)
    vals = (vals * q.scale2[..., None]).reshape(flat.shape)[..., :nb * o]
    return jnp.swapaxes(vals.reshape(s.shape[:-2] + (o, nb)), -1, -2) + q.offset[..., None, None]


def dequantize(q: QuantKernel, dtype=jnp.float32) -> Array:
    """The ``[..., in, out]`` kernel in ``dtype`` (the products are formed in fp32, as bitsandbytes does)."""
    if q.kind == "int8":     # bitsandbytes' int8_vectorwise_dequant: codes * absmax * fp32(1/127)
        return (q.codes.astype(jnp.float32) * q.scale * np.float32(1 / 127)).astype(dtype)
    if q.kind not in ("nf4", "nf4-dq"):
        raise QuantError(f"unknown QuantKernel kind {q.kind!r}")
    absmax = _dq_absmax(q) if q.kind == "nf4-dq" else q.scale
    c = q.codes
    lead, (p, o) = c.shape[:-2], c.shape[-2:]
    idx = jnp.stack([c >> 4, c & 15], axis=-2).reshape(lead + (2 * p, o)).astype(jnp.int32)
    vals = jnp.asarray(NF4_CODE)[idx]
    nb = absmax.shape[-2]
    w = (vals.reshape(lead + (nb, NF4_BLOCK, o)) * absmax[..., :, None, :]).reshape(lead + (nb * NF4_BLOCK, o))
    return w[..., :q.in_features, :].astype(dtype)


def kernel_value(kernel, dtype) -> Array:
    """A kernel leaf of the base in the compute dtype, dequantising a :class:`QuantKernel`."""
    return dequantize(kernel, dtype) if is_quantized(kernel) else kernel.astype(dtype)
