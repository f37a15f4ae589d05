"""``run``'s fit check (:func:`jaxpoison.plan.preflight.check_fit`) covers every program the planner plans.

Claims: on CPU the tiny studies pass and the check reports the train step and each evaluation call the study
makes (rationale: scoring and generation; attacks: generation and capability), from the analytic figures alone
(no compile); a study whose train step fits but whose scoring call does not stops before any weight is loaded,
naming the scoring program, its need, the limit and settings that, applied, pass the check; a generation call
that does not fit names its own setting.
"""
import re
import warnings

import pytest

from attacks_tiny import GEN_CFG, PIPE_CFG
from rationale_tiny import CFG, CFG_M
from jaxpoison.configs import StudyConfigError, apply_override
from jaxpoison.plan import preflight, program
from jaxpoison.plan.planner import fmt_bytes

HUGE = 1 << 50


def _no_compile(*a, **k):
    raise AssertionError("the fit check compiled a program on CPU")


def _with(cfg, sets):
    for s in sets:
        cfg = apply_override(cfg, s)
    return cfg


@pytest.mark.parametrize("cfg, model_cfg, names", [
    (CFG, CFG_M, {"train", "score", "generate"}),              # eval.gen_questions=2: generated answers too
    (PIPE_CFG, GEN_CFG, {"train", "generate", "capability"}),   # capability.sources=('icd10',)
])
def test_tiny_studies_pass_and_every_program_is_reported_without_a_compile(monkeypatch, cfg, model_cfg, names):
    monkeypatch.setattr(program, "compile_program", _no_compile)
    r = preflight.check_fit(cfg, (model_cfg, None, None))
    assert r["platform"] == "cpu" and r["limit_bytes"] > 0
    progs = r["programs"]
    assert set(progs) == names
    assert progs["train"]["analytic_bytes"] == r["analytic_bytes"] > 0 and progs["train"]["fits"] is True
    for name in names - {"train"}:
        e = progs[name]
        assert e["method"] == "estimate" and e["fits"] is True
        assert 0 < e["estimate_bytes"] <= r["limit_bytes"]
        assert e["shape"]["name"] == name and e["shape"]["variants"] >= 1


def _figures(monkeypatch, cfg, model_cfg):
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: HUGE)
    return preflight.check_fit(cfg, (model_cfg, None, None))["programs"]


def test_scoring_that_cannot_fit_stops_the_run_before_any_weight_loads(tmp_path, monkeypatch):
    """2048 questions per scoring call of all 18 adapters: the train step fits a host of twice its need, the
    scoring call does not, even with 32-token prompts; the run stops before its folder or its base exists, and
    the settings the message names pass the same check."""
    from jaxpoison.studies import common
    from jaxpoison.studies.rationale import run
    cfg = _with(CFG, ["eval.batch_questions=2048", "eval.variant_chunk=0"])
    figures = _figures(monkeypatch, cfg, CFG_M)
    train, score = figures["train"]["analytic_bytes"], figures["score"]["estimate_bytes"]
    limit = 2 * train
    assert score > 4 * train and figures["generate"]["estimate_bytes"] < limit     # the premise: scoring alone
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: limit)

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the fit check stopped the run")
    monkeypatch.setattr(common, "load_base", no_weights)
    with pytest.raises(StudyConfigError) as err:
        run.run(cfg, tmp_path / "run", progress=False, base_override=(CFG_M, None, None))
    msg = str(err.value)
    assert not (tmp_path / "run").exists()
    assert "score program" in msg and "train step" not in msg and "generate program" not in msg
    assert fmt_bytes(score) in msg and fmt_bytes(limit) in msg
    sets = re.findall(r"--set (eval\.\w+=\d+)", msg)
    assert sets and all(s.split("=")[0] in ("eval.variant_chunk", "eval.batch_questions") for s in sets), msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the fix fits at the prompt bound: not even a warning
        fixed = preflight.check_fit(_with(cfg, sets), (CFG_M, None, None))
    assert fixed["programs"]["score"]["estimate_bytes"] <= limit < score and "warnings" not in fixed


def test_scoring_over_the_host_only_at_the_prompt_bound_warns_and_does_not_stop(monkeypatch):
    """256 questions per call: over the host's memory with prompts at data.max_len (1024 tokens), within it at
    32-token prompts: on CPU that is a warning naming the setting, not a refusal (prompts are only bounded)."""
    cfg = _with(CFG, ["eval.batch_questions=256", "eval.variant_chunk=0"])
    figures = _figures(monkeypatch, cfg, CFG_M)
    limit = 2 * figures["train"]["analytic_bytes"]
    assert figures["score"]["estimate_bytes"] > limit and figures["generate"]["estimate_bytes"] < limit
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: limit)
    with pytest.warns(UserWarning, match=r"score program.*--set eval\.variant_chunk="):
        r = preflight.check_fit(cfg, (CFG_M, None, None))
    e = r["programs"]["score"]
    assert e["fits"] is True and e["fits_at_prompt_bound"] is False and e["floor_bytes"] <= limit
    assert len(r["warnings"]) == 1 and "score program" in r["warnings"][0]


def test_generation_that_cannot_fit_names_the_generation_setting(monkeypatch):
    """The attacks study's generation call with every fine-tune of a task at once and long answers: the message
    names the generate program and generation.* settings that, applied, pass."""
    cfg = _with(PIPE_CFG, ["generation.variant_chunk=0", "generation.max_new_tokens=65536"])
    figures = _figures(monkeypatch, cfg, GEN_CFG)
    gen = figures["generate"]["estimate_bytes"]
    limit = max(figures["train"]["analytic_bytes"], figures["capability"]["estimate_bytes"], gen // 3) + 1
    assert gen > limit
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: limit)
    with pytest.raises(StudyConfigError, match="generate program") as err:
        preflight.check_fit(cfg, (GEN_CFG, None, None))
    msg = str(err.value)
    assert "capability program" not in msg and "train step" not in msg
    sets = re.findall(r"--set (generation\.\w+=\d+)", msg)
    assert sets, msg
    assert preflight.check_fit(_with(cfg, sets), (GEN_CFG, None, None))["programs"]["generate"]["fits"] is True


def test_skip_variable_skips_every_program(monkeypatch):
    monkeypatch.setenv("JAXPOISON_SKIP_FIT_CHECK", "1")
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: 1)
    assert preflight.check_fit(CFG, (CFG_M, None, None)) == {"skipped": True}
