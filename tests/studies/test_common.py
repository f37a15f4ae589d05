"""A run folder resumes only with the same config; free text, the mesh and logging switches may differ. Both
studies' configs refuse another study's name and an unknown quantisation the same way."""
import dataclasses
import json

import pytest

from jaxpoison.configs import StudyConfigError
from jaxpoison.studies.attacks.config import AttacksConfig
from jaxpoison.studies.attacks.config import check_config as check_attacks
from jaxpoison.studies.common import prepare
from jaxpoison.studies.rationale.config import RationaleConfig
from jaxpoison.studies.rationale.config import check_config as check_rationale

CFG = {"name": "a", "mesh": {"variant": 1}, "train": {"learning_rate": 1e-3, "tensorboard": True}, "seed": 0}


def test_resume_ignores_logging_switches_but_not_training_fields(tmp_path):
    prepare(tmp_path, "rationale", CFG, resume=True, stale=())
    quiet = {**CFG, "name": "b", "mesh": {"variant": 8}, "train": {**CFG["train"], "tensorboard": False}}
    prepare(tmp_path, "rationale", quiet, resume=True, stale=())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["train"]["tensorboard"] is False
    with pytest.raises(StudyConfigError, match=r"different config \(train\)"):
        prepare(tmp_path, "rationale", {**quiet, "train": {**quiet["train"], "learning_rate": 2e-3}},
                resume=True, stale=())
    with pytest.raises(StudyConfigError, match=r"different config \(seed\)"):
        prepare(tmp_path, "rationale", {**quiet, "seed": 1}, resume=True, stale=())


@pytest.mark.parametrize("cfg, check", [(RationaleConfig(), check_rationale), (AttacksConfig(), check_attacks)])
def test_both_studies_refuse_a_foreign_study_name_and_an_unknown_quant(cfg, check):
    check(cfg)                                                  # the defaults pass
    other = "attacks" if cfg.study == "rationale" else "rationale"
    with pytest.raises(StudyConfigError, match=rf"^study: this is the '{cfg.study}' study, got '{other}'"):
        check(dataclasses.replace(cfg, study=other))
    with pytest.raises(StudyConfigError, match=r"^quant: one of .*'nf4'.*got 'fp4'"):
        check(dataclasses.replace(cfg, quant="fp4"))
    check(dataclasses.replace(cfg, quant="nf4"))
