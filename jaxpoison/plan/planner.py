"""The plan of one study on one target: memory per chip, FLOPs, study time, the largest chunk that fits, and
what to change when it does not fit. :func:`make_plan` returns a plain dict (the ``--json`` line)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from .model import memory_model, step_flops, study_flops
from .program import Compiled, compile_program, mesh_config, train_program
from .shapes import StudyShape, chunk_steps
from .targets import GiB, Target, abstract_devices

GPU_NOTE = ("GPU figures are the analytic memory model: the CUDA plugin compiles only with a GPU attached, so "
            "no XLA compile backs them; the model is checked against XLA:TPU compiles of the same program")


def _mesh_dict(mc) -> dict:
    return {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc)}


def chunk_candidates(V: int, n: int) -> list:
    """Chunk sizes worth trying, largest first: the whole study, then the fewest chunks of near-equal size
    (rounded up to a multiple of the chip count, so every chip holds the same number of variants)."""
    out = []
    for k in range(1, V + 1):
        c = -(-V // k)
        if c > n:
            c = -(-c // n) * n
        c = min(c, V)
        if c not in out:
            out.append(c)
    return out


def analytic_fit(shape: StudyShape, target: Target, chunk: int) -> tuple[int, Optional[object]]:
    """(analytic per-chip bytes, mesh) of a chunk, or (-1, None) when no mesh can hold it."""
    try:
        mc = mesh_config(shape, target.chips, chunk, target.usable_bytes)
    except ValueError:
        return -1, None
    return memory_model(shape, mc, chunk).total, mc


def largest_fitting_chunk(shape: StudyShape, target: Target) -> int:
    """The largest chunk the analytic model fits in the target's usable memory (0: not even one variant)."""
    for c in chunk_candidates(shape.variants, target.chips):
        b, mc = analytic_fit(shape, target, c)
        if mc is not None and 0 <= b <= target.usable_bytes:
            return c
    return 0


def compile_chunk(shape: StudyShape, target: Target, chunk: int, devices=None) -> Compiled:
    devices = devices if devices is not None else abstract_devices(target)
    return compile_program(train_program(shape, devices, chunk, hbm_bytes=target.usable_bytes))


def kernel_fallback(shape: StudyShape, target: Target, chunk: int, devices=None) -> tuple:
    """(Compiled, shape, note): the compile with the target's attention kernel, or, when that kernel cannot be
    lowered for this mesh, with the portable blocked kernel and a note saying so."""
    try:
        return compile_chunk(shape, target, chunk, devices), shape, ""
    except NotImplementedError as e:
        if "Mosaic" not in str(e):
            raise
        s2 = dataclasses.replace(shape, cfg=dataclasses.replace(shape.cfg, attention="blocked"))
        note = (f"the {attention_impl(shape, target)} attention kernel does not lower on this mesh "
                f"({str(e).splitlines()[0][:120]}); figures use attention=blocked")
        return compile_chunk(s2, target, chunk, devices), s2, note


