"""The embedded SmolLM2-135M in our decoder: sane perplexities, the right answer, and transformers' numbers."""
import json

import numpy as np
import pytest
import jax.numpy as jnp
import torch
import transformers

from jaxpoison.cli import main as cli_main
from jaxpoison.models.generate import generate_text, generate_tokens, left_pad
from jaxpoison.models.hf import to_hf_state_dict
from jaxpoison.models.lm import load_model, sequence_logprobs

pytestmark = pytest.mark.slow
SENTENCE = "The heart pumps blood through the body, and the lungs supply it with oxygen."


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def torch_model(lm):
    c = lm.cfg
    hc = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                  head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                                  tie_word_embeddings=True, max_position_embeddings=c.max_position_embeddings)
    m = transformers.LlamaForCausalLM(hc).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(lm.params, c).items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    m.tie_weights()
    return m


def _ppl(lm, text):
    ids = lm.tokenizer.encode(text)
    t = jnp.asarray([ids], jnp.int32)
    lp = np.asarray(sequence_logprobs(lm.params, t, jnp.ones_like(t, bool), cfg=lm.cfg))
    return float(np.exp(-lp.mean()))


def test_perplexity_sane(lm):
    assert _ppl(lm, SENTENCE) < 30
    rng = np.random.default_rng(0)
    gib = lm.tokenizer.decode(rng.integers(100, lm.cfg.vocab_size, 24).tolist())
    assert _ppl(lm, gib) > 500


def test_logprobs_equal_transformers(lm, torch_model):
    texts = [SENTENCE, "Fever of unknown origin is classified among symptoms and abnormal findings.", "Hi"]
    seqs = [lm.tokenizer.encode(t) for t in texts]
    T = max(map(len, seqs))
    toks = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
        mask[i, :len(s)] = True
    ours = np.asarray(sequence_logprobs(lm.params, jnp.asarray(toks), jnp.asarray(mask), cfg=lm.cfg))
    with torch.no_grad():
        logits = torch_model(input_ids=torch.as_tensor(toks, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, torch.as_tensor(toks[:, 1:, None],
                                                                                   dtype=torch.long))[..., 0]
    valid = mask[:, 1:]
    np.testing.assert_allclose(ours[valid], ref.numpy()[valid], atol=1e-3)


def test_greedy_answer_mentions_heart(lm):
    reply = generate_text(lm, ["What organ pumps blood around the body?"], chat=True, max_new_tokens=40)[0]
    assert "heart" in reply.lower(), reply


def test_greedy_generation_equals_transformers(lm, torch_model):
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain in detail how the heart pumps blood through the body."}],
        add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    toks, mask = left_pad([ids], lm.pad_id, len(ids) + 5)
    out, n = generate_tokens(lm.params, jnp.asarray(toks), jnp.asarray(mask), jnp.zeros(2, jnp.uint32),
                             cfg=lm.cfg, max_new_tokens=20, eos_ids=lm.eos_ids, pad_id=lm.pad_id)
    ours = np.asarray(out)[0, :int(n[0])]
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                   eos_token_id=list(lm.eos_ids), pad_token_id=lm.pad_id)[0, len(ids):].numpy()
    assert len(ours) == 20   # a long answer: all 20 greedy tokens are compared
    np.testing.assert_array_equal(ours, ref)


def test_score_cli_json(capsys):
    assert cli_main(["score", "--model", "smollm2-135m", "--text", SENTENCE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["logprobs"]) == len(out["tokens"]) - 1
    assert out["ppl"] == pytest.approx(float(np.exp(-np.mean(out["logprobs"]))), rel=1e-5)
    assert all(x <= 0 for x in out["logprobs"]) and out["ppl"] < 30
