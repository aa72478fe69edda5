#!/usr/bin/env bash
# A separate virtual environment with TRL 1.10.0, the peer of bench/bench_ppo_vs_trl.py.
# TRL 1.10 is the last release with PPOTrainer (trl.experimental.ppo); it brings the transformers
# version it pins, so it cannot share the project's .venv (transformers 5.24, trl 1.16).
#
#     bash bench/setup_trl110.sh                 # makes bench/.venv-trl110 (git-ignored)
#     TRL110_VENV=/work/venvs/trl110 bash bench/setup_trl110.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TRL110_VENV:-bench/.venv-trl110}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '1.10.0')" 2>/dev/null; then
    echo "$VENV already has trl 1.10.0"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# the same torch as the project (CPU build); then TRL 1.10.0 and whatever transformers it allows
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "trl==1.10.0"
"$VENV/bin/python" -c "import torch, transformers, trl, accelerate; print('trl', trl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__, '| accelerate', accelerate.__version__)"