def _suggest(shape: StudyShape, target: Target, best_chunk: int) -> list:
    """Settings that make the study fit (analytic, chunk confirmed by compile where the caller did so)."""
    out = []
    if best_chunk and best_chunk < shape.chunk:
        out.append(f"--set train.variant_chunk={best_chunk}")
    if best_chunk:
        return out
    alt = []
    from jaxpoison.train.mesh import MeshConfig
    for f in (d for d in range(2, target.chips + 1) if target.chips % d == 0):     # the fewest fsdp shards
        mesh = dataclasses.replace(shape.mesh if isinstance(shape.mesh, MeshConfig) else MeshConfig(), fsdp=f)
        s = dataclasses.replace(shape, mesh=mesh)
        c = largest_fitting_chunk(s, target)
        if c:
            out.append(f"--set mesh.fsdp={f} --set train.variant_chunk={c}")
            break
    if not shape.tcfg.remat:
        alt.append(("--set train.remat=true", dataclasses.replace(shape, tcfg=dataclasses.replace(shape.tcfg, remat=True))))
    if shape.tcfg.batch_size > 1:
        b = max(shape.tcfg.batch_size // 2, 1)
        g = shape.tcfg.grad_accum * (shape.tcfg.batch_size // b)
        alt.append((f"--set train.batch_size={b} --set train.grad_accum={g}",
                    dataclasses.replace(shape, tcfg=dataclasses.replace(shape.tcfg, batch_size=b, grad_accum=g))))
    if not shape.quant:
        alt.append(("--set quant=nf4", dataclasses.replace(shape, quant="nf4")))
    for flag, s in alt:
        c = largest_fitting_chunk(s, target)
        if c:
            out.append(f"{flag} --set train.variant_chunk={c}")
    if target.platform == "tpu":
        from .targets import tpu_target
        kind = target.chip.name
        for n in (4, 8, 16, 32, 64):
            if n <= target.chips:
                continue
            try:
                t2 = tpu_target(f"{kind}-{n * (2 if kind in ('v4', 'v5p') else 1)}")
            except ValueError:
                continue
            c = largest_fitting_chunk(shape, t2)
            if c:
                out.append(f"--topology {t2.topology} --set train.variant_chunk={c}")
                break
        for kind in ("v5p", "v6e", "v4"):
            if kind == target.chip.name:
                continue
            t2 = tpu_target(f"{kind}-{target.chips * (2 if kind in ('v4', 'v5p') else 1)}")
            c = largest_fitting_chunk(shape, t2)
            if c:
                out.append(f"--topology {t2.topology} --set train.variant_chunk={c}")
                break
    if not out:
        out.append("none found by the analytic model: shorten data.max_len / max_len or shard the base "
                   "(mesh.model)")
    return out


def attention_impl(shape: StudyShape, target: Target) -> str:
    from .program import for_platform
    return getattr(for_platform(shape.cfg, target.platform, shape.tcfg.dtype), "attention", "blocked")


def eval_entries(shape: StudyShape, target: Target, evals, compile: bool, devices=None) -> tuple:
    """({name: entry}, suggestions) of the study's evaluation programs (:mod:`.evals`): each compiled for one
    chip of the target (TPU, ``compile``) or the rough estimate of :func:`.evals.eval_bytes`; a program that does
    not fit names the smaller chunk / batch setting that would (estimate scaled to its compile)."""
    from .evals import eval_bytes, eval_program, scaled_fit
    out, sugg = {}, []
    for ev in evals or ():
        est = eval_bytes(shape, ev)
        e = {"what": ev.what, "shape": ev.describe(), "placement": "one chip (the study's base on one device)",
             "estimate": est}
        total = None
        if target.platform == "tpu" and compile:
            devices = devices if devices is not None else abstract_devices(target)
            c = compile_program(eval_program(shape, ev, devices))
            e["method"], e["compile_seconds"] = "xla-compile", round(c.seconds, 1)
            if c.ok:
                e["per_chip"] = {"arguments": c.arguments, "temporaries": c.temporaries, "outputs": c.outputs,
                                 "aliased": c.aliased, "peak": c.peak, "total": c.total}
                total = c.total
            else:
                e["per_chip"], e["xla_error"] = None, c.error
        else:
            e["method"] = "estimate"
            e["per_chip"] = {"arguments": est["arguments"], "temporaries": est["temporaries"], "outputs": 0,
                             "aliased": 0, "total": est["total"]}
            total = est["total"]
        e["fits"] = total is not None and total <= target.usable_bytes
        if not e["fits"]:
            # the estimate scaled to XLA's figure: its total, or from its out-of-memory message the temporaries
            ref = total or (est["arguments"] + c.needed_temporaries if e["method"] == "xla-compile" else 0)
            if e["method"] == "xla-compile":
                v, b, tried = confirm_call(shape, ev, target, devices, ref / est["total"] if ref else 1.0)
                e["confirmed_by_compile"] = tried
            else:
                v, b = scaled_fit(shape, ev, target.usable_bytes, ref)
            if v and (b < ev.batch or ev.chunk_setting):
                parts = ([f"--set {ev.chunk_setting}={v}"] if ev.chunk_setting and v < ev.variants else []) + \
                        ([f"--set {ev.batch_setting}={max(b // ev.batch_unit, 1)}"] if b < ev.batch else [])
                how = (f"compiled: {fmt_bytes(e['confirmed_by_compile'][-1]['total'])} per chip"
                       if e.get("confirmed_by_compile") else "estimate")
                if ev.kind == "generate" and b < ev.batch:
                    how += "; a smaller batch also changes which samples each prompt draws (keys per batch)"
                sugg.append(" ".join(parts) + f"   ({ev.name}: {v} adapter(s) x {b} "
                            f"{'questions' if ev.kind == 'score' else 'prompts'} per call, {how})")
            else:
                sugg.append(f"{ev.name}: no smaller call found that fits one chip "
                            f"({'compiles tried' if e.get('confirmed_by_compile') else 'estimate'}) "
                            f"(prompt {ev.prompt_len} tokens, {ev.prompt_from}): give a measured prompt length "
                            f"(--eval-prompt-len), shorten max_len, or a chip with more memory")
            e["largest_call"] = {"variants": v, "batch": b}
        out[ev.name] = e
    return out, sugg


def confirm_call(shape: StudyShape, ev, target: Target, devices, ratio: float = 1.0, tries: int = 6) -> tuple:
    """(variants, batch, [{variants, batch, total}]) of the largest call below ``ev``'s that XLA compiles within
    memory: the adapters halved down to 1 (when a setting sets them), then the batch halved, skipping candidates
    the estimate scaled by ``ratio`` puts over 1.5x the chip; at most ``tries`` compiles (seconds each)."""
    from .evals import eval_bytes, eval_program
    cands, v, b = [], ev.variants, ev.batch
    while v > 1 and ev.chunk_setting:
        v = -(-v // 2) if v > 2 else 1
        cands.append((v, b))
    while b > 1:
        b = -(-b // 2) if b > 2 else 1
        cands.append((v, b))
    tried = []
    for v, b in cands:
        if len(tried) >= tries:
            break
        if eval_bytes(shape, ev.resized(variants=v, batch=b))["total"] * ratio > 1.5 * target.usable_bytes:
            continue
        c = compile_program(eval_program(shape, ev.resized(variants=v, batch=b), devices))
        tried.append({"variants": v, "batch": b, "total": c.total if c.ok else None})
        if c.ok and c.total <= target.usable_bytes:
            return v, b, tried
    return 0, 0, tried


def make_plan(shape: StudyShape, target: Target, mfu: float = 0.35, compile: bool = True,
              grouped: bool = True, devices=None, evals=None) -> dict:
    """The plan as a dict. ``compile``: confirm with XLA (TPU targets only). ``evals``: the study's evaluation
    programs (:func:`.evals.eval_programs`), planned beside the training segment; ``fits`` is all of them."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    chunk = shape.chunk
    notes = []
    analytic_bytes, mc = analytic_fit(shape, target, chunk)
    if mc is None:
        mc = mesh_config(shape, target.chips, chunk, target.usable_bytes)  # raises the message naming the setting
    mm = memory_model(shape, mc, chunk)
    rep = {"study_model": shape.model, "model_source": shape.source, "target": target.name,
           "topology": target.topology or f"{target.chips}x {target.chip.name}", "platform": target.platform,
           "chips": target.chips, "chip": target.chip.name, "hbm_bytes": target.chip.hbm_bytes,
           "usable_bytes": target.usable_bytes, "mesh": _mesh_dict(mc), "variants": shape.variants,
           "variant_chunk": chunk, "chunks": -(-shape.variants // chunk), "seq_len": shape.seq_len,
           "batch_size": shape.tcfg.batch_size, "grad_accum": shape.tcfg.grad_accum, "remat": shape.tcfg.remat,
           "dtype": shape.dtype, "quant": shape.quant or "none",
           "analytic": {"arguments": mm.arguments, "temporaries": mm.temporaries, "total": mm.total}}
    fits_analytic = 0 <= analytic_bytes <= target.usable_bytes
    compiled = None
    if target.platform == "tpu" and compile:
        compiled, shape, note = kernel_fallback(shape, target, chunk, devices)
        if note:
            notes.append(note)
        rep["method"] = "xla-compile"
        rep["compile_seconds"] = round(compiled.seconds, 1)
        if compiled.ok:
            rep["per_chip"] = {"arguments": compiled.arguments, "temporaries": compiled.temporaries,
                               "outputs": compiled.outputs, "aliased": compiled.aliased, "peak": compiled.peak,
                               "total": compiled.total}
            rep["per_chip_bytes"] = compiled.total
            fits = compiled.total <= target.usable_bytes
        else:
            rep["per_chip"] = None
            rep["per_chip_bytes"] = None
            rep["xla_error"] = compiled.error
            fits = False
    else:
        rep["method"] = "analytic"
        rep["per_chip"] = {"arguments": mm.arguments, "temporaries": mm.temporaries, "outputs": mm.state,
                           "aliased": mm.state, "total": mm.total}
        rep["per_chip_bytes"] = mm.total
        fits = fits_analytic
        if target.platform == "gpu":
            notes.append(GPU_NOTE)
            notes.append("usable memory counts 0.9 of the GPU: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.9")
    train_entry = {"what": "training segment, one chunk of variants", "method": rep["method"],
                   "per_chip": rep["per_chip"], "fits": bool(fits), "mesh": rep["mesh"]}
    if rep.get("xla_error"):
        train_entry["xla_error"] = rep["xla_error"]
    ev_entries, ev_sugg = eval_entries(shape, target, evals, compile, devices)
    rep["programs"] = {"train": train_entry, **ev_entries}
    totals = [(e.get("per_chip") or {}).get("total") for e in rep["programs"].values()]
    rep["per_chip_bytes"] = None if None in totals else max(totals)     # the largest program's
    train_fits = fits
    fits = fits and all(e["fits"] for e in ev_entries.values())
    rep["fits"] = bool(fits)
    impl = attention_impl(shape, target)
    per_variant = step_flops(shape, impl)
    total, vsteps = study_flops(shape, chunk, grouped, impl)
    secs = total / (target.chips * target.chip.peak_flops * mfu)
    steps = chunk_steps(shape.steps, chunk, grouped)
    rep.update({"flops_per_variant_step": per_variant, "flops_per_step": per_variant * chunk,
                "steps_per_variant": {"min": min(shape.steps), "max": max(shape.steps)},
                "steps_per_chunk": steps, "program_steps": sum(steps), "variant_steps": vsteps,
                "study_flops": total, "attention": impl, "mfu": mfu, "study_hours": secs / 3600,
                "chip_hours": secs * target.chips / 3600})
    if compiled is not None and compiled.ok and compiled.flops_xla:
        rep["xla_flops_scan_body_once"] = compiled.flops_xla
    best = largest_fitting_chunk(shape, target)
    rep["largest_chunk_analytic"] = best
    if not fits:
        rep["suggestions"] = []
        if not train_fits:
            if compile and target.platform == "tpu" and best:
                best = confirm_chunk(shape, target, best, devices)
                rep["largest_chunk_compiled"] = best
            rep["suggestions"] += _suggest(shape, target, best)
        rep["suggestions"] += ev_sugg
    if grouped and len(set(shape.steps)) > 1:
        notes.append("variants run in chunks grouped by step count (a finished variant costs nothing)")
    if shape.tcfg.loss_budget == 0:
        notes.append("loss on every position (a budget of -1 is resolved from the data at run time: an upper bound)")
    rep["notes"] = notes
    return rep


def confirm_chunk(shape: StudyShape, target: Target, chunk: int, devices=None, tries: int = 3) -> int:
    """The largest chunk at or below ``chunk`` that XLA compiles within memory (a few compiles at most)."""
    devices = devices if devices is not None else abstract_devices(target)
    cands = [c for c in chunk_candidates(shape.variants, target.chips) if c <= chunk]
    for c in cands[:tries]:
        r = kernel_fallback(shape, target, c, devices)[0]
        if r.ok and r.total <= target.usable_bytes:
            return c
    return 0


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def format_plan(rep: dict) -> str:
    """The human-readable plan."""
    L = []
    ok = "FITS" if rep["fits"] else "DOES NOT FIT"
    L.append(f"{rep['study_model']} on {rep['topology']} ({rep['chips']} x {rep['chip']}, "
             f"{fmt_bytes(rep['hbm_bytes'])} each): {ok}  [{rep['method']}]")
    L.append(f"  model config from {rep['model_source']}")
    L.append(f"  mesh {rep['mesh']}; {rep['variants']} variants in {rep['chunks']} chunk(s) of "
             f"{rep['variant_chunk']}; batch {rep['batch_size']} x accum {rep['grad_accum']}, T={rep['seq_len']}, "
             f"{rep['dtype']}, quant {rep['quant']}, remat {rep['remat']}")
    pc = rep.get("per_chip")
    if pc:
        L.append(f"  train (one chunk's segment, {rep['method']}) per chip: arguments {fmt_bytes(pc['arguments'])}, temporaries {fmt_bytes(pc['temporaries'])}, "
                 f"outputs {fmt_bytes(pc['outputs'])} (aliased {fmt_bytes(pc['aliased'])}), total "
                 f"{fmt_bytes(pc['total'])} of {fmt_bytes(rep['usable_bytes'])}")
    if rep.get("xla_error"):
        L.append(f"  XLA: {rep['xla_error']}")
    for name, e in rep.get("programs", {}).items():
        if name == "train":
            continue
        pc, sh = e.get("per_chip"), e["shape"]
        dims = (f"{sh['variants']} adapters x {sh['batch']} {'questions' if sh['kind'] == 'score' else 'prompts'}"
                f" x {sh['prompt_len']} prompt tokens" +
                (f" x {sh['options']} options of {sh['option_len']}" if sh["kind"] == "score" else
                 f" + {sh.get('new_tokens', 0)} new"))
        fig = (f"arguments {fmt_bytes(pc['arguments'])}, temporaries {fmt_bytes(pc['temporaries'])}, outputs "
               f"{fmt_bytes(pc['outputs'])}, total {fmt_bytes(pc['total'])}" if pc else f"XLA: {e.get('xla_error')}")
        L.append(f"  {name} ({e['what']}; {dims}; one chip, {e['method']}): {fig} -> "
                 f"{'fits' if e['fits'] else 'DOES NOT FIT'}")
    a = rep["analytic"]
    L.append(f"  analytic model: {fmt_bytes(a['total'])} per chip")
    L.append(f"  FLOPs: {rep['flops_per_variant_step']:.3e} per variant step, {rep['flops_per_step']:.3e} per "
             f"chunk step; {rep['variant_steps']} variant-steps ({rep['steps_per_variant']['min']}.."
             f"{rep['steps_per_variant']['max']} per variant), {rep['study_flops']:.3e} in all")
    L.append(f"  at MFU {rep['mfu']:.2f}: {rep['study_hours']:.2f} h of training, {rep['chip_hours']:.1f} chip-hours")
    L.append(f"  largest chunk that fits (analytic): {rep['largest_chunk_analytic']}"
             + (f"; confirmed by compile: {rep['largest_chunk_compiled']}" if "largest_chunk_compiled" in rep else ""))
    for s in rep.get("suggestions", []):
        L.append(f"  to fit: {s}")
    for n in rep.get("notes", []):
        L.append(f"  note: {n}")
    return "\n".join(L)
