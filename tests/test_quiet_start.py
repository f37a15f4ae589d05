"""Plain commands print no advice from transformers: jaxpoison uses it for tokenizers and configs only."""
import os
import subprocess
import sys

# a Python start-up in which torch cannot be found, as in the runtime-only install (launch/setup.sh without --test)
HIDE_TORCH = """
import importlib.util, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torch' else _find(name, *a, **k)
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ModuleNotFoundError("No module named 'torch'")
sys.meta_path.insert(0, _NoTorch())
sys.argv = ['jaxpoison', 'data', '--help']
{body}
"""


def _run(body):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run([sys.executable, "-c", HIDE_TORCH.format(body=body)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_no_pytorch_advice_without_torch():
    # control: transformers alone does print the advice when torch is missing (so the check below can fail)
    bare = _run("import transformers; print(transformers.is_torch_available())")
    assert bare.stdout.strip() == "False" and "PyTorch was not found" in bare.stderr
    # `python -m jaxpoison data --help`, then transformers (as the data and model code import it)
    ours = _run("import runpy\n"
                "try:\n    runpy.run_module('jaxpoison', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "import transformers\nprint(transformers.is_torch_available())")
    assert ours.stdout.strip().endswith("False"), ours.stderr[-2000:]
    assert "PyTorch was not found" not in ours.stderr and "usage" in ours.stdout
