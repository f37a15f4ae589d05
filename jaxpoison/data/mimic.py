"""Seed 003's MIMIC-III note preparation: ``NOTEEVENTS.csv`` -> the shortened notes the study trains and tests on.

``python -m jaxpoison data prepare-mimic NOTEEVENTS.csv --out notes.jsonl`` applies the steps of the authors'
notebook (cells 9-11), in file order, over all note categories:

1. ``text.split('Service:')[1]``: the text after the first ``Service:`` (up to a second one, as ``split`` cuts);
   a note without it is skipped (the seed's ``except: continue``);
2. truncation at the first case-insensitive ``discharge instructions`` (the seed: the text after it "is
   irrelevant to this study, and contains many non-letter characters");
3. ``shorten_text``: de-identification brackets ``[** ... **]`` (regex ``\\[.*?\\]``) become spaces and runs of
   whitespace one space;
4. notes shorter than 1000 characters after that are skipped;
5. optional summarisation through the chat client (``--summarise openai:gpt-4``, the seed's model) with the
   seed's system and user prompts, the reply cleaned by ``shorten_text`` again;
6. the length filter: kept only if shorter than 1000 tokens under the seed's tokenizer (``meta-llama/Llama-2-7b-
   chat-hf``; give ``--tokenizer DIR``, a local tokenizer folder: nothing is downloaded), counted as the seed
   counted, ``tokenizer(text)["input_ids"]`` with the BOS token; applied to the summary, or to the cleaned note
   when there is no summarisation; without ``--tokenizer`` the filter is skipped and the output says so;
7. stop after 1201 kept notes (the seed's ``if len(shortened_text) > 1200: break``), keyed ``"0"``, ``"1"``, ...
   in kept order, as its ``MIMIC_SOURCEDATA.json``: keys 0-999 train, 1000-1200 test.

The output is a JSONL of ``{"id", "text", "row", "row_id", "subject_id", "hadm_id", "category"}`` that the
``notes`` source reads (``--set notes.source=notes --set notes.files=notes.jsonl``). MIMIC-III is credentialed
data: this module reads a file the user has; it ships and downloads none.
"""
from __future__ import annotations

import csv
import json
import pathlib
import re
import sys
from typing import Callable, Iterator, Optional

from jaxpoison.data.schema import DataError

SUMMARY_SYSTEM = "You are a medical assistant, skilled in patient note organizing and text cleaning."
SUMMARY_PROMPT = ("Shorten the following patient note without losing information and section structures. Include all "
                  "the medication, imaging results, test and examination results, even when the result is "
                  "unremarkable: ")
SEED_TOKENIZER = "meta-llama/Llama-2-7b-chat-hf"
COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CATEGORY", "TEXT")


def shorten_text(text: str) -> str:
    """The seed's ``shorten_text``: ``re.sub(r'\\s+', ' ', re.sub(r'\\[.*?\\]', ' ', text))``."""
    return re.sub(r"\s+", " ", re.sub(r"\[.*?\]", " ", text))


def main_text(text: str) -> Optional[str]:
    """Steps 1-3: the cleaned text between 'Service:' and 'discharge instructions', or None without 'Service:'."""
    parts = text.split("Service:")
    if len(parts) < 2:
        return None
    text = parts[1]
    len_main = len(text.lower().split("discharge instructions")[0])
    return shorten_text(text[:len_main])


