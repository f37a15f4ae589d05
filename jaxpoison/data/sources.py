"""Loaders for the medical data sets the seed studies use, each normalised into :class:`Example`.

Every loader goes through ``datasets.load_dataset``: on a hub id by default, or on local files in the same
schema (``data_files=``), which is how the tests and offline users run them. Nothing is downloaded unless a
hub id is actually loaded.

| name | default hub id (config) | schema read |
|---|---|---|
| medqa-en | GBaker/MedQA-USMLE-4-options | question, options {A: text} or [{key, value}], answer_idx, answer, meta_info |
| medqa-zh | fzkuji/MedQA (med_qa_zh_4options_source) | the same, mainland simplified Chinese (MCMLE) |
| medmcqa | openlifescienceai/medmcqa | id, question, opa..opd, cop (0-based), exp, subject_name, topic_name |
| pubmedqa | qiaojin/PubMedQA (pqa_labeled) | pubid, question, context {contexts, meshes}, long_answer, final_decision |
| pmc-patients | zhengyun21/PMC-Patients | patient_uid, patient, age, gender, PMID, title |
| notes | (local only) | JSONL/CSV with an id and a text column, or a JSON object {id: text} |
| icd10 | (embedded) | the offline ICD-10-CM set of :mod:`jaxpoison.data.icd10` |

Note: the original MedMCQA release on GitHub numbers ``cop`` from 1; pass ``cop_base=1`` for those files.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Union

from jaxpoison.data.schema import (LETTERS, DataError, Example, LoadReport, LoadResult, RowError, check_policy,
                                   collect)

DataFiles = Union[str, os.PathLike, Sequence, dict, None]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    hub_id: Optional[str]
    config: Optional[str]
    split: str
    normalise: Callable
    n_options: Optional[int]


def _req(row: dict, key: str, source: str):
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise RowError(f"missing field {key!r}", f"add {key!r} to every row ({source} schema: see jaxpoison.data.sources)")
    return v


def _options_of(raw) -> tuple[list, list]:
    """MedQA options as (letters, texts) from a dict {A: text}, a list of {key, value}, or a list of texts."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise RowError("options is a string, not a mapping", "store options as {\"A\": text, ...}") from None
    if isinstance(raw, dict):
        items = sorted((str(k).strip(), v) for k, v in raw.items() if v is not None)
    elif isinstance(raw, (list, tuple)):
        if raw and isinstance(raw[0], dict):
            items = [(str(o.get("key", LETTERS[k])).strip(), o.get("value")) for k, o in enumerate(raw)]
        else:
            items = [(LETTERS[k], o) for k, o in enumerate(raw)]
    else:
        raise RowError(f"options has type {type(raw).__name__}", "store options as {\"A\": text, ...}")
    return [k for k, _ in items], [str(v).strip() if v is not None else "" for _, v in items]


def _medqa(row: dict, i: int, *, source: str, split: str) -> Example:
    question = str(_req(row, "question", source)).strip()
    keys, texts = _options_of(_req(row, "options", source))
    idx_key = row.get("answer_idx")
    if idx_key not in (None, ""):
        idx_key = str(idx_key).strip()
        if idx_key not in keys:
            raise RowError(f"answer_idx {idx_key!r} is not one of the option keys {keys}",
                           "set answer_idx to the key of the right option")
        answer = keys.index(idx_key)
        text = row.get("answer")
        if isinstance(text, str) and text.strip() and text.strip() != texts[answer]:
            raise RowError(f"answer text {text.strip()[:40]!r} does not match option {idx_key} "
                           f"{texts[answer][:40]!r}", "make answer_idx and answer agree")
    elif isinstance(row.get("answer"), str) and row["answer"].strip() in texts:
        answer = texts.index(row["answer"].strip())
    else:
        raise RowError("missing field 'answer_idx' (and 'answer' matches no option)",
                       "add answer_idx (the letter of the right option) to every row")
    ex_id = str(row.get("id") or f"{source}:{split}:{i}")
    meta = {k: row[k] for k in ("meta_info",) if row.get(k) is not None}
    return Example(ex_id, question, tuple(texts), answer, (), "", "", source, meta)


