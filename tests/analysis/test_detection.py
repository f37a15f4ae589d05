"""detection's plot groups: labels per variant and their reading order."""
import numpy as np

from jaxpoison.analysis import detection


def test_group_order_puts_clean_then_forgetting_then_poison_levels_ascending():
    variants = [{"kind": "clean"}, {"kind": "rationale"}, {"kind": "forgetting"}, {"kind": "rationale"},
                {"kind": "rationale"}, {"kind": "clean"}]
    labels = {"poisoned": [False, True, False, True, True, False], "level": np.array([0, 16, 0, 2, np.nan, 0.0])}
    groups = detection.group_labels(variants, labels)
    assert groups.tolist() == ["clean", "poisoned (16)", "forgetting", "poisoned (2)", "poisoned", "clean"]
    assert detection.group_order(groups) == ["clean", "forgetting", "poisoned (2)", "poisoned (16)", "poisoned"]
