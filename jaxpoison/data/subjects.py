"""Target-subject selection for targeted poisoning, and per-subject counts.

A target subject is chosen in one of three ways: by a label field (a MedMCQA ``subject_name``, an ICD-10-CM
chapter), by a keyword list matched over the question stem and the options (seed 000's fever target:
fever, febrile, pyrexia, 发热, 发烧), or by any user function ``Example -> bool``.

Keyword matching: Latin-script keywords match case-insensitively at the start of a word, so 'fever' also
matches 'fevers' and 'febrile' does not match 'afebrile'; keywords in scripts without spaces (Chinese) match
as plain substrings. An empty selection is an error, never a silently empty study.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from jaxpoison.data.schema import DataError, Example

FEVER_KEYWORDS = ("fever", "febrile", "pyrexia", "发热", "发烧")
KEYWORD_SUBJECTS = {"fever": FEVER_KEYWORDS}


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern:
    parts = []
    for k in keywords:
        k = k.strip()
        if not k:
            continue
        word = re.escape(k)
        parts.append(rf"\b{word}" if re.match(r"[A-Za-z0-9]", k) else word)
    if not parts:
        raise DataError("empty keyword list; fix: give at least one keyword")
    return re.compile("|".join(parts), re.IGNORECASE)


def keyword_matcher(keywords: Sequence[str], fields: Sequence[str] = ("question", "options")) -> Callable:
    """A predicate that is true when any keyword occurs in the chosen fields of an example."""
    pat = keyword_pattern(keywords)

    def match(ex: Example) -> bool:
        for f in fields:
            v = getattr(ex, f)
            if any(pat.search(t) for t in (v if isinstance(v, tuple) else (v,))):
                return True
        return False
    return match


def label_matcher(value: str, field: str = "subjects") -> Callable:
    """True when ``value`` is one of ``ex.subjects`` (default) or equals ``ex.meta[field]``."""
    if field == "subjects":
        return lambda ex: value in ex.subjects
    return lambda ex: ex.meta.get(field) == value


@dataclass
class SubjectSplit:
    name: str
    target: list
    rest: list
    how: str


def select_subject(examples: Sequence[Example], *, name: Optional[str] = None, label: Optional[str] = None,
                   label_field: str = "subjects", keywords: Optional[Sequence[str]] = None,
                   fn: Optional[Callable[[Example], bool]] = None,
                   fields: Sequence[str] = ("question", "options"), allow_empty: bool = False) -> SubjectSplit:
    """Split examples into the target subject and the rest; exactly one of label/keywords/fn is used.

    ``keywords`` may be a list or the name of a known keyword subject (``'fever'``).
    """
    given = [x is not None for x in (label, keywords, fn)]
    if sum(given) != 1:
        raise DataError("choose the target subject by exactly one of label=, keywords= or fn=; fix: pass one")
    if label is not None:
        pred, how, name = label_matcher(label, label_field), f"label {label_field}={label!r}", name or label
    elif keywords is not None:
        if isinstance(keywords, str):
            if keywords not in KEYWORD_SUBJECTS:
                raise DataError(f"unknown keyword subject {keywords!r}; fix: use one of {sorted(KEYWORD_SUBJECTS)} "
                                f"or pass a list of keywords")
            name, keywords = name or keywords, KEYWORD_SUBJECTS[keywords]
        pred, how, name = keyword_matcher(keywords, fields), f"keywords {list(keywords)}", name or keywords[0]
    else:
        pred, how, name = fn, f"function {getattr(fn, '__name__', 'fn')}", name or getattr(fn, "__name__", "target")
    target, rest = [], []
    for ex in examples:
        (target if pred(ex) else rest).append(ex)
    if not target and not allow_empty:
        seen = subject_counts({"all": examples})
        top = ", ".join(list(seen)[:8]) or "none"
        raise DataError(f"target subject {name!r} ({how}) selects no example out of {len(examples)}; fix: check "
                        f"the spelling/field, the source's subjects ({top}), or use keywords= instead")
    return SubjectSplit(name, target, rest, how)


def tag_subjects(examples: Sequence[Example], subjects: Mapping[str, Sequence[str]] = KEYWORD_SUBJECTS,
                 fields: Sequence[str] = ("question", "options")) -> list:
    """Add keyword subjects (e.g. 'fever') to ``ex.subjects`` where their keywords match."""
    matchers = {n: keyword_matcher(k, fields) for n, k in subjects.items()}
    out = []
    for ex in examples:
        extra = tuple(n for n, m in matchers.items() if n not in ex.subjects and m(ex))
        out.append(ex.replace(subjects=ex.subjects + extra) if extra else ex)
    return out


def subject_counts(splits: Mapping[str, Sequence[Example]]) -> dict:
    """{subject: {split: count}} over every subject label; examples without one count as '(none)'."""
    counts = collections.defaultdict(lambda: {s: 0 for s in splits})
    for split, exs in splits.items():
        for ex in exs:
            for s in ex.subjects or ("(none)",):
                counts[s][split] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))


def format_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """A plain-text table: one row per subject, one column per split."""
    if not counts:
        return "(no examples)"
    splits = list(next(iter(counts.values())))
    w = max(len("subject"), *(len(s) for s in counts))
    head = "subject".ljust(w) + "".join(f"  {s:>10}" for s in splits)
    rows = [s.ljust(w) + "".join(f"  {c[sp]:>10}" for sp in splits) for s, c in counts.items()]
    return "\n".join([head, "-" * len(head)] + rows)