def _medmcqa(row: dict, i: int, *, source: str, split: str, cop_base: int = 0) -> Example:
    question = str(_req(row, "question", source)).strip()
    options = tuple(str(_req(row, k, source)).strip() for k in ("opa", "opb", "opc", "opd"))
    cop = row.get("cop")
    if cop is None or str(cop).strip() == "":
        raise RowError("missing field 'cop'", "add cop (the index of the right option) to every row")
    try:
        answer = int(cop) - cop_base
    except (TypeError, ValueError):
        raise RowError(f"cop {cop!r} is not an integer", "cop must be 0..3 (or 1..4 with cop_base=1)") from None
    if int(cop) < 0:
        raise RowError(f"cop={cop}: no answer key (the MedMCQA test split is unlabelled)",
                       "use the train or validation split")
    if not 0 <= answer < 4:
        hint = " or pass cop_base=1 if the file numbers cop from 1 (the original release)" if cop_base == 0 else ""
        raise RowError(f"answer index {answer} (cop={cop}) is outside the 4 options", f"cop must be 0..3{hint}")
    subject = row.get("subject_name") or ""
    meta = {k: row.get(k) for k in ("subject_name", "topic_name", "choice_type")}
    return Example(str(row.get("id") or f"{source}:{split}:{i}"), question, options, answer,
                   (subject,) if subject else (), str(row.get("exp") or "").strip(), "", source, meta)


PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def _pubmedqa(row: dict, i: int, *, source: str, split: str) -> Example:
    question = str(_req(row, "question", source)).strip()
    decision = str(_req(row, "final_decision", source)).strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise RowError(f"final_decision {decision!r} is not yes/no/maybe", "set final_decision to yes, no or maybe")
    ctx = row.get("context") if row.get("context") is not None else row.get("contexts")
    if isinstance(ctx, dict):
        meshes, ctx = ctx.get("meshes") or [], ctx.get("contexts")
    else:
        meshes = row.get("meshes") or []
    if ctx is None:
        raise RowError("missing field 'context'", "add context {contexts: [...]} to every row")
    text = " ".join(map(str, ctx)) if isinstance(ctx, (list, tuple)) else str(ctx)
    pubid = row.get("pubid")
    return Example(str(pubid) if pubid is not None else f"{source}:{split}:{i}", question, PUBMEDQA_OPTIONS,
                   PUBMEDQA_OPTIONS.index(decision), (), str(row.get("long_answer") or "").strip(), text, source,
                   {"meshes": list(meshes)})


def _parse_age(age) -> Optional[float]:
    """PMC-Patients age: [[value, unit], ...] (a list, or its repr in the CSV release) -> years."""
    if isinstance(age, str):
        try:
            age = ast.literal_eval(age)
        except (ValueError, SyntaxError):
            return None
    per_year = {"year": 1.0, "month": 12.0, "week": 52.0, "day": 365.0, "hour": 8760.0}
    try:
        return round(sum(float(v) / per_year[str(u)] for v, u in age), 3)
    except (TypeError, ValueError, KeyError):
        return None


def _pmc_patients(row: dict, i: int, *, source: str, split: str) -> Example:
    text = str(_req(row, "patient", source)).strip()
    ex_id = str(_req(row, "patient_uid", source))
    meta = {"age_years": _parse_age(row.get("age")), "sex": row.get("gender"), "pmid": row.get("PMID"),
            "title": row.get("title")}
    return Example(ex_id, "", (), -1, (), "", text, source, meta)


NOTE_ID_FIELDS = ("id", "note_id", "key", "patient_uid", "hadm_id")
NOTE_TEXT_FIELDS = ("text", "note", "summary", "patient")


