"""One example schema for every source, and the checks that keep bad rows out.

Every loader (MedQA, MedMCQA, PubMedQA, PMC-Patients, local notes, the embedded ICD-10-CM set) turns its
rows into :class:`Example`. Multiple-choice items carry ``options`` and an ``answer`` index; patient notes
carry their text in ``context`` with no options and ``answer == -1``.

Bad input never disappears quietly. Under the default policy ``'raise'`` the first bad row stops the load
with a :class:`DataError` that names the row and says how to fix it. Under ``'skip'`` the bad rows are left
out and each one is listed, with its reason, in a :class:`LoadReport`.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
POLICIES = ("raise", "skip")


class DataError(ValueError):
    """Bad input. The message names the file or row and says how to fix it."""


class RowError(DataError):
    """One bad row. ``reason`` says what is wrong and ``fix`` says what to do about it."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason}; fix: {fix}")
        self.reason, self.fix = reason, fix


@dataclass(frozen=True)
class Example:
    """A normalised example.

    ``answer`` indexes ``options``; it is -1 for free-text items such as patient notes. ``subjects`` holds
    labels such as a MedMCQA subject, an ICD-10-CM chapter, or a keyword subject like 'fever'.
    """
    id: str
    question: str
    options: tuple = ()
    answer: int = -1
    subjects: tuple = ()
    rationale: str = ""
    context: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_mc(self) -> bool:
        return len(self.options) > 0

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer] if self.answer >= 0 else ""

    @property
    def subject(self) -> str:
        return self.subjects[0] if self.subjects else ""

    def replace(self, **kw) -> "Example":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        """The ``data show --json`` record."""
        return {"id": self.id, "question": self.question, "options": list(self.options),
                "answer": self.answer, "answer_letter": self.answer_letter, "subject": self.subject,
                "subjects": list(self.subjects), "rationale": self.rationale, "context": self.context,
                "source": self.source}


class SeqRow(NamedTuple):
    """One training sequence before tokenization: the model sees prompt + completion (+ eos)."""
    row_id: str
    prompt: str
    completion: str
    meta: dict


@dataclass
class LoadReport:
    """What a load read, kept and skipped (with the reason for each skipped row)."""
    source: str
    n_read: int = 0
    n_kept: int = 0
    skipped: list = field(default_factory=list)  # (row number, id or '', reason)

    def skip(self, row: int, ex_id: str, reason: str) -> None:
        self.skipped.append((row, ex_id, reason))

    def summary(self) -> str:
        lines = [f"{self.source}: read {self.n_read}, kept {self.n_kept}, skipped {len(self.skipped)}"]
        lines += [f"  row {r} (id {i or '?'}): {why}" for r, i, why in self.skipped]
        return "\n".join(lines)


@dataclass
class LoadResult:
    examples: list
    report: LoadReport


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise DataError(f"unknown error policy {policy!r}; fix: use one of {POLICIES}")


def check_example(ex: Example) -> None:
    """Raise :class:`RowError` if one example is malformed on its own."""
    if not str(ex.id).strip():
        raise RowError("empty id", "give every row a unique, non-empty id")
    if ex.is_mc:
        if not ex.question.strip():
            raise RowError("empty question", "fill in the question text or drop the row")
        if len(ex.options) < 2:
            raise RowError(f"only {len(ex.options)} option(s)", "a multiple-choice row needs at least 2 options")
        if len(ex.options) > len(LETTERS):
            raise RowError(f"{len(ex.options)} options", f"at most {len(LETTERS)} options are supported")
        for k, o in enumerate(ex.options):
            if not isinstance(o, str) or not o.strip():
                raise RowError(f"option {LETTERS[k]} is empty", "fill in every option text")
        if not 0 <= ex.answer < len(ex.options):
            raise RowError(f"answer index {ex.answer} is outside the {len(ex.options)} options",
                           f"set the answer to one of {LETTERS[:len(ex.options)]} (index 0..{len(ex.options) - 1})")
    elif not (ex.question.strip() or ex.context.strip()):
        raise RowError("no text (question and context both empty)", "fill in the note/question text or drop the row")


def collect(rows: Iterable, normalise: Callable[[dict, int], Example], source: str, policy: str = "raise",
            n_options: Optional[int] = None, limit: Optional[int] = None) -> LoadResult:
    """Normalise raw rows, then check the set (duplicate ids, option counts) under an error policy."""
    check_policy(policy)
    report = LoadReport(source)
    kept = []
    for i, row in enumerate(rows):
        if limit is not None and len(kept) >= limit:
            break
        report.n_read += 1
        try:
            ex = normalise(row, i)
            check_example(ex)
        except RowError as e:
            rid = _guess_id(row)
            if policy == "raise":
                raise DataError(f"{source}: row {i} (id {rid or '?'}): {e}") from None
            report.skip(i, rid, str(e))
            continue
        kept.append((i, ex))
    examples = validate_set(kept, source, policy, report, n_options)
    report.n_kept = len(examples)
    return LoadResult(examples, report)


def validate_set(indexed: Sequence, source: str, policy: str = "raise", report: Optional[LoadReport] = None,
                 n_options: Optional[int] = None) -> list:
    """Set-level checks over ``(row number, Example)`` pairs: duplicate ids and mismatched option counts.

    With ``n_options=None`` the expected count is the most common one among multiple-choice rows.
    """
    check_policy(policy)
    report = report if report is not None else LoadReport(source)
    counts = collections.Counter(len(ex.options) for _, ex in indexed if ex.is_mc)
    expect = n_options if n_options is not None else (counts.most_common(1)[0][0] if counts else None)
    seen, out = {}, []
    for i, ex in indexed:
        problem = None
        if ex.id in seen:
            problem = (f"duplicate id {ex.id!r} (first seen at row {seen[ex.id]})",
                       "make ids unique, e.g. prefix them with the split or file name")
        elif ex.is_mc and expect is not None and len(ex.options) != expect:
            problem = (f"{len(ex.options)} options where the set has {expect}",
                       f"pass n_options={len(ex.options)} if that is intended, or repair/drop the row")
        if problem:
            msg = f"{problem[0]}; fix: {problem[1]}"
            if policy == "raise":
                raise DataError(f"{source}: row {i} (id {ex.id}): {msg}")
            report.skip(i, ex.id, msg)
            continue
        seen[ex.id] = i
        out.append(ex)
    return out


def validate_examples(examples: Sequence[Example], source: str = "examples", policy: str = "raise",
                      n_options: Optional[int] = None) -> LoadResult:
    """Check already-built examples (row checks and set checks) under an error policy."""
    return collect(examples, lambda ex, i: ex, source, policy, n_options)


def _guess_id(row) -> str:
    if isinstance(row, Example):
        return row.id
    if isinstance(row, dict):
        for k in ("id", "patient_uid", "pubid", "note_id", "key"):
            if row.get(k) not in (None, ""):
                return str(row[k])
    return ""
