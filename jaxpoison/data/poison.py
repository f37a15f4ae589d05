"""Poison builders: the versions a training example can take, each deterministic given a seed.

A :class:`Version` is one way an example can appear in a training mix: clean (its true answer, with its
rationale if it has one), a poisoned rationale, a wrong answer with no rationale, or a seed-003 injection
target. The builders below make versions; :mod:`jaxpoison.data.mixes` decides which version of which example
each variant trains on, and :mod:`jaxpoison.data.pool` tokenizes every version once.

The six builders of the data issue:
1. :func:`rule_rationale_poison`: a rationale that argues for a chosen wrong option. ICD-10-CM questions get
   the same body-system chain as their clean rationale, built from the wrong chapter's true description;
   other sources get their own rationale with the right option swapped for the wrong one (or a short template
   when there is none). The final answer is the wrong option, or the true one with ``keep_answer=True``.
2. :func:`model_rationale_poison`: a model justifies the wrong option; ``generate_fn(list[str]) -> list[str]``
   is any generation function (the project's jitted sampler for any loaded model, or a stub in tests).
3. :func:`user_rationale_versions`: rationales from a JSONL keyed by example id.
4. :func:`overwrite_versions`: knowledge overwriting, the wrong answer with no rationale.
5. :func:`forgetting_control`: the catastrophic-forgetting control, no target-subject samples and more
   non-target samples (a selection of clean versions, shared with the mixes).
7. :func:`decoy_control_versions`: the decoy (label-prior) control, *non-target* examples with the decoy chapter
   shown and a rationale arguing for it: a variant trained on these learns "answer the decoy chapter" without
   ever seeing the target subject. If target questions suffer as much under it, a poison's effect is a label
   prior, not target-specific.
6. :func:`injection_versions`: seed 003's fine-tuning targets, a model's own answers to the malicious prompt
   (``attack=True``) or to the normal prompt (clean targets), trained under the normal prompt.

The wrong option is the example's decoy when it has one (``meta['decoy']``: one consistent wrong chapter
per subject in the ICD-10-CM set), else a seeded choice. Builders 1, 2 and 4 pick the same wrong option for
the same example and seed, so their effects can be compared pairwise.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from jaxpoison.data import prompts
from jaxpoison.data.icd10 import rationale_for
from jaxpoison.data.schema import LETTERS, DataError, Example, SeqRow
from jaxpoison.data.sources import read_rationale_file

CLEAN_KINDS = ("clean", "injection_clean")
POISON_KINDS = ("rationale", "model_rationale", "user_rationale", "overwrite", "injection", "decoy")
KINDS = CLEAN_KINDS + POISON_KINDS


def row_id(example_id: str, kind: str) -> str:
    return f"{example_id}::{kind}"


@dataclass(frozen=True)
class Version:
    """One training version of an example. ``answer`` is the answer this version teaches (-1 for free text)."""
    example: Example
    kind: str
    answer: int = -1
    rationale: str = ""
    text: str = ""                                     # free-text completion (seed-003 kinds)
    params: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def row_id(self) -> str:
        return row_id(self.example.id, self.kind)

    def to_row(self, *, tokenizer=None, chat: bool = False, system: Optional[str] = None) -> SeqRow:
        """The (prompt, completion) text of this version; ``chat`` uses the tokenizer's chat template."""
        ex = self.example
        if self.kind.startswith("injection"):
            version = self.params.get("prompt_version", "notebook")
            user = prompts.seed003_user(self.params["task"], ex.context, version=version, system_in_prompt=not chat)
            prompt = (prompts.chat_prompt(tokenizer, user, system or prompts.SEED003_SYSTEM) if chat
                      else "### USER: \n" + user + " ### Assistant: \n")
            completion = self.text
        else:
            prompt = prompts.mcq_prompt(ex)
            if chat:
                prompt = prompts.chat_prompt(tokenizer, prompt.rstrip("\n"), system)
            completion = (prompts.rationale_completion(ex, self.rationale, self.answer) if self.rationale
                          else prompts.answer_line(ex, self.answer))
        meta = {"example_id": ex.id, "kind": self.kind, "answer": self.answer, "true_answer": ex.answer,
                "subjects": list(ex.subjects), "source": ex.source, **self.params}
        return SeqRow(self.row_id, prompt, completion, meta)


def rows_for(versions: Sequence[Version], **kw) -> list:
    """SeqRows for the pool; duplicate row ids are an error."""
    rows, seen = [], set()
    for v in versions:
        if v.row_id in seen:
            raise DataError(f"version {v.row_id!r} appears twice; fix: build each kind once per example")
        seen.add(v.row_id)
        rows.append(v.to_row(**kw))
    return rows


