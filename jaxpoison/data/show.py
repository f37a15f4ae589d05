"""``python -m jaxpoison data show SOURCE``: print normalised examples and a per-subject count table.

With ``--json`` every output line is one JSON object: one per example (id, question, options, answer,
subject, rationale, ...), then one summary object ``{"subject_counts": ..., "n_examples": ..., "skipped": ...}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

from jaxpoison.data.schema import DataError
from jaxpoison.data.sources import SOURCE_NAMES, load_source
from jaxpoison.data.subjects import KEYWORD_SUBJECTS, format_counts, subject_counts, tag_subjects


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``data show`` to a CLI's subparsers; the handler is ``args.func(args) -> exit code``."""
    data = subparsers.add_parser("data", help="inspect data sources")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("show", help="print normalised examples and per-subject counts")
    p.add_argument("source", choices=SOURCE_NAMES, help="data source")
    p.add_argument("--data-files", nargs="+", default=None, help="local files in the source's schema")
    p.add_argument("--split", default=None, help="split (default: the source's usual one); slices like train[:100]")
    p.add_argument("--limit", type=int, default=5, help="examples to print (counts cover the whole split)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--hub-id", default=None, help="override the source's hub dataset id")
    p.add_argument("--config", default=None, help="hub dataset config name")
    p.add_argument("--policy", choices=("raise", "skip"), default="raise", help="bad rows: stop, or skip and report")
    p.add_argument("--tag", action="append", default=[], choices=sorted(KEYWORD_SUBJECTS),
                   help="also count a keyword subject (e.g. fever)")
    p.add_argument("--seed", type=int, default=0, help="icd10: set seed")
    p.add_argument("--cop-base", type=int, default=None, help="medmcqa: 1 for files that number cop from 1")
    p.set_defaults(func=run_show)
    from jaxpoison.data import mimic
    mimic.register(sub)
    return p


def run_show(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    opts = {}
    if args.source == "icd10":
        opts["seed"] = args.seed
    if args.cop_base is not None:
        opts["cop_base"] = args.cop_base
    try:
        res = load_source(args.source, data_files=args.data_files, split=args.split, hub_id=args.hub_id,
                          config=args.config, policy=args.policy, **opts)
    except DataError as e:
        print(f"error: {e}", file=err)
        return 2
    exs = tag_subjects(res.examples, {t: KEYWORD_SUBJECTS[t] for t in args.tag}) if args.tag else res.examples
    counts = subject_counts({args.split or "examples": exs})
    shown = exs[:args.limit] if args.limit is not None and args.limit >= 0 else exs
    if args.json:
        for ex in shown:
            print(json.dumps(ex.to_json(), ensure_ascii=False), file=out)
        print(json.dumps({"subject_counts": {s: sum(c.values()) for s, c in counts.items()}, "n_examples": len(exs),
                          "skipped": [{"row": r, "id": i, "reason": why} for r, i, why in res.report.skipped]},
                         ensure_ascii=False), file=out)
        return 0
    for ex in shown:
        print(f"== {ex.id}  [{', '.join(ex.subjects) or 'no subject'}]", file=out)
        if ex.context:
            print(textwrap.shorten(ex.context, 600) if ex.is_mc else ex.context, file=out)
        if ex.question:
            print(ex.question, file=out)
        for k, o in enumerate(ex.options):
            print(f"  ({chr(65 + k)}) {o}{'   <- answer' if k == ex.answer else ''}", file=out)
        if ex.rationale:
            print(f"  rationale: {ex.rationale}", file=out)
        print(file=out)
    print(f"{len(exs)} examples", file=out)
    print(format_counts(counts), file=out)
    if res.report.skipped:
        print(res.report.summary(), file=err)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpoison")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
