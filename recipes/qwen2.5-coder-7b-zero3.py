"""Qwen2.5-Coder-7B-Instruct on one machine of 8 x 80 GB GPUs, full-parameter training in bf16:
SFT and RM under DeepSpeed ZeRO-2, PPO under ZeRO-3 with the frozen models sharded.

    pip install -e ".[deepspeed]"
    python scripts/pipeline.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py --dry-run   # what it would run
    python scripts/pipeline.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml --num_processes 8 train_sft.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml --num_processes 8 train_rm.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 8 train_ppo.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py

NOTHING IN THIS PROJECT HAS RUN ON A GPU YET: these values come from the public references cited
next to them and from the memory arithmetic of docs/SCALING.md, not from a run. ZeRO-3 and FSDP2
ran on 2 CPU processes only (tests/test_distributed.py). Check the first log lines (loss, lr, KL)
before trusting a long run, and report what you see.

The stage folders are the recipe's own (SFT_DIR, RM_DIR, PPO_DIR below); the pipeline's --reports
DIR keeps its report apart from the embedded default's. Any --NAME=value after the recipe wins.

Why two configs: SFT and RM evaluate and save from one process and refuse ZeRO-3 and FSDP
(rlhf/common.py); under ZeRO-2 they hold 2P of bf16 weights + 14P/8 of sharded gradients and Adam
state, 29 GB per GPU (docs/SCALING.md). PPO trains policy and critic (16P each, sharded 8 ways
under ZeRO-3) and keeps a reference and the reward model: whole on every GPU that is 76 GB with the
generation gather, which does not fit; sharded (PPO_SHARD_FROZEN_MODELS) it is 50 GB. FSDP2
(accelerate_configs/fsdp.yaml) cannot shard the frozen models and gathers weights per generated
token (docs/SCALING.md), so ZeRO-3 it is.

References: OpenRLHF's 7B scripts (examples/scripts/train_sft_llama.sh: lr 5e-6, max_len 2048,
global batch 128, 1 epoch, ZeRO-2; train_rm_llama.sh: lr 9e-6, global batch 128; train_ppo_llama.sh:
actor lr 5e-7, critic lr 9e-6, init_kl_coef 0.01, prompt and generation 1024 tokens, global batch
128), TRL's (PPOConfig: temperature 0.7, kl_coef 0.05; GRPOConfig: lr 1e-6, max_completion_length
512, 8 generations per prompt; reward_modeling.py: max_length 2048), Qwen's (generation_config.json
of the Instruct models: temperature 0.7).
"""

MODEL_NAME = "Qwen/Qwen2.5-Coder-7B-Instruct"
SFT_DIR = "./qwen7b_sft"
RM_DIR = "./qwen7b_rm"
PPO_DIR = "./qwen7b_ppo"
RUNS_DIR = "./runs_qwen7b"

# ---- launch (scripts/pipeline.py): 8 processes, one per GPU
ACCELERATE_CONFIG = "accelerate_configs/deepspeed_zero2.yaml"  # SFT and RM
PPO_ACCELERATE_CONFIG = "accelerate_configs/deepspeed_zero3.yaml"
NUM_PROCESSES = 8
PPO_SHARD_FROZEN_MODELS = True  # reference and reward model sharded in ZeRO-3 inference engines: 76 -> 50 GB per GPU
USE_LORA = False
GRADIENT_CHECKPOINTING = True

# ---- lengths (tokens). The embedded default's 512/128/160 would cut a real model's answers.
MAX_LEN = 2048  # SFT example, and PPO prompt + answer (OpenRLHF 2048)
RM_MAX_LEN = 2048  # TRL reward_modeling.py
PPO_RESPONSE_LEN = 512  # TRL GRPOConfig max_completion_length (OpenRLHF 1024)
GEN_MAX_NEW_TOKENS = 512  # the evaluations' answers: as long as PPO's

# ---- SFT: 128 sequences per step (OpenRLHF): 2 per GPU x 8 accumulation x 8 GPUs
BATCH_SIZE = 2
GRAD_ACCUM = 8
EPOCHS = 2  # OpenRLHF 1, Qwen 3; early stopping (SFT_EARLY_STOP_PATIENCE) keeps the best
LR = 5e-6  # OpenRLHF's 7B SFT (TRL's 0.5B example: 2e-5)

# ---- reward model: 128 pairs per step (OpenRLHF)
RM_BATCH_SIZE = 2
RM_GRAD_ACCUM = 8
RM_EPOCHS = 1
RM_LR = 9e-6  # OpenRLHF's 7B RM (TRL: 1e-5)

# ---- PPO (critic-free grpo, config.py's default): 16 answers per GPU, 128 per iteration, 8 per prompt
PPO_STEPS = 200  # the budget: 25,600 answers
PPO_BATCH_SIZE = 16  # per process
PPO_MINI_BATCH_SIZE = 4
PPO_SAMPLES_PER_PROMPT = 8  # TRL GRPO num_generations
PPO_LR = 1e-6  # TRL GRPOConfig (OpenRLHF's PPO actor: 5e-7)
PPO_CRITIC_LR = 9e-6  # gae only: OpenRLHF's critic
PPO_TEMPERATURE = 0.7  # TRL's PPO default and Qwen2.5-Coder-Instruct's own sampling temperature
PPO_KL_COEF = 0.05  # TRL 0.05 (OpenRLHF 0.01)
PPO_SIL_COEF = 0.0  # plain PPO: the self-imitation weight was chosen on the embedded default only

# ---- evaluation and sandbox
GEN_BATCH_SIZE = 128  # answers per generate() call: 128 x 2,048 tokens of KV cache is 14.7 GB on this model
SANDBOX_TIMEOUT_S = 3.0  # seconds per program: HumanEval's and MBPP's own harnesses use 3
