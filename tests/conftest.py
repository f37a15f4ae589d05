import os

# Emulate an 8-device mesh on CPU; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache per checkout: the jobs the tests start (resume, multi-process, CLI runs) and
# repeated shapes compile once.
_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import gc  # noqa: E402

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    Each XLA:CPU executable holds memory mappings of its own and jax's caches keep every one alive: the process's
    mapping count grows by about 6,000 over tests/eval/test_score.py alone (clearing brings it back to about
    3,400), and the whole suite in one process crashed inside XLA (a segmentation fault, in a compile or a cache
    write, at the same test every time), most likely at Linux's default limit of 65,530 mappings
    (``vm.max_map_count``). Executables are rebuilt where a later module needs them; the persistent cache keeps
    that cheap."""
    yield
    jax.clear_caches()
    gc.collect()
