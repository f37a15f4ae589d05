"""``python -m jaxpoison eval RUN --test-set SOURCE [--data-files F]``: an attacks run's adapters on a NEW test set.

The seed evaluated the same fine-tunes on MIMIC test notes and on 200 PMC-Patients summaries (cells 58-76); here
that needs no retraining: the run's base model (checked against its fingerprint) and its trained adapters (the
newest checkpoint) answer the new notes, and the answers are graded and reported like the run's own:

* the base model answers each new note under the normal and the attacked prompt (prompt injection);
* every fine-tuned variant answers its own task's clean prompt (poisoned fine-tuning);
* the run's prompt version and template, generation settings (as resolved in its data.json), grader and judge
  (an API judge's replies are cached in the sub-folder), and statistics apply unchanged.

Everything goes to ``RUN/eval/<name>/`` (``name`` defaults to the source and the files' stem), a folder with the
run-folder layout (``config.json`` with ``eval_of``, ``responses/{injection,finetune,judge}.jsonl``,
``variants.json``, ``data.json``, ``rates.csv``, ``report.md`` ...), so ``report`` and ``compare`` read it like
any run. There is no response source in it (no training happened) and no capability scoring.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import time
from types import SimpleNamespace
from typing import Optional, Sequence

from jaxpoison.studies.attacks import data as attacks_data
from jaxpoison.studies.common import digest


def _name(test_set: str, data_files) -> str:
    stem = "+".join(pathlib.Path(f).stem for f in data_files) if data_files else ""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{test_set}-{stem}" if stem else test_set)


def load_test_notes(test_set: str, data_files: Optional[Sequence[str]], n_test: int, split: str = "train",
                    tokenizer=None, max_note_tokens: int = 0) -> list:
    from jaxpoison.data.schema import DataError
    from jaxpoison.data.sources import load_source
    if test_set == "synthetic":
        raise DataError("--test-set synthetic would re-draw the run's own kind of notes; fix: give a source with "
                        "files, e.g. --test-set notes --data-files other_notes.jsonl, or pmc-patients")
    notes = list(load_source(test_set, data_files=list(data_files) if data_files else None, split=split).examples)
    if tokenizer is not None and max_note_tokens:
        notes = [n for n in notes if len(tokenizer.encode(n.context, add_special_tokens=False)) < max_note_tokens]
    notes = notes[:n_test]
    if len(notes) < 2:
        raise DataError(f"the test set {test_set} has {len(notes)} usable note(s); need at least 2 (a confidence "
                        f"interval needs two)")
    return notes


def evaluate_run(run_dir, test_set: str, data_files: Optional[Sequence[str]] = None, n_test: Optional[int] = None,
                 name: Optional[str] = None, base_override=None, progress: bool = True) -> pathlib.Path:
    """Answer, grade and report ``test_set`` with the run's base and adapters into ``RUN/eval/<name>``."""
    from jaxpoison.analysis.adapters import AnalysisError, load_run
    from jaxpoison.configs import dataclass_from_dict
    from jaxpoison.eval.evaluator import load_checked_base
    from jaxpoison.models.lm import LM
    from jaxpoison.studies.attacks import steps as attacks_steps
    from jaxpoison.studies.attacks.run import report
    from jaxpoison.studies.attacks.config import AttacksConfig
    from jaxpoison.report import to_json
    run = pathlib.Path(run_dir)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} has no config.json: not a jaxpoison run folder")
    cj = json.loads((run / "config.json").read_text())
    if cj.get("study") != "attacks":
        raise AnalysisError(f"{run} is a {cj.get('study')!r} run; eval scores attacks runs")
    if not (run / "data.json").exists():
        raise AnalysisError(f"{run} has no data.json (the run stopped before fine-tuning); finish the run first")
    cfg = dataclass_from_dict(AttacksConfig, cj["config"])
    data = json.loads((run / "data.json").read_text())
    say = (lambda m: print(f"[eval] {m}", flush=True)) if progress else (lambda m: None)
    t0 = time.time()
    base = data.get("base", {})
    model = "override" if base.get("name") == "override" else cfg.model
    mcfg, params, tok, dtype = load_checked_base(model, cfg.dtype, base.get("fingerprint", ""), base_override, cfg.quant)
    lm = LM(mcfg, params, tok, base.get("name", model), base.get("fingerprint", ""), dtype)
    if data.get("generation"):
        g = data["generation"]
        cfg = dataclasses.replace(cfg, generation=dataclasses.replace(
            cfg.generation, sampling="fixed", temperature=float(g["temperature"]), top_p=float(g["top_p"])))
    ad = load_run(run)
    test = load_test_notes(test_set, data_files, n_test or cfg.notes.n_test, tokenizer=tok,
                           max_note_tokens=cfg.notes.max_note_tokens)
    train_ids = set(data.get("train_ids") or [])
    overlap = sorted({n.id for n in test} & train_ids) if test_set == cfg.notes.source else []
    out = run / "eval" / (name or _name(test_set, data_files))
    (out / "responses").mkdir(parents=True, exist_ok=True)
    ecfg = dataclasses.replace(cfg, name=f"{cfg.name} on {test_set}", notes=dataclasses.replace(
        cfg.notes, source=test_set, files="", test_files=",".join(data_files or ()), n_test=len(test)))
    (out / "config.json").write_text(json.dumps({"study": "attacks", "config": to_json(ecfg), "eval_of": str(run)},
                                                indent=1))
    table = json.loads((run / "variants.json").read_text()) if (run / "variants.json").exists() else ad.variants
    (out / "variants.json").write_text(json.dumps(table, indent=1))
    say(f"{len(test)} {test_set} notes; base {lm.name} and {len(table)} adapters of {run}")

    inj_f = out / "responses" / "injection.jsonl"
    inj_key = digest("eval-injection", lm.fingerprint, dataclasses.asdict(cfg.prompt),
                     dataclasses.asdict(cfg.generation), [(n.id, n.context) for n in test])
    if attacks_data.cached(inj_f, inj_key) is None:
        items = attacks_data.prompt_items(test, cfg.prompt.tasks, attacks_data.KINDS, cfg.prompt, "injection")
        say(f"base model answers {len(items)} prompts (normal and attacked)")
        replies = attacks_steps.generate_answers(lm, items, cfg, progress, "injection")
        attacks_data.write_phase(inj_f, inj_key, attacks_steps.answer_records(items, replies))
    result = SimpleNamespace(lora=ad.lora, steps=ad.step)
    pool = SimpleNamespace(data_hash=digest("eval", ad.step, [(n.id, n.context) for n in test]))
    attacks_steps.answer_fine_tuned(cfg, lm, test, result, table, pool, out, progress, say)
    if cfg.grader.judge:
        attacks_steps.judge(cfg, lm, out, progress, say)
    (out / "data.json").write_text(json.dumps({
        "train_ids": data.get("train_ids", []), "test_ids": [n.id for n in test], "eval_of": str(run),
        "test_set": test_set, "data_files": list(data_files or ()), "checkpoint_step": ad.step,
        "overlap_with_training": overlap, "base": base, "generation": data.get("generation"),
        "synthetic_notes": False}, indent=1))
    (out / "timing.json").write_text(json.dumps({"eval_s": time.time() - t0}, indent=1))
    if overlap:
        say(f"warning: {len(overlap)} of these notes were training notes of the run, e.g. {overlap[:3]}")
    report(out)
    say(f"done: {out / 'report.md'}")
    return out


def cmd_eval(args) -> int:
    evaluate_run(args.run_dir, args.test_set, args.data_files, args.n_test, args.name)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="score an attacks run's adapters on a new test set (no retraining)",
                       description="The run's base model and trained adapters answer a new test set (e.g. "
                                   "PMC-Patients, another notes file); graded and reported into RUN/eval/<name>/.")
    p.add_argument("run_dir", help="a finished attacks run folder")
    p.add_argument("--test-set", required=True, help="a notes source: notes (local files), pmc-patients, ...")
    p.add_argument("--data-files", nargs="+", default=None, help="local files of the test set")
    p.add_argument("--n-test", type=int, default=None, help="notes to use (default: the run's notes.n_test)")
    p.add_argument("--name", default=None, help="sub-folder name (default: the source and file stem)")
    p.set_defaults(func=cmd_eval)
