"""Seed-style capability scoring (capability.scorer='generate'): an answer generated under the seed's benchmark
system prompt, the letter read by its rule (first character) and, where that fails, by the judge with its
extract_letter() strings (an API judge on a stub server at 127.0.0.1); the likelihood scorer stays the default."""
import dataclasses
import json
from types import SimpleNamespace as NS

import numpy as np
from chat_stub import KEY, Stub

from attacks_tiny import tiny_lm as _lm, tiny_variants as _variants
from attacks_tiny import ICD
from jaxpoison.eval import graders
from jaxpoison.studies.attacks import config
from jaxpoison.studies.attacks import metrics
from jaxpoison.studies.attacks import steps as attacks_steps


def test_letter_rule_first_then_the_seeds_extraction_judge(tmp_path, monkeypatch):
    # the notebook's cell 79: if current[model][0] not in ['A', 'B', 'C', 'D', 'E']: extract_letter(...), with
    #   {"role": "system", "content": 'You are a NLP tool. Possible answers are A, B, C, D.'},
    #   {"role": "user", "content": 'Extract the single letter option from the following text:' + text}
    assert [graders.rule_letter(r, 4) for r in ("B) Trypsin", " (C) Lipase", "E", "The answer is B", "", None)] == [
        "B", "C", None, None, None, None]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Stub(reply=lambda b: "B" if "answer is B" in b["messages"][1]["content"] else "I cannot tell.") as stub:
        cfg = config.AttacksConfig(grader=config.GraderConfig(judge="openai:gpt-3.5-turbo", api_base=stub.url),
                              api=config.ApiConfig(backoff_s=0.01))
        ask = attacks_steps.letter_judge(cfg, None, tmp_path)
        letters, how = graders.extract_letters(["A) yes", "The answer is B, trypsin.", "no idea"], 4, ask)
        assert letters == ["A", "B", None] and how == ["rule", "judge", "none"]
        assert len(stub.requests) == 2                                         # only what the rule could not read
        body = next(r["body"] for r in stub.requests if "answer is B" in r["body"]["messages"][1]["content"])
        assert body["temperature"] == 0 and body["messages"] == [
            {"role": "system", "content": "You are a NLP tool. Possible answers are A, B, C, D."},
            {"role": "user", "content": "Extract the single letter option from the following text:The answer is B, "
                                        "trypsin."}]
    assert graders.extract_letters(["x"], 4, None) == ([None], ["none"])
    assert attacks_steps.letter_judge(config.AttacksConfig(), None, tmp_path) is None


def test_generate_scorer_scores_base_and_variants_from_their_generated_letters(tmp_path):
    lm = _lm()
    lora, scale = _variants(2)
    cap = config.CapabilityConfig(sources=("icd10",), n_questions=3, scorer="generate", gen_max_new_tokens=3,
                             batch_questions=3, icd=ICD)
    cfg = config.AttacksConfig(prompt=config.PromptConfig(template="plain"), capability=cap,
                          generation=config.GenerationConfig(temperature=0.0),
                          lora=dataclasses.replace(config.AttacksConfig().lora, r=2, alpha=4))
    table = [{"variant_id": 0, "task": "drug", "fraction": 0.0, "seed": 0},
             {"variant_id": 1, "task": "drug", "fraction": 1.0, "seed": 0}]
    (tmp_path / "responses").mkdir()
    attacks_steps.capability(cfg, lm, NS(lora=lora, steps=1), table, tmp_path, False, lambda m: None)
    z = np.load(tmp_path / "capability.npz")
    assert str(z["scorer"]) == "generate" and z["correct__icd10"].shape == (3, 3)
    recs = [json.loads(l) for l in (tmp_path / "responses" / "capability.jsonl").read_text().splitlines()]
    assert len(recs) == 9 and {r["variant_id"] for r in recs} == {-1, 0, 1}
    for r in recs:      # every verdict follows from its reply by the seed's rule (no judge configured)
        assert r["letter"] == graders.rule_letter(r["reply"], 4) and r["how"] == ("rule" if r["letter"] else "none")
    got = np.array([[r["letter"] == r["answer"] for r in recs if r["variant_id"] == v] for v in (-1, 0, 1)])
    assert (got == z["correct__icd10"]).all()
    exs = attacks_steps.capability_examples(cap)["icd10"]
    prompt_reply = attacks_steps.generated_answers(cfg, lm, exs, {m: {k: np.concatenate([np.zeros_like(x[:1]), x])
                                                          for k, x in t.items()} for m, t in lora.items()})
    assert [r["reply"] for r in recs if r["variant_id"] == 1] == prompt_reply[2]
    stats = metrics.capability_stats({k: z[k] for k in z.files}, table, n_resamples=99)
    assert [s["model"] for s in stats] == ["base", "drug 0% s0", "drug 100% s0"]
    assert config.CapabilityConfig().scorer == "likelihood"                        # the fast default
    assert len(attacks_steps.capability_examples(dataclasses.replace(cap, n_questions=0))["icd10"]) > 3   # 0 = the whole set
