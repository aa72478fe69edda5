#!/usr/bin/env bash
# The test suite: sets up the environment if needed, then runs pytest offline on the CPU.
# Extra arguments go to pytest, e.g. `bash test.sh -k sandbox`; `bash test.sh -m "not slow"` runs
# the unit tests only (under a minute), without the tests that start processes or train.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
