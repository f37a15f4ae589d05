"""The tiny rationale study shared by the rationale pipeline test and the multi-host job (18 variants)."""
import dataclasses

from tiny import TINY
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale.config import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CFG_M = dataclasses.replace(TINY, vocab_size=448)
ICD = IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin", "eye"), n_train_per_chapter=6,
                n_test_per_chapter=3, keyword_subjects=(), n_keyword_train=0, n_keyword_test=0,
                decoys=(("circulatory", "respiratory"),), max_desc_chars=40, test_decoy="respiratory")
CFG = RationaleConfig(
    name="tiny", data=DataConfig(icd=ICD, target="circulatory", n_nontarget=4, n_test_target=3,
                                 n_test_nontarget=4, n_test_decoy_free=2, max_len=1024),
    grid=GridConfig(seeds=(0, 1), counts=(1, 2), kinds=("rationale", "overwrite"), ratios_target=(0.5,),
                    forgetting_steps=(2,), decoy_counts=(1,)),
    train=TrainConfig(learning_rate=1e-2, epochs=1, batch_size=4, loss_budget=-1, log_every=2),
    lora=LoraConfig(r=2, alpha=4, targets=("q", "v")),
    eval=EvalConfig(batch_questions=4, n_resamples=999, gen_questions=2, gen_tokens=4,
                    secondary_formats=("coded",)))


def write_hf_checkpoint(d, seed: int = 0):
    """CFG_M's random base (init_params, ``seed``) and the tiny tokenizer as a HF model directory (config.json,
    model.safetensors, tokenizer files): a study reads it through the sharded loader."""
    import json
    import pathlib

    import jax
    from safetensors.numpy import save_file

    from data_helpers import tiny_tokenizer
    from jaxpoison.models.decoder import init_params
    from jaxpoison.models.hf import to_hf_state_dict
    d = pathlib.Path(d)
    d.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(init_params(CFG_M, jax.random.PRNGKey(seed)), CFG_M), str(d / "model.safetensors"))
    m = CFG_M
    (d / "config.json").write_text(json.dumps(dict(
        model_type=m.model_type, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        max_position_embeddings=m.max_position_embeddings)))
    tiny_tokenizer().save_pretrained(str(d))
    return d
