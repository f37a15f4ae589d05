"""A run folder resumes only with the same config; free text, the mesh and logging switches may differ."""
import json

import pytest

from jaxpoison.configs import StudyConfigError
from jaxpoison.studies.common import prepare

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
