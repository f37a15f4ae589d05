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
