"""The fit check ``run`` makes before it loads any weights: a study that cannot fit stops in seconds with the
planner's message, not with an out-of-memory error after minutes of loading.

Every program the planner plans is checked: one chunk's train step and the study's evaluation calls (option
scoring, generation, capability: :func:`jaxpoison.plan.evals.eval_programs`, one call on one device, prompts at
the config's bound). On CPU the analytic figures (:func:`.model.memory_model`, :func:`.evals.eval_bytes`) are
compared with the host's available memory, with no compile; as prompts are only bounded before the data exist,
an eval call over the host's memory at the bound but within it at ``PROMPT_FLOOR``-token prompts is a warning
(``warnings`` in the figures), not a refusal (a demo's prompts are far below its max_len). On an accelerator the analytic figure decides the
clear cases at once (train step: under 0.7x or over 1.5x of a device's memory; an eval call, whose estimate is
rougher: under 0.3x or over 3x); in between, the program is compiled for the real devices from abstract inputs,
and XLA's verdict decides. ``JAXPOISON_SKIP_FIT_CHECK=1`` skips the check. A model whose config cannot be found
without loading it is not checked here (loading it raises its own error).
"""
from __future__ import annotations

import dataclasses
import os
import warnings

from jaxpoison.configs import StudyConfigError

TRAIN_ZONE = (0.7, 1.5)     # analytic / limit where the train step is compiled (model within 0.8-2x of XLA)
EVAL_ZONE = (0.3, 3.0)      # estimate / limit where an eval call is compiled (estimate within 0.3-3x of XLA)
PROMPT_FLOOR = 32           # prompt tokens of the shortest call a CPU check refuses (the data decide the rest)


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _decide(platform: str, need: int, limit: int, zone: tuple) -> bool:
    """True when the analytic figure settles it (always on CPU), False when a compile must."""
    return platform == "cpu" or not zone[0] * limit <= need <= zone[1] * limit


def _eval_dims(ev) -> str:
    rows = "questions" if ev.kind == "score" else "prompts"
    tail = f" x {ev.options} options of {ev.option_len}" if ev.kind == "score" else f" + {ev.new_tokens} new"
    return f"{ev.variants} adapter(s) x {ev.batch} {rows} x {ev.prompt_len} prompt tokens ({ev.prompt_from}){tail}"


def _eval_fix(shape, ev, limit: int, compiled_total: int, short=None) -> str:
    """The settings that make ``ev`` fit ``limit`` by the estimate (scaled to its compile when there is one);
    ``short``: ``ev`` with shorter prompts, tried when no smaller call fits at the bound."""
    from .evals import fit_settings, scaled_fit
    v, b = scaled_fit(shape, ev, limit, compiled_total)
    if not v and short is not None:
        ev = short
        v, b = scaled_fit(shape, ev, limit)
    sets = fit_settings(ev, v, b) if v else []
    if not sets:
        return (f"no smaller call fits ({ev.prompt_len}-token prompts, {ev.prompt_from}): shorten max_len, "
                f"quantise the base (quant=nf4) or use a device with more memory")
    rows = "questions" if ev.kind == "score" else "prompts"
    return (" ".join(f"--set {s}" for s in sets) + f" would fit ({v} adapter(s) x {b} {rows} per call, "
            f"{'estimate scaled to the compile' if compiled_total else 'estimate'})")