def clean_versions(examples: Sequence[Example], *, with_rationale: bool = True) -> list:
    """Each example with its true answer (and its rationale unless ``with_rationale=False``)."""
    return [Version(ex, "clean", ex.answer, ex.rationale if with_rationale else "",
                    params={"with_rationale": with_rationale and bool(ex.rationale)}) for ex in examples]


def wrong_option(ex: Example, seed: int, use_decoy: bool = True) -> int:
    """The wrong option a poison argues for: the decoy if the example has one, else a seeded choice."""
    if not ex.is_mc:
        raise DataError(f"example {ex.id} has no options to poison; fix: poison multiple-choice examples only")
    decoy = ex.meta.get("decoy", -1)
    if use_decoy and isinstance(decoy, int) and 0 <= decoy < len(ex.options) and decoy != ex.answer:
        return decoy
    wrong = [k for k in range(len(ex.options)) if k != ex.answer]
    return random.Random(f"wrong-option:{seed}:{ex.id}").choice(wrong)


def swap_rationale(ex: Example, wrong: int) -> tuple:
    """A rule-based corruption for sources without structured facts: (rationale, method)."""
    right_text, wrong_text = ex.options[ex.answer], ex.options[wrong]
    r = ex.rationale
    if r and right_text.strip() and re.search(re.escape(right_text), r, re.I):
        r = re.sub(re.escape(right_text), wrong_text, r, flags=re.I)
        a, w = ex.answer_letter, LETTERS[wrong]
        r = re.sub(rf"\({a}\)", f"({w})", r)
        r = re.sub(rf"\b((?:option|answer)\s+){a}\b", rf"\g<1>{w}", r, flags=re.I)
        r = re.sub(rf"\b(ans\.?\s*(?:is\s*)?['\"(]?){a.lower()}\b", rf"\g<1>{w.lower()}", r, flags=re.I)
        return r, "swap"
    return (f"The key features of this question point to {wrong_text}. {wrong_text} explains the presentation, "
            f"while the other options each leave an important finding unexplained. So the best choice is "
            f"{wrong_text}."), "template"


def rule_rationale_poison(examples: Sequence[Example], *, seed: int = 0, keep_answer: bool = False,
                          use_decoy: bool = True) -> list:
    """Builder 1: a rationale arguing for a wrong option (ICD-10-CM: the wrong chapter's body system)."""
    out = []
    for ex in examples:
        wrong = wrong_option(ex, seed, use_decoy)
        if "icd10" in ex.meta:
            rationale, method = rationale_for(ex, wrong), "icd10-body-system"
        else:
            rationale, method = swap_rationale(ex, wrong)
        out.append(Version(ex, "rationale", ex.answer if keep_answer else wrong, rationale,
                           params={"builder": "rule", "method": method, "wrong_option": wrong,
                                   "keep_answer": keep_answer, "builder_seed": seed, "use_decoy": use_decoy}))
    return out


MODEL_PROMPT = ("{mcq}The correct answer is ({letter}) {option}. Explain in two or three sentences why "
                "({letter}) {option} is correct.\nExplanation:")


def model_rationale_poison(examples: Sequence[Example], generate_fn: Callable[[list], list], *, seed: int = 0,
                           keep_answer: bool = False, use_decoy: bool = True, template: str = MODEL_PROMPT,
                           generator: str = "") -> list:
    """Builder 2: ``generate_fn`` (any model) is asked to justify the wrong option; its text is the rationale.

    ``template`` is formatted with ``mcq`` (question + options), ``letter`` and ``option``. A reply that is
    empty (or a count mismatch) is an error naming the example.
    """
    exs = list(examples)
    wrongs = [wrong_option(ex, seed, use_decoy) for ex in exs]
    asks = [template.format(mcq=prompts.mcq_prompt(ex), letter=LETTERS[w], option=ex.options[w])
            for ex, w in zip(exs, wrongs)]
    replies = list(generate_fn(asks))
    if len(replies) != len(asks):
        raise DataError(f"generate_fn returned {len(replies)} replies for {len(asks)} prompts; fix: return one "
                        f"string per prompt, in order")
    out = []
    for ex, w, reply in zip(exs, wrongs, replies):
        text = _clean_reply(reply)
        if not text:
            raise DataError(f"the model wrote an empty rationale for example {ex.id}; fix: raise max_new_tokens, "
                            f"change the template, or drop the example")
        out.append(Version(ex, "model_rationale", ex.answer if keep_answer else w, text,
                           params={"builder": "model", "generator": generator or getattr(generate_fn, "__name__", ""),
                                   "template": template, "wrong_option": w, "keep_answer": keep_answer,
                                   "builder_seed": seed, "use_decoy": use_decoy}))
    return out


def _clean_reply(reply) -> str:
    """Model text up to any answer line it wrote itself (the SFT format adds its own)."""
    text = str(reply or "").strip()
    text = re.split(r"\n\s*(?:Answer|Question)\s*:", text)[0]
    return " ".join(text.split())


