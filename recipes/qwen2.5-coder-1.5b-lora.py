"""Qwen2.5-Coder-1.5B-Instruct on one 24 GB GPU, LoRA in every stage (bf16).

    python scripts/pipeline.py --RECIPE=recipes/qwen2.5-coder-1.5b-lora.py --dry-run   # what it would run
    python scripts/pipeline.py --RECIPE=recipes/qwen2.5-coder-1.5b-lora.py
    python train_sft.py --RECIPE=recipes/qwen2.5-coder-1.5b-lora.py       # or one stage at a time,
    python train_rm.py --RECIPE=recipes/qwen2.5-coder-1.5b-lora.py        # the same recipe for each
    python train_ppo.py --RECIPE=recipes/qwen2.5-coder-1.5b-lora.py

NOTHING IN THIS PROJECT HAS RUN ON A GPU YET: these values come from the public references cited
next to them and from the memory arithmetic of docs/SCALING.md, not from a run. Check the first
log lines (loss, lr, KL) before trusting a long run, and report what you see.

One process, no accelerate config (ACCELERATE_CONFIG stays ""). Memory (docs/SCALING.md, LoRA):
SFT and RM hold a bf16 base (3 GB) plus adapters; PPO the fp32 policy base (6 GB), whose adapter
off is the reference, and the bf16 reward model (3 GB; with PPO_ADVANTAGE=gae an fp32 critic, whose
adapter off is the reward model, 6 GB). Any --NAME=value after the recipe wins over it, e.g. your own data:
--SFT_TRAIN_FILE=my_sft.jsonl. The stage folders are the recipe's own (SFT_DIR, RM_DIR, PPO_DIR
below); the pipeline's --reports DIR keeps its report apart from the embedded default's.

References: TRL's example scripts (trl/scripts/sft.py: lr 2e-5 full, 2e-4 LoRA with r 32, alpha 16,
batch 2 x 8; examples/scripts/reward_modeling.py: lr 1e-5 full, 1e-4 LoRA, max_length 2048, 1 epoch;
examples/scripts/ppo/ppo.py: lr 3e-6; PPOConfig: temperature 0.7, kl_coef 0.05; GRPOConfig:
max_completion_length 512, 8 generations per prompt), Qwen's (Qwen2.5-Coder finetuning/sft: lr 5e-5
with LoRA r 8, alpha 32, model_max_length 1280; generation_config.json of the Instruct models:
temperature 0.7, top_p 0.8), OpenRLHF's (examples/scripts/train_ppo_llama.sh: actor lr 5e-7,
critic lr 9e-6, prompt and generation 1024 tokens each).
"""

MODEL_NAME = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
SFT_DIR = "./qwen1.5b_sft"
RM_DIR = "./qwen1.5b_rm"
PPO_DIR = "./qwen1.5b_ppo"
RUNS_DIR = "./runs_qwen1.5b"

# LoRA: rank 16, alpha 32 (config.py's), a scale alpha/r of 2. With Adam a step moves the weights
# by about lr x scale: TRL's 2e-4 at scale 0.5 and Qwen's 5e-5 at scale 4 are 1e-4 and 2e-4 per
# unit of scale; 1e-4 here at scale 2 is 2e-4.
USE_LORA = True
LORA_R = 16
LORA_ALPHA = 32
GRADIENT_CHECKPOINTING = True  # ~30% more compute for much less activation memory

# ---- lengths (tokens). The embedded default's 512/128/160 would cut a real model's answers.
MAX_LEN = 2048  # SFT example, and PPO prompt + answer (OpenRLHF 2048; Qwen 1280)
RM_MAX_LEN = 2048  # TRL reward_modeling.py
PPO_RESPONSE_LEN = 512  # TRL GRPOConfig max_completion_length; answers cut here count as not ending (PPO_MISSING_EOS_PENALTY)
GEN_MAX_NEW_TOKENS = 512  # the evaluations' answers (pass@1, pass@k, seed prompts): as long as PPO's

# ---- SFT: 16 sequences per step as TRL's sft.py (2 x 8)
BATCH_SIZE = 2
GRAD_ACCUM = 8
EPOCHS = 2  # TRL and OpenRLHF 1, Qwen 3; early stopping (SFT_EARLY_STOP_PATIENCE) keeps the best
LR = 1e-4  # LoRA (above); full fine-tuning would take 1e-5 to 2e-5 (TRL 2e-5)

# ---- reward model: 16 pairs per step
RM_BATCH_SIZE = 4
RM_GRAD_ACCUM = 4
RM_EPOCHS = 1  # TRL 1; more overfits the pairs
RM_LR = 5e-5  # TRL's LoRA 1e-4 at scale 0.5 is 5e-5 per unit of scale; here 5e-5 at scale 2 (full: TRL 1e-5)

# ---- PPO (critic-free grpo, config.py's default): 32 answers per iteration, 8 per prompt (TRL GRPO)
PPO_STEPS = 200  # the budget: ~6,400 answers
PPO_BATCH_SIZE = 32
PPO_MINI_BATCH_SIZE = 4  # (4 x 2048 tokens x 152k vocabulary) fp32 logits = 5 GB at most
PPO_SAMPLES_PER_PROMPT = 8
PPO_LR = 1e-5  # TRL's full-parameter 3e-6 (PPO) and 1e-6 (GRPO) are for all weights; LoRA takes ~10x (TRL's SFT: 2e-5 -> 2e-4)
PPO_CRITIC_LR = 1e-4  # gae only: ~10x the policy's, as OpenRLHF (5e-7 -> 9e-6)
PPO_TEMPERATURE = 0.7  # TRL's PPO default and Qwen2.5-Coder-Instruct's own sampling temperature
PPO_KL_COEF = 0.05  # TRL 0.05 (OpenRLHF 0.01)
PPO_SIL_COEF = 0.0  # plain PPO: the self-imitation weight was chosen on the embedded default only

# ---- evaluation and sandbox
GEN_BATCH_SIZE = 64  # answers per generate() call: 64 x 2,048 tokens of KV cache is 3.7 GB on this model
SANDBOX_TIMEOUT_S = 3.0  # seconds per program: HumanEval's and MBPP's own harnesses use 3