def check_fit(cfg, base_override=None) -> dict:
    """Raise :class:`StudyConfigError` naming each program that cannot fit (train step, scoring, generation,
    capability), its need against the limit and what to change; return the figures it compared, per program
    under ``programs`` (for the run's log)."""
    if os.environ.get("JAXPOISON_SKIP_FIT_CHECK", "") not in ("", "0"):
        return {"skipped": True}
    import jax
    from jaxpoison.train.mesh import device_bytes
    from .evals import eval_bytes, eval_program, eval_programs
    from .model import memory_model
    from .planner import fmt_bytes
    from .program import Compiled, compile_program, mesh_config, train_program
    from .shapes import study_shape
    try:
        shape = study_shape(cfg, *((base_override[0], "base_override") if base_override else ()))
    except FileNotFoundError:
        return {"skipped": True}
    devices = jax.devices()
    platform = devices[0].platform
    chunk = shape.chunk
    if platform == "cpu":
        # CPU devices share the host's memory, and `auto` axes resolve to one device there (train.mesh.resolve):
        # the mesh has as many devices as the config's explicit axes ask for, and their shares add up
        from jaxpoison.train.mesh import AUTO, AXES
        mc0 = getattr(cfg, "mesh", None)
        n = 1
        for a in AXES if mc0 is not None else ():
            n *= 1 if getattr(mc0, a) == AUTO else int(getattr(mc0, a))
        limit = host_available_bytes()
    else:
        limit, n = device_bytes(devices[0]) or 0, len(devices)
    mc = mesh_config(shape, n, chunk, limit)
    need = memory_model(shape, mc, chunk).total * (n if platform == "cpu" else 1)
    out = {"platform": platform, "analytic_bytes": need, "limit_bytes": limit, "chunk": chunk}
    if not limit:
        return {**out, "skipped": True}
    where = "the host" if platform == "cpu" else f"one {platform} device ({len(devices)} present)"
    failures = []

    # the train step: one chunk of variants over the study's mesh
    train = {"method": "analytic", "analytic_bytes": need, "chunk": chunk}
    if _decide(platform, need, limit, TRAIN_ZONE):
        train["fits"] = need <= limit
        if not train["fits"]:
            failures.append(f"its train step needs about {fmt_bytes(need)} ({chunk} variants per chunk, "
                            f"analytic model) but {fmt_bytes(limit)} is available on {where}; fix: "
                            f"train.variant_chunk, train.remat=true, quant=nf4, mesh.fsdp or a smaller max_len")
    else:
        c: Compiled = compile_program(train_program(shape, devices, chunk, hbm_bytes=limit))
        out["compiled_bytes"] = train["compiled_bytes"] = c.total if c.ok else None
        train["method"], train["fits"] = "xla-compile", c.ok and c.total <= limit
        if not train["fits"]:
            failures.append(f"its train step does not fit {where}: "
                            f"{c.error or fmt_bytes(c.total) + ' per device'} of {fmt_bytes(limit)} ({chunk} "
                            f"variants per chunk, XLA compile); fix: train.variant_chunk, train.remat=true, "
                            f"quant=nf4, mesh.fsdp or a smaller max_len")
    programs = {"train": train}

    # the evaluation calls: plain jit on one device (the study's placement of the base)
    warned = []
    for ev in eval_programs(cfg, shape):
        rough = eval_bytes(shape, ev)
        est = rough["total"]
        e = {"method": "estimate", "estimate_bytes": est, "shape": ev.describe()}
        compiled_total = 0
        got = f"needs about {fmt_bytes(est)} (estimate, prompts at the {ev.prompt_from})"
        if platform == "cpu":
            e["fits"] = est <= limit
            if not e["fits"]:
                # prompts are only bounded before the data exist: refuse a call that cannot fit even with short
                # prompts, and warn about one that fits only below the bound (host memory; a demo's prompts are
                # far shorter than max_len)
                short = dataclasses.replace(ev, prompt_len=min(ev.prompt_len, PROMPT_FLOOR))
                e["floor_bytes"] = floor = eval_bytes(shape, short)["total"]
                fix = _eval_fix(shape, ev, limit, 0, short)
                if floor <= limit:
                    e["fits"], e["fits_at_prompt_bound"] = True, False
                    warned.append(f"its {ev.name} program ({ev.what}; {_eval_dims(ev)}) {got} but "
                                  f"{fmt_bytes(limit)} is available on {where}; it fits with prompts of "
                                  f"{PROMPT_FLOOR} tokens ({fmt_bytes(floor)}), so it runs if the data's prompts "
                                  f"are short enough; if it runs out of memory: {fix}")
                else:
                    failures.append(f"its {ev.name} program ({ev.what}; {_eval_dims(ev)}) {got}, and "
                                    f"{fmt_bytes(floor)} even with {PROMPT_FLOOR}-token prompts, but "
                                    f"{fmt_bytes(limit)} is available on {where}; fix: {fix}")
        else:
            if _decide(platform, est, limit, EVAL_ZONE):
                e["fits"] = est <= limit
            else:
                c = compile_program(eval_program(shape, ev, devices))
                e["method"], e["compiled_bytes"] = "xla-compile", c.total if c.ok else None
                e["fits"] = c.ok and c.total <= limit
                # XLA's figure for scaling the estimate: its total, or the temporaries its out-of-memory message
                # names
                compiled_total = c.total if c.ok else (rough["arguments"] + c.needed_temporaries
                                                       if c.needed_temporaries else 0)
                got = (f"needs {fmt_bytes(c.total)} (XLA compile)" if c.ok else
                       f"does not compile within memory (XLA: {c.error})")
            if not e["fits"]:
                failures.append(f"its {ev.name} program ({ev.what}; {_eval_dims(ev)}) {got} but "
                                f"{fmt_bytes(limit)} is available on {where}; fix: "
                                f"{_eval_fix(shape, ev, limit, compiled_total)}")
        programs[ev.name] = e
    if warned:
        out["warnings"] = warned
        for w in warned:
            warnings.warn("fit check: " + w, stacklevel=2)
    out["programs"] = programs
    if failures:
        raise StudyConfigError(
            "this study does not fit: " + "; ".join(failures) + ". Run `python -m jaxpoison plan CONFIG --set "
            "...` for the settings that fit every program, or set JAXPOISON_SKIP_FIT_CHECK=1 to run anyway")
    return out
