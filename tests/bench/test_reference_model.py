"""bench.common.torch_reference_model: transformers' model rebuilt from our weights is the model they came from."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from hf_tiny import make_hf_model
from jaxpoison.bench import common
from jaxpoison.models.lm import load_model


@pytest.mark.parametrize("family", ["llama_gqa_rope3", "qwen2_untied", "qwen3_qknorm"])
def test_reference_model_has_the_checkpoints_logits(family, tmp_path):
    # llama3 rope scaling, untied lm_head, tied lm_head with q/k norms and an explicit head_dim
    src = make_hf_model(family, seed=3)
    src.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), "float32", tokenizer=False)
    ref = common.torch_reference_model(lm.cfg, jax.tree.map(np.asarray, lm.params))
    assert type(ref) is type(src)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(3, lm.cfg.vocab_size, (2, 11)))
    with torch.no_grad():
        got, want = ref(input_ids=tokens).logits.numpy(), src(input_ids=tokens).logits.numpy()
    assert np.abs(want).max() > 0.01                       # a real signal, not zeros on both sides
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_reference_model_names_a_family_it_cannot_build():
    with pytest.raises(ValueError, match="'gpt2'.*llama"):
        common.torch_reference_model(SimpleNamespace(model_type="gpt2"), {})
