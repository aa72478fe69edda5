#!/usr/bin/env bash
# Every benchmark of bench/README.md in one sitting, for a quiet machine (nothing else running):
# 13 minutes on the 2-core reference machine (measured quiet, 2026-11-29). Raw results go to
# bench/results/*.json, each script prints its table;
# paste them into bench/README.md (or compare with what is there).
#
#     bash bench/run_all.sh                 # needs ./sft_model and ./rm_model (bash run.sh makes them)
#     bash bench/run_all.sh --quick         # a few minutes: fewer steps, to check that all of it runs
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f sft_model/rlhf_stage.json ] && [ -f rm_model/rlhf_stage.json ] || {
    echo "error: ./sft_model and ./rm_model are needed: run \`bash run.sh\` (or train_sft.py, train_rm.py) first" >&2; exit 2; }
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash bench/setup_trl110.sh
if [ "${1:-}" = "--quick" ]; then
    python bench/bench_mfu.py --steps=4 --warmup=1 --profile_steps=2 --ppo_steps=2 --rm_steps=4
    python bench/bench_rollout.py --rounds=1 --batches=1
    python bench/bench_ppo_vs_trl.py --rounds=1 --steps=2 --PPO_EVAL_TASKS=8
    python bench/bench_scaling.py --sizes=128x2,256x4 --batches=8,16 --steps=2 --warmup=1 --ppo_steps=2
else
    python bench/bench_mfu.py          # ~5 min: peak, SFT/RM/PPO MFU, fused AdamW vs not, SFT profile and bound
    python bench/bench_rollout.py      # ~3 min: generation variants
    python bench/bench_ppo_vs_trl.py   # ~11 min: ours vs TRL 1.10, 2 rounds x 5 iterations, held-out eval
    python bench/bench_scaling.py      # ~7 min: 3 model sizes, 2 batch sizes
fi
echo "raw results in bench/results/"
