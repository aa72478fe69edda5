#!/usr/bin/env bash
# Creates ./.venv (unless a virtual environment is already active) and installs the project into it
# with its dependencies and the test tools (pyproject.toml: `pip install -e ".[test]"`). Safe to run
# again: it only installs what is missing. Used by run.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# The sandbox isolates generated programs with util-linux `unshare` (docs/SANDBOX.md); present on
# Debian/Ubuntu, missing from some minimal images.
if ! command -v unshare >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -q && apt-get install -y -q util-linux; } >/dev/null || echo "setup: could not install util-linux (unshare); see docs/SANDBOX.md"
fi
stamp=.venv-installed
want=$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
if [ -f "$VIRTUAL_ENV/$stamp" ] && [ "$(cat "$VIRTUAL_ENV/$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# Without a torch already present, pip would resolve a CUDA build of several GB: take the CPU
# build first. With nvidia-smi, PyPI's default (CUDA) build. A torch already in the environment
# (one you installed in .venv for your driver, from pytorch.org) is kept: pip only replaces it
# when it is outside pyproject.toml's range.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4,<2.16"
  else
    python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      --timeout 20 --retries 1 2>/dev/null || python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[test]"
echo "$want" > "$VIRTUAL_ENV/$stamp"
python -c "import torch, transformers, trl; print(f'set up: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
