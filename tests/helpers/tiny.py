"""Tiny random models and synthetic pools shared by the engine tests."""
import numpy as np
import jax

from jaxpoison.models.config import ModelConfig
from jaxpoison.models.decoder import init_params
from jaxpoison.train.trainer import StudyData

TINY = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


def tiny_base(cfg=TINY, seed=0):
    return init_params(cfg, jax.random.PRNGKey(seed))


def tiny_pool(R=24, T=16, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (R, T)).astype(np.int32)
    lengths = rng.integers(T // 2, T + 1, R)
    attn = np.arange(T)[None, :] < lengths[:, None]
    prompt = rng.integers(2, T // 2, R)
    loss = (np.arange(T)[None, :] >= prompt[:, None]) & attn
    tokens = np.where(attn, tokens, 0)
    return tokens, loss.astype(np.float32), attn


def tiny_study(V=4, M=12, R=24, seed=0, lr_scale=None) -> StudyData:
    tokens, loss, attn = tiny_pool(R, seed=seed)
    rng = np.random.default_rng(seed + 1)
    rows = np.stack([rng.permutation(R)[:M] for _ in range(V)]).astype(np.int32)
    n_rows = np.array([M - (v % 3) * 2 for v in range(V)], np.int32)   # unequal sizes
    table = [{"variant_id": v, "seed": v // 2, "kind": "test"} for v in range(V)]
    return StudyData(tokens, loss, attn, rows, n_rows, table, "testhash", lr_scale)


def subset(sd: StudyData, idx) -> StudyData:
    idx = list(idx)
    return StudyData(sd.tokens, sd.loss_mask, sd.attn_mask, sd.rows[idx], sd.n_rows[idx],
                     [sd.table[i] for i in idx], sd.data_hash,
                     None if sd.lr_scale is None else sd.lr_scale[idx])