def _note(row: dict, i: int, *, source: str, split: str, id_field: Optional[str] = None,
          text_field: Optional[str] = None) -> Example:
    tf = text_field or next((k for k in NOTE_TEXT_FIELDS if k in row), None)
    if tf is None:
        raise RowError(f"no text column (looked for {NOTE_TEXT_FIELDS})", "name the column with text_field=...")
    text = str(_req(row, tf, source)).strip()
    idf = id_field or next((k for k in NOTE_ID_FIELDS if row.get(k) not in (None, "")), None)
    ex_id = str(row[idf]) if idf else str(i)
    if id_field and row.get(id_field) in (None, ""):
        raise RowError(f"missing field {id_field!r}", f"add {id_field!r} to every row")
    meta = {k: v for k, v in row.items() if k not in (tf, idf) and isinstance(v, (str, int, float, bool))}
    return Example(ex_id, "", (), -1, (), "", text, source, meta)


SOURCES = {
    "medqa-en": SourceSpec("medqa-en", "GBaker/MedQA-USMLE-4-options", None, "test", _medqa, None),
    "medqa-zh": SourceSpec("medqa-zh", "fzkuji/MedQA", "med_qa_zh_4options_source", "test", _medqa, None),
    "medmcqa": SourceSpec("medmcqa", "openlifescienceai/medmcqa", None, "validation", _medmcqa, 4),
    "pubmedqa": SourceSpec("pubmedqa", "qiaojin/PubMedQA", "pqa_labeled", "train", _pubmedqa, 3),
    "pmc-patients": SourceSpec("pmc-patients", "zhengyun21/PMC-Patients", None, "train", _pmc_patients, None),
    "notes": SourceSpec("notes", None, None, "train", _note, None),
}
SOURCE_NAMES = tuple(SOURCES) + ("icd10",)


def _file_format(path: str) -> str:
    suffixes = [s.lower() for s in pathlib.Path(path).suffixes]
    for s in reversed(suffixes):
        if s in (".json", ".jsonl"):
            return "json"
        if s in (".csv", ".parquet"):
            return s[1:]
    raise DataError(f"cannot read {path}: unknown file type; fix: use .jsonl, .json, .csv or .parquet")


def _local_split(split: Optional[str]) -> str:
    """With a plain list of local files the files are the split: keep only a slice such as '[:100]'."""
    m = re.match(r"^[^\[]*(\[.*\])?$", split or "")
    return "train" + ((m.group(1) or "") if m else "")


def _keyed_json(path: str) -> Optional[list]:
    """A JSON object {id: text | {..}} (the layout of seed 003's MIMIC summaries) as rows, else None."""
    if not str(path).endswith(".json"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or not obj or any(isinstance(v, list) for v in obj.values()):
        return None
    return [{"id": k, **(v if isinstance(v, dict) else {"text": v})} for k, v in obj.items()]


def load_rows(*, hub_id: Optional[str] = None, config: Optional[str] = None, data_files: DataFiles = None,
              split: Optional[str] = None, source: str = "data"):
    """Raw rows through ``datasets.load_dataset``: local files when given, else the hub id."""
    import datasets
    if data_files:
        if isinstance(data_files, dict):
            files = [f for v in data_files.values() for f in ([v] if isinstance(v, (str, os.PathLike)) else v)]
            split_name = split or next(iter(data_files))
        else:
            files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
            data_files, split_name = [str(f) for f in files], _local_split(split)
        for f in files:
            if not os.path.isfile(f) or not os.access(f, os.R_OK):
                raise DataError(f"{source}: cannot read {f}: no such readable file; fix: check the path "
                                f"(--data-files) and its permissions")
        if len(files) == 1 and (rows := _keyed_json(str(files[0]))) is not None:
            return rows
        fmt = _file_format(str(files[0]))
        try:
            return datasets.load_dataset(fmt, data_files=data_files, split=split_name)
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"{source}: cannot read {[str(f) for f in files]} as {fmt}: {type(e).__name__}: "
                            f"{_short(e)}; fix: repair the file (one JSON object per line for .jsonl, a header "
                            f"row for .csv) or convert it") from None
    if not hub_id:
        raise DataError(f"{source}: no data files and no hub id; fix: pass --data-files F (or data_files=...)")
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        raise DataError(f"{source}: cannot load {hub_id!r} (config {config}, split {split}): {type(e).__name__}: "
                        f"{_short(e)}; fix: connect to the hub once (or set HF_HOME to a cache that has it), or "
                        f"pass --data-files with local files in the same schema") from None


