"""Seed 000 demo: rationale poisoning vs knowledge overwriting on the embedded default (placeholder)."""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(name="demo")
