import os

# Emulate an 8-device mesh on CPU; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache per checkout, for the jobs the tests start (resume, multi-process, CLI runs):
# each is a fresh process that compiles the same programs as the last.
_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# ...but not inside this process. After some 590 tests in one process, serialising a CPU executable into the
# cache (``executable.serialize()`` in jax's cache write) died with a segmentation fault, deterministically at
# the same test, though that test passes alone and after any smaller group tried; the whole suite in one process
# is the only known trigger, so the process that runs the tests never writes to the cache.
import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_compilation_cache", False)
