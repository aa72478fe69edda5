#!/usr/bin/env bash
# The main job: sets up the environment if needed, then runs data -> SFT -> RM -> PPO -> report
# (scripts/pipeline.py). Arguments go to the pipeline, e.g. `bash run.sh --redo ppo --PPO_STEPS=5`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
exec python scripts/pipeline.py "$@"
