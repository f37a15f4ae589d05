"""HF PEFT adapters in and out: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT stores ``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] per layer and module; ours is the
stacked transpose (``a`` [L, in, r], ``b`` [L, r, out]). The scale rule travels as ``lora_alpha`` + ``r`` +
``use_rslora`` so that peft applies exactly the update jaxpoison trained.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Optional

import numpy as np

from jaxpoison.models.config import HF_MODULE_NAMES, ModelConfig

_PREFIX = "base_model.model."
_HF_TO_OURS = {v.split(".")[-1]: k for k, v in HF_MODULE_NAMES.items()}


def _key(module: str, layer: Optional[int], which: str) -> str:
    if module == "lm_head":
        return f"{_PREFIX}lm_head.lora_{which}.weight"
    return f"{_PREFIX}model.layers.{layer}.{HF_MODULE_NAMES[module]}.lora_{which}.weight"


def save_peft_adapter(out_dir, lora: dict, cfg: ModelConfig, r: int, alpha: float, scale_rule: str,
                      dropout: float = 0.0, base_name: str = "", extra: Optional[dict] = None) -> pathlib.Path:
    """Write one (unstacked) adapter ``{module: {"a": [L, in, r], "b": [L, r, out]}}`` in PEFT format."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, ab in lora.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        if m == "lm_head":
            tensors[_key(m, None, "A")] = np.ascontiguousarray(a.T)
            tensors[_key(m, None, "B")] = np.ascontiguousarray(b.T)
            continue
        for i in range(a.shape[0]):
            tensors[_key(m, i, "A")] = np.ascontiguousarray(a[i].T)
            tensors[_key(m, i, "B")] = np.ascontiguousarray(b[i].T)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = [m if m == "lm_head" else HF_MODULE_NAMES[m].split(".")[-1] for m in lora]
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(alpha),
        "lora_dropout": float(dropout), "target_modules": targets, "use_rslora": scale_rule == "rslora",
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_name, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    # what peft's config has no field for (it warns on unknown keys) goes beside it
    (out / "jaxpoison_adapter.json").write_text(json.dumps(
        {"scale_rule": scale_rule, "scale": alpha / (np.sqrt(r) if scale_rule == "rslora" else r),
         "model": cfg.to_json(), **(extra or {})}, indent=2, default=str))
    return out


def load_peft_adapter(path, cfg: ModelConfig) -> tuple[dict, float]:
    """Read a PEFT LoRA adapter directory into our layout. Returns (lora, scale)."""
    from safetensors.numpy import load_file

    d = pathlib.Path(path)
    cf, wf = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cf.exists() or not wf.exists():
        raise FileNotFoundError(f"{d} is not a PEFT adapter folder: it needs adapter_config.json and "
                                "adapter_model.safetensors (export one with `python -m jaxpoison export`)")
    conf = json.loads(cf.read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d}: peft_type {conf.get('peft_type')!r} is not LORA")
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    scale = alpha / (np.sqrt(r) if conf.get("use_rslora") else r)
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"{d}: per-module rank_pattern/alpha_pattern adapters are not supported")
    tensors = load_file(str(wf))
    pat = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
    head = re.compile(r"(?:.*\.)?lm_head\.lora_([AB])(?:\.default)?\.weight$")
    layers: dict = {}
    lora: dict = {}
    for k, v in tensors.items():
        m = pat.match(k)
        if m:
            i, hf_name, which = int(m.group(1)), m.group(2), m.group(3)
            if hf_name not in _HF_TO_OURS:
                raise ValueError(f"{d}: adapter targets unknown module {hf_name}")
            layers.setdefault(_HF_TO_OURS[hf_name], {}).setdefault(which, {})[i] = v.T
            continue
        h = head.match(k)
        if h:
            lora.setdefault("lm_head", {})["a" if h.group(1) == "A" else "b"] = v.T.astype(np.float32)
            continue
        raise ValueError(f"{d}: unexpected tensor {k} in adapter_model.safetensors")
    for mod, ab in layers.items():
        for which in ("A", "B"):
            got = sorted(ab.get(which, {}))
            if got != list(range(cfg.num_layers)):
                raise ValueError(f"{d}: module {mod} lora_{which} has layers {got[:5]}..., the model has "
                                 f"{cfg.num_layers}: the adapter does not belong to this model")
        a = np.stack([ab["A"][i] for i in range(cfg.num_layers)]).astype(np.float32)
        b = np.stack([ab["B"][i] for i in range(cfg.num_layers)]).astype(np.float32)
        fan_in, fan_out = cfg.module_shape(mod)
        if a.shape != (cfg.num_layers, fan_in, r) or b.shape != (cfg.num_layers, r, fan_out):
            raise ValueError(f"{d}: {mod} adapter shapes {a.shape}, {b.shape} do not fit the model "
                             f"({fan_in} -> {fan_out}, r={r})")
        lora[mod] = {"a": a, "b": b}
    if not lora:
        raise ValueError(f"{d}: no LoRA tensors found")
    return lora, float(scale)


def load_run_lora(run_dir, step: Optional[int] = None) -> tuple[dict, dict]:
    """The stacked adapters [V, ...] and metadata of a run folder's checkpoint (newest readable by default)."""
    import orbax.checkpoint as ocp
    from .checkpoint import Checkpoints, CheckpointError

    ck = Checkpoints(run_dir, read_only=True)
    steps = ck.steps() if step is None else [step]
    if not steps:
        raise CheckpointError(f"{run_dir} has no complete checkpoint")
    errors = []
    for s in reversed(steps):
        try:
            out = ck.mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            meta=ocp.args.JsonRestore()))
            ck.close()
            lora = {m: {k: np.asarray(x) for k, x in ab.items()} for m, ab in out["state"]["lora"].items()}
            return lora, dict(out["meta"])
        except Exception as e:
            errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    raise CheckpointError(f"no checkpoint of {run_dir} could be read: " + "; ".join(errors))


def cmd_export(args) -> int:
    lora, meta = load_run_lora(args.run_dir, args.step)
    V = next(iter(lora.values()))["a"].shape[0]
    if not 0 <= args.variant < V:
        raise ValueError(f"--variant {args.variant} is out of range: the run has variants 0..{V - 1}")
    one = {m: {k: x[args.variant] for k, x in ab.items()} for m, ab in lora.items()}
    cfg = ModelConfig.from_json(meta["model"])
    lc = meta["lora"]
    row = meta["variants"][args.variant] if args.variant < len(meta.get("variants", [])) else {}
    out = save_peft_adapter(args.out, one, cfg, lc["r"], lc["alpha"], lc["scale_rule"], lc["dropout"],
                            meta.get("base", {}).get("name", ""),
                            # layers_from: LoRA trained on layers >= it only; the rows below are exactly zero
                            {"variant": row, "step": meta.get("step"), "layers_from": lc.get("layers_from", 0)})
    print(f"wrote PEFT adapter of variant {args.variant} to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export one variant's adapter as a HF PEFT adapter",
                       description="Write RUN_DIR's variant K as adapter_model.safetensors + adapter_config.json, "
                                   "loadable with peft.PeftModel.from_pretrained on the base model.")
    p.add_argument("run_dir")
    p.add_argument("--variant", type=int, required=True, help="variant index (row of results.csv)")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.set_defaults(func=cmd_export)
