"""What every study does first: check the run folder against the config, and load the base model.

A re-run of the same command into the same folder resumes, so the folder's ``config.json`` must match the
config (fields in ``ignore``, free text and the device mesh, may differ); ``--restart`` (``resume=False``) deletes the listed
``stale`` outputs first and keeps everything else.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Sequence


# top-level fields added after runs were made, with the value such a run had: an old folder resumes unchanged
ADDED_FIELDS = {"quant": "none"}


class StudyConfigError(ValueError):
    """A config value that cannot work, or a run folder that holds another config. The message names the field
    (or folder) and what to do."""


def prepare(out_dir, study: str, cfg_json: dict, resume: bool, stale: Sequence[str],
            ignore: Sequence[str] = ("name", "note", "mesh", "train.tensorboard")) -> pathlib.Path:
    """Create ``out_dir``, refuse a different config there (when resuming), drop ``stale`` outputs (when not),
    and write ``config.json`` = ``{"study": study, "config": cfg_json}``. ``ignore`` names top-level fields or
    ``section.field`` ones (``train.tensorboard``: a logging switch, which changes no result)."""
    from jaxpoison import distributed
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_folder(out)        # a multi-host job: every host must see this one folder
    cf = out / "config.json"
    if cf.exists() and resume:
        old = {**ADDED_FIELDS, **json.loads(cf.read_text()).get("config", {})}
        diff = [k for k in cfg_json if k not in ignore and _without(old.get(k), k, ignore) !=
                _without(cfg_json[k], k, ignore)]
        if diff:
            raise StudyConfigError(f"{out} holds a run with a different config ({', '.join(diff)}); use another "
                                   f"--out folder, or --restart to discard it")
    if distributed.is_writer():                 # one writer (process 0); the others wait until it is done
        if not resume:
            for name in stale:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        cf.write_text(json.dumps({"study": study, "config": cfg_json}, indent=1))
    distributed.barrier("run-folder-prepared")
    return out


def _without(section, name: str, ignore: Sequence[str]):
    """A config section less its ``name.field`` entries of ``ignore``."""
    drop = {i.split(".", 1)[1] for i in ignore if i.startswith(name + ".")}
    return {f: v for f, v in section.items() if f not in drop} if drop and isinstance(section, dict) else section


def load_base(model: str, dtype: str, base_override=None, quant: str = "none"):
    """The study's base model as an :class:`jaxpoison.models.lm.LM`; ``base_override`` = (model cfg, params,
    tokenizer) replaces it (tests use tiny random models; its name is ``override``, fingerprint empty). ``quant``
    other than 'none' quantises the decoder layers' kernels (:mod:`jaxpoison.models.quant`); the
    fingerprint stays that of the weights, the run's config records ``quant``."""
    import jax.numpy as jnp
    from jaxpoison.models.lm import LM, load_model
    from jaxpoison.models.quant import kernel_transform, quantize_base
    if base_override is None:       # each kernel is quantised as it is placed: never the whole float base at once
        return load_model(model, dtype, transform=None if quant == "none" else kernel_transform(quant))
    mcfg, params, tok = base_override
    return LM(mcfg, quantize_base(params, quant), tok, "override", "", jnp.float32)
