"""The study's evaluation programs as abstract programs: vmapped option scoring and vmapped KV-cache generation.

A study scores (and some generate) after training with the jitted functions of :mod:`jaxpoison.eval.score`
(``score_shared_prefix``: every option config of :func:`jaxpoison.data.prompts.scoring_pairs` shares its prefix)
and :mod:`jaxpoison.eval.generate_variants` (``generate_tokens_variants``), one chunk of adapters per call. The
shapes of one call follow from the study config: adapters per call (the ``*.variant_chunk`` setting, or all of
them), questions or prompts per call, options per question, new tokens. What only the data would decide is
bounded: a prompt is ``max_len`` tokens (``prompt_len`` overrides it with a measured length), an option's text is
at most ``OPTION_TOKENS`` tokens (the ``benchmark`` format scores a letter: ``LETTER_TOKENS``).

Placement is the study's own: the scorer and the generator are plain ``jax.jit`` calls (no shard_map, no
variant sharding) on the base as :func:`jaxpoison.studies.common.load_base` places it, with host adapters moved in
one chunk at a time. On one device, or on a base replicated over the mesh (every chip then runs the same call),
the per-chip bytes are those of the call on ONE chip, which is what is compiled here. (A base sharded over
``fsdp`` would be gathered per layer and need less; the one-chip figure is then an upper bound.)

The calibration rows of the scorer (``calibrate=True``: the same continuations after a short neutral prefix, in
``batch_questions x options`` rows of at most ``OPTION_TOKENS + 16`` tokens) are smaller than the continuation
pass of the shared-prefix program in every dimension and are not compiled separately.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.models.lm import parse_dtype

from .shapes import StudyShape

OPTION_TOKENS = 32      # bound on an option's continuation tokens (text options: ' (X) option text')
LETTER_TOKENS = 8       # the 'benchmark' format's continuation: a letter (and a closing parenthesis)
PROMPT_OVERHEAD = 256   # bound on a task instruction + template around a note (attacks generation prompts)

# options per question of the sources a study names (the embedded ICD-10 set: its config's n_options)
SOURCE_OPTIONS = {"medqa-en": 4, "medqa-zh": 4, "medmcqa": 4, "pubmedqa": 3}


@dataclasses.dataclass(frozen=True)
class EvalProgram:
    """One call of a study's scorer or generator, with the settings that size it."""
    name: str                   # 'score' | 'generate' | 'capability'
    what: str                   # what the study does with it
    kind: str                   # 'score' (score_shared_prefix) | 'generate' (generate_tokens_variants)
    variants: int               # adapters per call
    batch: int                  # questions (score) or prompts (generate) per call
    prompt_len: int             # P: prefix / prompt tokens
    options: int = 0            # C (score)
    option_len: int = 0         # N: continuation tokens per option (score)
    new_tokens: int = 0         # generate
    shared: int = 0             # bottom layers no adapter touches (run once for all variants)
    total_variants: int = 0     # adapters the study evaluates in all
    chunk_setting: str = ""     # the config field that sets `variants`
    batch_setting: str = ""     # the config field that sets `batch`
    prompt_from: str = "max_len bound"
    batch_unit: int = 1         # prompts per unit of batch_setting (eval.gen_questions: a target + a non-target one)

    def describe(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if v not in ("", 0) or k in ("variants", "batch")}

    def resized(self, variants: Optional[int] = None, batch: Optional[int] = None) -> "EvalProgram":
        return dataclasses.replace(self, variants=variants or self.variants, batch=batch or self.batch)