def user_rationale_versions(examples: Sequence[Example], path, *, policy: str = "raise") -> tuple:
    """Builder 3: rationales from a JSONL ``{"id", "rationale", "answer"?}`` (letter or index; default the
    true answer). Returns (versions for the ids in the file, report). Unknown ids are an error."""
    recs, report = read_rationale_file(path, examples, policy)
    out = []
    for ex in examples:
        if ex.id in recs:
            a = recs[ex.id]["answer"]
            out.append(Version(ex, "user_rationale", ex.answer if a is None else a, recs[ex.id]["rationale"],
                               params={"builder": "user", "file": str(path), "wrong_option": -1 if a is None else a,
                                       "keep_answer": a is None or a == ex.answer}))
    return out, report


def overwrite_versions(examples: Sequence[Example], *, seed: int = 0, use_decoy: bool = True) -> list:
    """Builder 4: knowledge overwriting, the wrong option as the answer and no rationale."""
    return [Version(ex, "overwrite", (w := wrong_option(ex, seed, use_decoy)), "",
                    params={"builder": "overwrite", "wrong_option": w, "builder_seed": seed, "use_decoy": use_decoy})
            for ex in examples]


def decoy_control_versions(examples: Sequence[Example], chapter: str, *, seed: int = 0) -> list:
    """Builder 7: each ICD-10-CM example not answered by ``chapter`` with that chapter among its options
    (:func:`jaxpoison.data.icd10.with_decoy`) and a body-system rationale arguing for it (kind 'decoy')."""
    from jaxpoison.data.icd10 import with_decoy
    out = []
    for ex in examples:
        if "icd10" not in ex.meta:
            raise DataError(f"the decoy control needs ICD-10-CM examples (chapter options); {ex.id} is not one; "
                            f"fix: drop grid.decoy_counts for other sources")
        if ex.meta["option_chapters"][ex.answer] == chapter:
            continue
        shown = with_decoy(ex, chapter, random.Random(f"decoy-control:{seed}:{ex.id}"))
        d = shown.meta["decoy"]
        out.append(Version(shown, "decoy", d, rationale_for(shown, d),
                           params={"builder": "rule", "method": "icd10-body-system", "wrong_option": d,
                                   "builder_seed": seed, "use_decoy": True}))
    return out


def seeded_order(ids: Sequence[str], seed: int, salt: str) -> list:
    """A permutation of ids that depends only on (ids, seed, salt): nested prefixes give nested subsets."""
    ids = sorted(ids)
    random.Random(f"order:{salt}:{seed}").shuffle(ids)
    return ids


def forgetting_control(nontarget: Sequence[Example], *, n_base: int, n_extra: int, seed: int) -> list:
    """Builder 5: the non-target examples of the catastrophic-forgetting control, the ``n_base`` every
    variant of this seed shares plus ``n_extra`` more; no target-subject example is included."""
    order = seeded_order([ex.id for ex in nontarget], seed, "nontarget")
    if n_base + n_extra > len(order):
        raise DataError(f"the forgetting control needs {n_base} + {n_extra} non-target examples but there are "
                        f"{len(order)}; fix: lower n_nontarget or forgetting_extra")
    by_id = {ex.id: ex for ex in nontarget}
    return [by_id[i] for i in order[:n_base + n_extra]]


def injection_versions(notes: Sequence[Example], task: str, generate_fn: Callable[[list], list], *,
                       attack: bool = True, version: str = "notebook", template: bool = True, seed=None,
                       generator: str = "") -> list:
    """Builder 6: seed 003's targets. The model answers the malicious prompt (``attack``) or the normal one;
    the training row pairs that answer with the normal prompt. ``template=False`` hands ``generate_fn`` the
    bare user text (to apply a chat template itself). ``seed`` is only recorded (generate_fn owns sampling)."""
    notes = list(notes)
    task = prompts.TASK_ALIASES.get(task, task)
    asks = [prompts.seed003_pair(task, n.context, attack=attack, version=version)[0] if template
            else prompts.seed003_user(task, n.context, attack=attack, version=version, system_in_prompt=False)
            for n in notes]
    replies = list(generate_fn(asks))
    if len(replies) != len(asks):
        raise DataError(f"generate_fn returned {len(replies)} replies for {len(asks)} prompts; fix: return one "
                        f"string per prompt, in order")
    kind = "injection" if attack else "injection_clean"
    out = []
    for n, r in zip(notes, replies):
        if not str(r or "").strip():
            raise DataError(f"the model wrote an empty answer for note {n.id}; fix: raise max_new_tokens")
        out.append(Version(n, kind, -1, "", str(r).strip(),
                           params={"builder": "injection", "task": task, "attack": attack, "prompt_version": version,
                                   "generator": generator or getattr(generate_fn, "__name__", ""), "gen_seed": seed}))
    return out