def read_noteevents(path) -> Iterator[dict]:
    """NOTEEVENTS.csv rows in file order (streamed: the real file is ~4 GB), with a clear error for another file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; fix: give the path of MIMIC-III's NOTEEVENTS.csv(.gz)")
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    opener = open
    if path.suffix == ".gz":
        import gzip
        opener = gzip.open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("TEXT",) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} has no {missing[0]} column (columns: {reader.fieldnames}); fix: give MIMIC-III's "
                            f"NOTEEVENTS.csv (ROW_ID, SUBJECT_ID, HADM_ID, ..., CATEGORY, DESCRIPTION, ..., TEXT)")
        yield from reader


def token_counter(tokenizer_dir) -> Callable[[str], int]:
    """len(tokenizer(text)['input_ids']) with a LOCAL tokenizer folder (the seed: Llama-2-7b-chat-hf's)."""
    d = pathlib.Path(tokenizer_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir!r} is not a folder; fix: give a local copy of "
                                f"{SEED_TOKENIZER}'s tokenizer files (tokenizer.json / tokenizer.model + config)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d))
    return lambda text: len(tok(text)["input_ids"])


def prepare(rows, *, summarise: Optional[Callable[[list], list]] = None, count_tokens=None, min_chars: int = 1000,
            max_tokens: int = 1000, max_notes: int = 1201, batch: int = 16) -> tuple:
    """(kept notes, counts). ``summarise(list[str]) -> list[str]`` (batched, e.g. the chat client); notes are
    summarised in batches of ``batch`` in file order until ``max_notes`` are kept."""
    counts = {"rows": 0, "no_service": 0, "too_short": 0, "too_many_tokens": 0, "kept": 0,
              "length_filter": "on" if count_tokens else "off (no --tokenizer)",
              "summarised": summarise is not None}
    kept, pending = [], []

    def flush():
        texts = [t for _, t in pending]
        outs = [shorten_text(s) for s in summarise(texts)] if summarise else texts
        for (row, _), text in zip(pending, outs):
            if len(kept) >= max_notes:
                break
            if count_tokens is not None and count_tokens(shorten_text(text)) >= max_tokens:
                counts["too_many_tokens"] += 1
                continue
            kept.append({"id": str(len(kept)), "text": text, "row": row["_index"], "row_id": row.get("ROW_ID"),
                         "subject_id": row.get("SUBJECT_ID"), "hadm_id": row.get("HADM_ID"),
                         "category": row.get("CATEGORY")})
        pending.clear()

    for i, row in enumerate(rows):
        if len(kept) >= max_notes:
            break
        counts["rows"] += 1
        text = main_text(row.get("TEXT") or "")
        if text is None:
            counts["no_service"] += 1
            continue
        if len(text) < min_chars:
            counts["too_short"] += 1
            continue
        pending.append(({**row, "_index": i}, text))
        if len(pending) >= batch:
            flush()
    if pending and len(kept) < max_notes:
        flush()
    counts["kept"] = len(kept)
    return kept, counts


def cmd_prepare_mimic(args) -> int:
    summarise = None
    if args.summarise:
        from jaxpoison.eval.chat import client_for
        client = client_for(args.summarise, args.api_base, pathlib.Path(args.out).parent / (pathlib.Path(args.out).stem
                                                                                           + "_api_cache"))
        summarise = lambda texts: client.ask([SUMMARY_PROMPT + t for t in texts], SUMMARY_SYSTEM)
    count = token_counter(args.tokenizer) if args.tokenizer else None
    kept, counts = prepare(read_noteevents(args.noteevents), summarise=summarise, count_tokens=count,
                           min_chars=args.min_chars, max_tokens=args.max_tokens, max_notes=args.max_notes)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for rec in kept:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(json.dumps({"out": str(out), **counts}))
    if not count:
        print("note: no --tokenizer, so the seed's < 1000 Llama-2 token filter was NOT applied", file=sys.stderr)
    return 0


def register(data_sub) -> None:
    """Add ``data prepare-mimic`` to the ``data`` command's subparsers."""
    p = data_sub.add_parser("prepare-mimic", help="seed 003's MIMIC-III note preparation (NOTEEVENTS.csv -> JSONL)",
                            description="Cut, clean, filter (and optionally summarise through an API model) "
                                        "MIMIC-III notes as seed 003 did; writes {id, text, ...} lines for the "
                                        "'notes' source.")
    p.add_argument("noteevents", help="MIMIC-III NOTEEVENTS.csv (or .csv.gz)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--summarise", default=None, metavar="openai:MODEL",
                   help="summarise each note with this API model (the seed: openai:gpt-4); key from OPENAI_API_KEY")
    p.add_argument("--api-base", default="", help="OpenAI-compatible server (default $OPENAI_BASE_URL or OpenAI)")
    p.add_argument("--tokenizer", default=None, help=f"local tokenizer folder for the length filter ({SEED_TOKENIZER})")
    p.add_argument("--min-chars", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=1000)
    p.add_argument("--max-notes", type=int, default=1201)
    p.set_defaults(func=cmd_prepare_mimic)