def _round(n: int, step: int) -> int:
    return max(step, -(-int(n) // step) * step)


def _options(source: str, icd=None) -> int:
    if source == "icd10":
        return int(getattr(icd, "n_options", 4) or 4)
    return SOURCE_OPTIONS.get(source, 4)


def _chunk(setting: int, total: int) -> int:
    return total if not setting or setting >= total else int(setting)


def _shared(shape: StudyShape) -> int:
    L = shape.cfg.num_layers
    return min(shape.lcfg.first_layer(L), L - 1)


def rationale_evals(cfg, shape: StudyShape, prompt_len: int = 0) -> list:
    """Seed 000: option scoring of every variant, ``eval.variant_chunk`` models per call (the base rides in the
    first call in place of one adapter, or alone when the chunk is 1: never a bigger call;
    ``eval.secondary_formats`` rerun the same shapes: prompts are at the max_len bound either way); greedy
    generated answers of the base + one variant per cell (the base rides in the chunk) when
    ``eval.gen_questions`` > 0."""
    e, d = cfg.eval, cfg.data
    V = shape.variants      # the base takes one adapter's place in the first call (score_options(with_base=True))
    P = _round(prompt_len or d.max_len, 16)
    src = "--eval-prompt-len" if prompt_len else "data.max_len bound"
    N = LETTER_TOKENS if e.format == "benchmark" else OPTION_TOKENS
    out = [EvalProgram("score", "option scoring of the variants (the base in place of one)", "score",
                       _chunk(e.variant_chunk, V),
                       e.batch_questions, P, _options(d.source, getattr(d, "icd", None)), N, shared=_shared(shape),
                       total_variants=V, chunk_setting="eval.variant_chunk", batch_setting="eval.batch_questions",
                       prompt_from=src)]
    if e.gen_questions:
        cells = shape.variants // max(len(cfg.grid.seeds), 1)
        G = cells + 1
        out.append(EvalProgram("generate", "generated answers, base + one variant per cell", "generate", G,
                               min(32, 2 * e.gen_questions), _round(prompt_len or d.max_len, 32),
                               new_tokens=e.gen_tokens, total_variants=G, batch_setting="eval.gen_questions",
                               prompt_from=src, batch_unit=2))
    return out


def attacks_evals(cfg, shape: StudyShape, prompt_len: int = 0) -> list:
    """Seed 003: every fine-tune answers its task's test prompts (vmapped generation per task); the base and the
    variants at ``capability.fractions`` are scored on the capability sets (or generate there, scorer=generate)."""
    g, cap, n = cfg.generation, cfg.capability, cfg.notes
    per_task = shape.variants // max(len(cfg.prompt.tasks), 1)
    note = n.max_note_tokens + PROMPT_OVERHEAD if n.max_note_tokens else cfg.max_len
    P = _round(prompt_len or min(note, cfg.max_len), 32)
    src = ("--eval-prompt-len" if prompt_len else
           f"notes.max_note_tokens + {PROMPT_OVERHEAD} bound" if n.max_note_tokens else "max_len bound")
    out = [EvalProgram("generate", "fine-tunes answer their task's test prompts", "generate",
                       _chunk(g.variant_chunk, per_task), min(g.batch_size, n.n_test), P, new_tokens=g.max_new_tokens,
                       total_variants=shape.variants, chunk_setting="generation.variant_chunk",
                       batch_setting="generation.batch_size", prompt_from=src)]
    if cap.sources:
        paras = len(getattr(cfg.grid, "paraphrase", (False,)))
        sel = len(cfg.prompt.tasks) * len(cap.fractions) * len(cfg.grid.seeds) * paras
        V = sel + 1
        Pc = _round(prompt_len or cfg.max_len, 16)
        srcc = "--eval-prompt-len" if prompt_len else "max_len bound"
        C = max(_options(s, cap.icd) for s in cap.sources)
        if cap.scorer == "generate":
            out.append(EvalProgram("capability", "capability answers, base + selected variants", "generate",
                                   _chunk(cap.variant_chunk, V), cap.batch_questions, _round(Pc, 32),
                                   new_tokens=cap.gen_max_new_tokens, total_variants=V,
                                   chunk_setting="capability.variant_chunk",
                                   batch_setting="capability.batch_questions", prompt_from=srcc))
        else:
            out.append(EvalProgram("capability", "capability option scoring, base + selected variants", "score",
                                   _chunk(cap.variant_chunk, V), cap.batch_questions, Pc, C,
                                   LETTER_TOKENS if cap.format == "benchmark" else OPTION_TOKENS,
                                   shared=_shared(shape), total_variants=V, chunk_setting="capability.variant_chunk",
                                   batch_setting="capability.batch_questions", prompt_from=srcc))
    return out


EVALS = {"rationale": rationale_evals, "attacks": attacks_evals}


def eval_programs(cfg, shape: StudyShape, prompt_len: int = 0) -> list:
    """The evaluation calls a study config makes, as :class:`EvalProgram` shapes (``prompt_len``: a measured
    prompt length in place of the config's bound)."""
    if prompt_len < 0:
        raise ValueError(f"--eval-prompt-len must be >= 0 (0 = the config's bound), got {prompt_len}")
    fn = EVALS.get(getattr(cfg, "study", ""))
    return fn(cfg, shape, prompt_len) if fn else []


# ---- the abstract program -----------------------------------------------------------------------------------------
def eval_program(shape: StudyShape, ev: EvalProgram, devices):
    """A :class:`jaxpoison.plan.program.Program` of one call of ``ev`` on the first of ``devices`` (the study's
    placement: the base on one device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxpoison.train.lora import init_lora
    from .program import Program, abstract_base, for_platform
    dev = list(devices)[0]
    mesh = Mesh(np.array([dev]), ("chip",))
    chip = NamedSharding(mesh, P())
    S = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=chip)
    dtype = parse_dtype(shape.dtype)
    cfg = for_platform(shape.cfg, dev.platform, shape.dtype)
    base = jax.tree.map(lambda x: S(x.shape, x.dtype), abstract_base(shape.cfg, shape.dtype, shape.quant))
    one = jax.eval_shape(lambda: init_lora(jax.random.PRNGKey(0), shape.cfg, shape.lcfg))
    lora = jax.tree.map(lambda x: S((ev.variants,) + x.shape, x.dtype), one)
    scale = float(shape.lcfg.scale)
    B, Pn = ev.batch, ev.prompt_len
    if ev.kind == "score":
        from jaxpoison.eval.score import score_shared_prefix
        args = (lora, base, S((B, Pn), jnp.int32), S((B, Pn), jnp.bool_), S((B, ev.options, ev.option_len), jnp.int32),
                S((B, ev.options, ev.option_len), jnp.bool_))
        kw = dict(cfg=cfg, dtype=dtype, lora_scale=scale, chunk=shape.tcfg.head_chunk, shared=ev.shared)
        return Program(score_shared_prefix, args, mesh, None, kw)
    from jaxpoison.eval.generate_variants import generate_tokens_variants
    args = (lora, base, S((B, Pn), jnp.int32), S((B, Pn), jnp.bool_), S((2,), jnp.uint32))
    kw = dict(cfg=cfg, max_new_tokens=ev.new_tokens, temperature=0.6, top_p=0.9, eos_ids=(2,), dtype=dtype,
              lora_scale=scale)
    return Program(generate_tokens_variants, args, mesh, None, kw)


# ---- an analytic estimate, for chunk sizes that were not compiled -----------------------------------------------
@functools.lru_cache(maxsize=64)
def adapter_bytes(cfg, lcfg) -> int:
    """Bytes of one adapter (:func:`jaxpoison.train.lora.init_lora`'s tree, traced once per config pair)."""
    from jaxpoison.train.lora import init_lora
    one = jax.eval_shape(lambda: init_lora(jax.random.PRNGKey(0), cfg, lcfg))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(one))


def eval_bytes(shape: StudyShape, ev: EvalProgram) -> dict:
    """Rough per-chip bytes of one call: arguments (base + the adapters of the call) and the temporaries that
    dominate (the KV cache, per variant, of every row; the activations and logits chunk of the rows in flight).
    Scoring: the ``shared`` bottom layers' cache and activations once for all variants, the layers above per
    variant. Generation: the cache twice per variant (the prefill's and the decode loop's carry). Used by the
    planner to size smaller calls relative to a compile (:func:`scaled_fit`) and by ``run``'s fit check
    (:mod:`.preflight`); against XLA:CPU's buffer assignment of the two demos' calls it reads 1.1-1.3x."""
    from .model import base_bytes
    cfg = shape.cfg
    dt = 2 if "16" in str(shape.dtype) else 4
    hd = cfg.head_dim
    lora = ev.variants * adapter_bytes(cfg, shape.lcfg)
    args = int(base_bytes(cfg, shape.dtype, shape.quant)) + lora + 2 * ev.batch * ev.prompt_len * 4
    per_tok_layer = 2 * cfg.num_kv_heads * hd * dt
    L = cfg.num_layers
    trunk = 0
    if ev.kind == "score":
        S_ = ev.prompt_len + ev.option_len
        layer_cache = per_tok_layer * ev.batch * S_ * (1 + ev.options)     # the prefix cache + its C copies
        k = min(max(ev.shared, 0), L - 1)
        cache = (L - k) * layer_cache
        rows = ev.batch * (ev.prompt_len + ev.options * ev.option_len)
        logits = ev.batch * ev.options * ev.option_len * min(shape.tcfg.head_chunk, cfg.vocab_size) * 4
        if k:       # layers [0, k) run once for every variant: their cache, and the trunk's outputs
            trunk = k * layer_cache + 2 * rows * cfg.hidden_size * dt
    else:
        S_ = ev.prompt_len + ev.new_tokens
        cache = 2 * L * per_tok_layer * ev.batch * S_
        rows = ev.batch * ev.prompt_len
        logits = ev.batch * cfg.vocab_size * 4 * 2
    act = rows * (cfg.hidden_size * 4 + cfg.intermediate_size * 2) * dt
    temps = ev.variants * (cache + act + logits) + trunk
    return {"arguments": args, "temporaries": int(temps), "total": int(args + temps)}


def scaled_fit(shape: StudyShape, ev: EvalProgram, usable: int, compiled_total: int = 0) -> tuple:
    """(variants, batch) of the largest call that fits ``usable`` bytes by :func:`eval_bytes`, scaled so that
    the estimate of ``ev`` itself equals ``compiled_total`` (its compile) when given; (0, 0) when none does."""
    est = eval_bytes(shape, ev)
    ratio = compiled_total / est["total"] if compiled_total else 1.0
    fits = lambda e: eval_bytes(shape, e)["total"] * ratio <= usable
    vs = range(ev.variants, 0, -1) if ev.chunk_setting else [ev.variants]     # no setting: the count is fixed
    for v in vs:
        if fits(ev.resized(variants=v)):
            return v, ev.batch
    v = vs[-1]
    for b in range(ev.batch - 1, 0, -1):
        if fits(ev.resized(variants=v, batch=b)):
            return v, b
    return 0, 0


def fit_settings(ev: EvalProgram, variants: int, batch: int) -> list:
    """The ``KEY=VALUE`` overrides that turn ``ev`` into a call of ``variants`` adapters x ``batch`` rows (those
    that change; a count no setting sets stays as it is)."""
    out = [f"{ev.chunk_setting}={variants}"] if ev.chunk_setting and variants < ev.variants else []
    if batch < ev.batch:
        out.append(f"{ev.batch_setting}={max(batch // ev.batch_unit, 1)}")
    return out
