"""Generation options and HF-directory tokenizers, on a tiny random model."""
import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from hf_tiny import make_hf_model, save_tiny_tokenizer
from jaxpoison.cli import main as cli_main
from jaxpoison.models.generate import generate_text, sample_token
from jaxpoison.models.lm import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinytok")
    make_hf_model("qwen3_qknorm", seed=7).save_pretrained(d)
    save_tiny_tokenizer(d)
    return d


def test_hf_directory_loads_autotokenizer(tiny_dir):
    lm = load_model(str(tiny_dir))
    ids = lm.tokenizer.encode("w5 w17 w200", add_special_tokens=False)
    assert ids == [5, 17, 200]
    assert lm.eos_ids == (2,) and lm.pad_id == 0


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_dir):
    lm = load_model(str(tiny_dir))
    prompts = ["w5 w6 w7", "w100 w3"]
    greedy = generate_text(lm, prompts, max_new_tokens=8)
    s1 = generate_text(lm, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    s1b = generate_text(lm, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    s2 = generate_text(lm, prompts, max_new_tokens=8, temperature=1.0, seed=2)
    nucleus = generate_text(lm, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3)
    assert s1 == s1b and s1 != s2
    assert nucleus == greedy


def test_top_p_keeps_the_nucleus_only():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_token(k, logits, 1.0, 0.7))(jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.unique(np.asarray(draws)).tolist()) == {0, 1}


def test_generation_stops_at_eos_and_batches_agree(tiny_dir):
    lm = load_model(str(tiny_dir))
    prompts = ["w5 w6 w7", "w100 w3", "w9"]
    together = generate_text(lm, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_text(lm, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone


def test_score_cli_with_adapter(tiny_dir, tmp_path, capsys):
    from jaxpoison.train.export import save_peft_adapter
    from jaxpoison.train.lora import LoraConfig, init_lora
    lm = load_model(str(tiny_dir))
    lc = LoraConfig(r=2, alpha=4, targets=("v",))
    lora = init_lora(jax.random.PRNGKey(0), lm.cfg, lc)
    lora["v"]["b"] = 0.5 * jnp.ones_like(lora["v"]["b"])
    save_peft_adapter(tmp_path / "ad", lora, lm.cfg, 2, 4, "alpha/r")
    text = "w5 w6 w7 w8 w9"
    assert cli_main(["score", "--model", str(tiny_dir), "--text", text, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli_main(["score", "--model", str(tiny_dir), "--text", text, "--json", "--adapter", str(tmp_path / "ad")]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert plain["tokens"] == adapted["tokens"]
    assert abs(plain["ppl"] - adapted["ppl"]) > 1e-3


def test_bfloat16_params_and_compute_track_fp32(tiny_dir):
    from jaxpoison.models.lm import sequence_logprobs
    f32, b16 = load_model(str(tiny_dir), "float32"), load_model(str(tiny_dir), "bfloat16")
    assert jax.tree.leaves(b16.params)[0].dtype == jnp.bfloat16
    t = jnp.asarray([[5, 6, 7, 8, 9, 10, 11]], jnp.int32)
    m = jnp.ones_like(t, bool)
    a = np.asarray(sequence_logprobs(f32.params, t, m, cfg=f32.cfg))
    b = np.asarray(sequence_logprobs(b16.params, t, m, cfg=b16.cfg, dtype=jnp.bfloat16))
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.1


def test_cached_decode_equals_full_recompute(tiny_dir):
    """Greedy decoding through the KV cache (decode attention reads the filled slots only, in blocks of 16 over
    a 26-slot cache, the last block clamped) picks, at every step, the argmax of a full forward pass without a
    cache over the prompt and the tokens generated so far."""
    from jaxpoison.models.attention import decode_block
    from jaxpoison.models.decoder import Decoder
    from jaxpoison.models.generate import generate_tokens, left_pad
    from jaxpoison.models.heads import logits as head_logits
    lm = load_model(str(tiny_dir), tokenizer=False)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, lm.cfg.vocab_size, n).tolist() for n in (5, 16, 9)]
    P, N = 16, 10
    assert decode_block(P + N) == 16
    toks, mask = left_pad(prompts, 0, P)
    out, _ = generate_tokens(lm.params, jnp.asarray(toks), jnp.asarray(mask), jnp.zeros(2, jnp.uint32),
                             cfg=lm.cfg, max_new_tokens=N, eos_ids=(), pad_id=0)
    out = np.asarray(out)
    assert len({tuple(r) for r in out}) == 3
    full = np.concatenate([toks, out], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out, bool)], axis=1)
    hidden, _ = Decoder(lm.cfg).apply({"params": lm.params}, jnp.asarray(full), jnp.asarray(full_mask))
    picks = np.asarray(jnp.argmax(head_logits(lm.params, lm.cfg, hidden[:, P - 1:P + N - 1]), -1))
    np.testing.assert_array_equal(picks, out)
