"""The fit check ``run`` makes before it loads any weights: a study that cannot fit stops in seconds with the
planner's message, not with an out-of-memory error after minutes of loading.

On CPU the analytic memory model of one chunk's train step is compared with the host's available memory. On an
accelerator the analytic model decides the clear cases at once (under 0.7x or over 1.5x of a device's memory);
in between, the train segment is compiled for the real devices from abstract inputs, and XLA's verdict decides.
``JAXPOISON_SKIP_FIT_CHECK=1`` skips the check. A model whose config cannot be found without loading it is not
checked here (loading it raises its own error).
"""
from __future__ import annotations

import os

from jaxpoison.configs import StudyConfigError


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


def check_fit(cfg, base_override=None) -> dict:
    """Raise :class:`StudyConfigError` naming what to change when the study's train step cannot fit; returns
    the figures it compared (for the run's log)."""
    if os.environ.get("JAXPOISON_SKIP_FIT_CHECK", "") not in ("", "0"):
        return {"skipped": True}
    import jax
    from jaxpoison.train.mesh import device_bytes
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
    fix = (f"run `python -m jaxpoison plan CONFIG --set ...` for settings that fit (train.variant_chunk, "
           f"train.remat=true, quant=nf4, mesh.fsdp, a smaller max_len), or set JAXPOISON_SKIP_FIT_CHECK=1")
    if not limit:
        return {**out, "skipped": True}
    if platform == "cpu" or not 0.7 * limit <= need <= 1.5 * limit:
        if need > limit:
            raise StudyConfigError(
                f"this study's train step needs about {fmt_bytes(need)} ({chunk} variants per chunk, analytic "
                f"model) but {fmt_bytes(limit)} is available on {platform}; {fix}")
        return out
    c: Compiled = compile_program(train_program(shape, devices, chunk, hbm_bytes=limit))
    out["compiled_bytes"] = c.total if c.ok else None
    if not c.ok or c.total > limit:
        raise StudyConfigError(f"this study's train step does not fit the {len(devices)} {platform} device(s): "
                               f"{c.error or fmt_bytes(c.total) + ' per device'} ({chunk} variants per chunk); {fix}")
    return out
