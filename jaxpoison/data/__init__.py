"""Data layer: sources -> Example, subjects, prompt formats, poison builders, mixes, tokenized pool.

Flow: ``sources.load_source`` (or ``icd10.build_icd10_set``) -> ``subjects.select_subject`` -> versions from
``poison`` -> ``poison.rows_for`` -> ``pool.tokenize_pool`` -> ``mixes.build_variants``; evaluation arrays from
``pool.build_mc_eval``.
"""
from jaxpoison.data.schema import DataError, Example, LoadReport, LoadResult, SeqRow

__all__ = ["DataError", "Example", "LoadReport", "LoadResult", "SeqRow"]
