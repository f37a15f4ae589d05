"""``python -m jaxpoison COMMAND``: the command line.

Every command has ``--help``. Heavy imports (jax, transformers) happen inside the commands, so ``--help`` is
instant.
"""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  python -m jaxpoison run configs/rationale_demo.py --out runs/demo     # the seed-000 demo study
  python -m jaxpoison report runs/demo                                   # rebuild its report
  python -m jaxpoison score --model smollm2-135m --text "The heart pumps blood."
  python -m jaxpoison generate --model smollm2-135m --chat "What organ pumps blood around the body?"
  python -m jaxpoison data show icd10 --limit 3
  python -m jaxpoison export runs/demo --variant 3 --out adapters/v3
  python -m jaxpoison analyze runs/demo                                  # weight shift, detector, mitigation
  python -m jaxpoison eval runs/attacks --test-set notes --data-files pmc.jsonl   # adapters on a new test set
  python -m jaxpoison compare runs/llama2 runs/llama3 --out cmp           # cross-model ASR table and grid
  python -m jaxpoison data prepare-mimic NOTEEVENTS.csv --out notes.jsonl # seed 003's MIMIC preparation
  python -m jaxpoison bench forward --model smollm2-135m
  python -m jaxpoison plan configs/rationale_paper.py --topology v5e-8   # fits? memory per chip, chip-hours

--model takes 'smollm2-135m' (embedded, offline), a local HF directory, or a hub id (needs the hub)."""


def _add_model_args(p):
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (embedded), a HF model directory, or a hub id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="param/compute dtype")
    p.add_argument("--adapter", default=None, help="a HF PEFT adapter directory to apply (ours or peft's)")


def _load(args):
    from jaxpoison.models.lm import load_model
    lm = load_model(args.model, args.dtype)
    lora, scale = None, 1.0
    if args.adapter:
        from jaxpoison.train.export import load_peft_adapter
        lora, scale = load_peft_adapter(args.adapter, lm.cfg)
    return lm, lora, scale


def cmd_score(args) -> int:
    import jax.numpy as jnp
    import numpy as np
    from jaxpoison.models.lm import sequence_logprobs

    lm, lora, scale = _load(args)
    ids = lm.tokenizer.encode(args.text, add_special_tokens=True)
    if len(ids) < 2:
        print("error: --text must be at least two tokens long to score", file=sys.stderr)
        return 2
    toks = jnp.asarray([ids], jnp.int32)
    lp = np.asarray(sequence_logprobs(lm.params, toks, jnp.ones_like(toks, bool), cfg=lm.cfg, dtype=lm.dtype,
                                      lora=lora, lora_scale=scale))[0]
    ppl = float(np.exp(-lp.mean()))
    if args.json:
        print(json.dumps({"tokens": [int(i) for i in ids], "logprobs": [float(x) for x in lp], "ppl": ppl}))
    else:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        for piece, x in zip(pieces[1:], lp):
            print(f"{x:9.4f}  {piece!r}")
        print(f"perplexity {ppl:.3f} over {len(lp)} predicted tokens")
    return 0


def cmd_generate(args) -> int:
    from jaxpoison.models.generate import generate_text

    lm, lora, scale = _load(args)
    prompts = args.prompt or [sys.stdin.read()]
    out = generate_text(lm, prompts, chat=args.chat, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        batch_size=min(args.batch_size, len(prompts)), lora=lora, lora_scale=scale,
                        system=args.system)
    for p, o in zip(prompts, out):
        print(json.dumps({"prompt": p, "reply": o}, ensure_ascii=False) if args.json else o)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxpoison", description=(
        "jaxpoison: data-poisoning studies of medical language models in JAX. Many poisoned LoRA variants of "
        "one frozen base train together in one vmapped, jitted program."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    from jaxpoison import studies
    studies.register(sub)           # run, report

    p = sub.add_parser("score", help="per-token log-probs and perplexity of a text",
                       description="Score a text: log p(token i+1 | tokens <= i) for every token, and perplexity.")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="the text to score")
    p.add_argument("--json", action="store_true", help='print {"tokens", "logprobs", "ppl"} as one JSON line')
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="generate replies (jitted, KV cache, batched)",
                       description="Generate a reply for each prompt: greedy by default, or temperature/top-p "
                                   "sampling with a fixed seed. Stops at end-of-sequence.")
    _add_model_args(p)
    p.add_argument("prompt", nargs="*", help="prompts (default: one prompt read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    from jaxpoison.bench import forward as bench_forward, train as bench_train, trunk as bench_trunk
    from jaxpoison.data import show
    from jaxpoison.train import export
    from jaxpoison.analysis import run as analysis_run
    from jaxpoison.plan import cli as plan_cli

    export.register(sub)
    plan_cli.register(sub)
    analysis_run.register(sub, evaluator_for=studies.evaluator_for)
    for study in studies.all_studies():
        for command in study.commands:     # the attacks study: compare, eval
            command(sub)
    show.register(sub)
    bench_sub = bench_forward.register(sub)
    bench_train.register(bench_sub)
    bench_trunk.register(bench_sub)
    return ap


def quiet_tpu_probe() -> None:
    """libtpu is installed for the planner's ahead-of-time compiles; on a machine without a TPU, jax would still
    probe for one at start-up (libtpu's warnings on stderr). Without TPU device files and without a CUDA plugin,
    default JAX_PLATFORMS to cpu; an explicit JAX_PLATFORMS always wins."""
    import glob
    import importlib.util
    import os
    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    try:
        if importlib.util.find_spec("libtpu") is None:
            return
        if importlib.util.find_spec("jax_plugins") is not None and any(
                importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
            return
    except (ImportError, ValueError):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    quiet_tpu_probe()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
