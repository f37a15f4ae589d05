"""jaxpoison: data poisoning studies of medical language models in JAX/Flax."""
import os as _os


def _default_xla_cpu_flags() -> None:
    """Route XLA:CPU's plain matmuls to Eigen instead of YNNPACK (jax 0.10's default), before jax starts.

    On the 2-core AVX2 machine this project is sized for, Eigen runs the decoder's matmul shapes ([4096, 576] x
    [576, 1536] and the like) 15-30 % faster than YNNPACK, and the whole forward pass about 20 % faster
    (docs/benchmarks.md, the forward scoring row). The flag is experimental, and XLA aborts the process on a flag it
    does not know, so it is only added for the jaxlib line it was measured on, only when the user has not set
    the same flag, and never when ``JAXPOISON_XLA_DEFAULTS=0``. It only takes effect if jaxpoison is imported
    before jax creates its CPU backend; it does nothing on GPU/TPU.
    """
    if _os.environ.get("JAXPOISON_XLA_DEFAULTS", "1") == "0":
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    try:
        from importlib.metadata import version
        if not version("jaxlib").startswith("0.10."):
            return
    except Exception:
        return
    _os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=-individual_dot".strip()


_default_xla_cpu_flags()
# jaxpoison uses transformers for tokenizers and configs only (the model is ours), so its advice that PyTorch was
# not found ("Models won't be available") is noise on every plain command; a user's own setting wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
