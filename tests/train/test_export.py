"""A run's adapter exported in PEFT format gives the same log-probs under transformers + peft as under jaxpoison."""
import json
import numpy as np
import pytest
import jax.numpy as jnp

from hf_tiny import hf_logprobs, make_hf_model
from jaxpoison.cli import main as cli_main
from jaxpoison.models.lm import load_model, sequence_logprobs
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static
from jaxpoison.train.export import load_peft_adapter
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.trainer import StudyData, train_study


def test_export_roundtrip_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    hf = make_hf_model("qwen2_untied", seed=5)
    hf.save_pretrained(tmp_path / "base")
    lm = load_model(str(tmp_path / "base"), tokenizer=False)
    rng = np.random.default_rng(0)
    R, T = 16, 12
    tokens = rng.integers(3, lm.cfg.vocab_size, (R, T)).astype(np.int32)
    attn = np.ones((R, T), bool)
    sd = StudyData(tokens, np.ones((R, T), np.float32), attn, np.tile(np.arange(R), (2, 1)).astype(np.int32),
                   np.array([R, R], np.int32), [{"variant_id": 0, "seed": 0}, {"variant_id": 1, "seed": 1}], "h")
    lc = LoraConfig(r=4, alpha=16, targets=("q", "v", "gate", "down"), scale_rule="rslora")
    st = Static(lm.cfg, TrainConfig(learning_rate=2e-2, epochs=2, batch_size=4, log_every=4), lc)
    res = train_study(lm.params, st, sd, run_dir=str(tmp_path / "run"), progress=False, base_name="tiny")
    assert np.abs(np.asarray(res.lora["q"]["b"][1])).max() > 1e-3   # the adapter really moved

    assert cli_main(["export", str(tmp_path / "run"), "--variant", "1", "--out", str(tmp_path / "ad")]) == 0
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["use_rslora"] is True
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "v_proj", "gate_proj", "down_proj"])

    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    x = rng.integers(3, lm.cfg.vocab_size, (3, 10)).astype(np.int32)
    mask = np.ones_like(x, bool)
    ref = hf_logprobs(model, x, mask)
    lora, scale = load_peft_adapter(tmp_path / "ad", lm.cfg)
    assert scale == pytest.approx(16 / 2.0)
    ours = np.asarray(sequence_logprobs(lm.params, jnp.asarray(x), jnp.asarray(mask), cfg=lm.cfg,
                                        lora=lora, lora_scale=scale))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    base_only = np.asarray(sequence_logprobs(lm.params, jnp.asarray(x), jnp.asarray(mask), cfg=lm.cfg))
    assert np.abs(base_only - ours).max() > 1e-3   # the adapter changes the model, so the match means something


def test_export_bad_variant_and_missing_run(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope"), "--variant", "0", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
