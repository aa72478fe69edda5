#!/usr/bin/env bash
# The test suite: sets up the environment if needed, then runs pytest offline on the CPU in two
# worker processes (pytest-xdist; the tests of one file stay on one worker, so that its fixtures
# are built once: tests/conftest.py). Extra arguments go to pytest, e.g. `bash test.sh -k sandbox`;
# `bash test.sh -m "not slow"` runs the unit tests only, without the tests that
# start processes or train; `bash test.sh -n 0` runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