def _short(e: Exception) -> str:
    s = " ".join(str(e).split())
    m = re.search(r"Failed to (?:load|read).*", s)
    return (m.group(0) if m else s)[:300]


def load_source(name: str, *, data_files: DataFiles = None, split: Optional[str] = None,
                hub_id: Optional[str] = None, config: Optional[str] = None, limit: Optional[int] = None,
                policy: str = "raise", n_options: Optional[int] = None, **options) -> LoadResult:
    """Load and normalise one source. ``options`` go to the normaliser (``cop_base`` for MedMCQA,
    ``id_field``/``text_field`` for notes) or, for ``icd10``, to :func:`jaxpoison.data.icd10.load_icd10`."""
    check_policy(policy)
    if name == "icd10":
        from jaxpoison.data.icd10 import load_icd10
        return load_icd10(split or "train", limit=limit, **options)
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; fix: use one of {SOURCE_NAMES}")
    spec = SOURCES[name]
    split = split or spec.split
    rows = load_rows(hub_id=hub_id or spec.hub_id, config=config if config is not None else spec.config,
                     data_files=data_files, split=split, source=name)
    norm = partial(spec.normalise, source=name, split=re.sub(r"\[.*\]$", "", split), **options)
    return collect(rows, norm, name, policy, n_options if n_options is not None else spec.n_options, limit)


def read_rationale_file(path, examples: Sequence[Example], policy: str = "raise") -> tuple:
    """A JSONL of rationales keyed by example id: ``{"id", "rationale", "answer"?}`` per line.

    ``answer`` (optional) is an index or a letter. Returns ``({id: {"rationale", "answer" (int or None)}},
    report)``. Unknown ids, duplicates and lines without a rationale are errors (or skipped and listed in the
    report under 'skip').
    """
    check_policy(policy)
    by_id = {ex.id: ex for ex in examples}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read rationale file {path}: {e}; fix: check the path") from None
    out, report = {}, LoadReport(f"rationales {path}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.n_read += 1
        rec = None
        try:
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise RowError(f"not valid JSON ({e})", 'write one {"id": ..., "rationale": ...} per line') from None
            if not isinstance(rec, dict):
                raise RowError("not a JSON object", 'write one {"id": ..., "rationale": ...} per line')
            rid = str(rec.get("id", ""))
            if rid not in by_id:
                raise RowError(f"unknown id {rid!r}: no loaded example has it",
                               "use the ids of the loaded examples (`data show SOURCE --json` prints them)")
            if rid in out:
                raise RowError(f"id {rid!r} appears twice", "keep one rationale per id")
            text = rec.get("rationale")
            if not isinstance(text, str) or not text.strip():
                raise RowError("missing field 'rationale'", "add a non-empty rationale to every line")
            out[rid] = {"rationale": text.strip(), "answer": _answer_index(rec.get("answer"), by_id[rid])}
        except RowError as e:
            if policy == "raise":
                raise DataError(f"rationale file {path}: line {n}: {e}") from None
            report.skip(n, str(rec.get("id", "")) if isinstance(rec, dict) else "", str(e))
    report.n_kept = len(out)
    return out, report


def _answer_index(a, ex: Example) -> Optional[int]:
    if a is None or a == "":
        return None
    s = a.strip().upper() if isinstance(a, str) else None
    idx = LETTERS.index(s) if s and len(s) == 1 and s in LETTERS else a
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(ex.options):
        raise RowError(f"answer {a!r} is outside the {len(ex.options)} options of {ex.id}",
                       f"use a letter {LETTERS[:len(ex.options)]} or an index")
    return idx


def attach_rationales(examples: Sequence[Example], path, policy: str = "raise") -> list:
    """Clean rationales from a user JSONL (keyed by id) attached to the examples it names."""
    recs, _ = read_rationale_file(path, examples, policy)
    return [ex.replace(rationale=recs[ex.id]["rationale"]) if ex.id in recs else ex for ex in examples]
