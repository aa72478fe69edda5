"""Every setting of the pipeline, as plain constants. Edit them here, or override any of them
for one run with `--NAME=value` on a stage script's command line (e.g. `--LR=3e-4`).

The defaults run the embedded default: a small Qwen2-architecture model that the project builds
itself (./base_model) and the bundled code tasks in data/. It runs offline on a laptop CPU. A real
model on GPUs takes a recipe: a small file of these constants with the values it needs (recipes/,
`--RECIPE=recipes/qwen2.5-coder-1.5b-lora.py`). Each comment says what a setting is, its unit and
its values; the figures behind the defaults are in docs/RESULTS.md and bench/README.md.
"""

# ---------------------------------------------------------------------------------------------
# Shared by all stages
# ---------------------------------------------------------------------------------------------
MODEL_NAME = "./base_model"  # base causal LM: hub id or folder; "./base_model" = the embedded default (built)
RECIPE = ""  # file of these constants for a real model (recipes/*.py), before --NAME=value; "" = none
SEED = 42  # one seed for data order, init and sampling; each process adds its rank
PRECISION = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
USE_LORA = False  # True: train LoRA adapters (peft); each stage saves the merged, plain model
LORA_R = 16  # LoRA rank; 8-64 is typical
LORA_ALPHA = 32  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT = 0.05  # dropout inside the LoRA adapters during SFT/RM (PPO turns all dropout off)
LORA_TARGET_MODULES = "all-linear"  # layers with adapters: "all-linear" or a list like "q_proj,v_proj"
QLORA = False  # True (with USE_LORA): SFT and the PPO policy on a 4-bit base (bitsandbytes, CUDA only)
GRADIENT_CHECKPOINTING = False  # True: recompute activations in the backward pass: less memory, more compute
REPORT_TO = "tensorboard"  # metric trackers, comma-separated (tensorboard, wandb, mlflow, ...); none = off
RUNS_DIR = "./runs"  # TensorBoard logs and per-stage log files
RESUME = True  # continue an interrupted stage from its last checkpoint (under RUNS_DIR/<stage>/checkpoints)
OVERWRITE = False  # True: allow a stage to replace an existing finished output folder
PUSH_TO_HUB = False  # True: each stage uploads its output to a private Hub repo HUB_MODEL_ID-<stage>
HUB_MODEL_ID = ""  # "user/name" for PUSH_TO_HUB: uploads go to user/name-sft, -rm and -ppo
MAX_LEN = 512  # SFT, DPO, PPO: tokens per sequence (prompt + answer); longer SFT examples, DPO pairs dropped
LOG_EVERY = 10  # SFT and RM: optimizer steps between log lines (PPO logs every iteration)
EVAL_EVERY = 0  # SFT and RM: optimizer steps between held-out evaluations and checkpoints; 0 = once per epoch

# ---------------------------------------------------------------------------------------------
# Embedded default base model (used only when MODEL_NAME == BASE_MODEL_DIR)
# ---------------------------------------------------------------------------------------------
BASE_MODEL_DIR = "./base_model"  # where the embedded model is built (randomly initialised, trained by SFT)
BASE_VOCAB_SIZE = 4096  # byte-level BPE vocabulary trained on the bundled data and Python's stdlib
BASE_HIDDEN = 256  # hidden size of the embedded Qwen2 model
BASE_LAYERS = 2  # transformer layers
BASE_HEADS = 8  # attention heads (head dim = BASE_HIDDEN / BASE_HEADS)
BASE_KV_HEADS = 4  # key/value heads (grouped-query attention as in Qwen2)
BASE_INTERMEDIATE = 768  # MLP width
BASE_MAX_POSITIONS = 1024  # longest sequence the embedded model accepts

# ---------------------------------------------------------------------------------------------
# Data (TRL standard formats; local .jsonl/.json/.parquet files or a `datasets` hub id)
# ---------------------------------------------------------------------------------------------
SFT_TRAIN_FILE = "data/sft_train.jsonl"  # conversations: {"messages"} or {"prompt", "completion"}
SFT_EVAL_FILE = "data/sft_eval.jsonl"  # held-out conversations for perplexity and token accuracy
RM_TRAIN_FILE = "data/rm_train.jsonl"  # preference pairs: {"prompt", "chosen", "rejected"}
RM_EVAL_FILE = "data/rm_eval.jsonl"  # held-out pairs for accuracy, F1 and margin
PPO_PROMPTS_FILE = "data/ppo_prompts.jsonl"  # PPO prompts: {"prompt"} or tasks with tests (data/DATA_CARD.md)
EVAL_TASKS_FILE = "data/eval_tasks.jsonl"  # held-out tasks with tests: pass@1 after SFT and PPO; "" = none
INDIST_TASKS_FILE = "data/indist_tasks.jsonl"  # reworded training tasks: pipeline's in-distribution pass@1

# ---------------------------------------------------------------------------------------------
# Stage 1: supervised fine-tuning (train_sft.py)
# ---------------------------------------------------------------------------------------------
SFT_DIR = "./sft_model"  # output folder of the SFT stage, input of RM and PPO
BATCH_SIZE = 4  # sequences per device per step; lower it first on out-of-memory
GRAD_ACCUM = 1  # gradient accumulation steps; global batch = BATCH_SIZE * GRAD_ACCUM * processes
EPOCHS = 5  # most passes over the SFT data (early stopping may end sooner); 2 for a pretrained model
SFT_EARLY_STOP_PATIENCE = 2  # evaluations without a lower held-out loss before stopping (best kept); 0 = off
LR = 1e-3  # peak learning rate (cosine decay, warm-up below); 1e-5 for a pretrained 1.5B model
WARMUP_RATIO = 0.05  # share of steps spent warming the learning rate up
WEIGHT_DECAY = 0.0  # AdamW weight decay
PACKING = False  # True: pack without padding (fast with flash-attention only); False: batches by length
SFT_EVAL_PASS_AT_1 = True  # after training, generate for EVAL_TASKS_FILE and report pass@1 (sandboxed)
CHAT_TEMPLATE = "model"  # model: the base model's chat template | chatml: ChatML instead (full fine-tuning)

# ---------------------------------------------------------------------------------------------
# Stage 2: reward model (train_rm.py)
# ---------------------------------------------------------------------------------------------
RM_DIR = "./rm_model"  # output folder of the RM stage (scalar head + score normalisation), input of PPO
RM_BATCH_SIZE = 16  # preference pairs (2 sequences each) per device per step; lower it on out-of-memory
RM_GRAD_ACCUM = 1  # gradient accumulation steps; global batch = RM_BATCH_SIZE * RM_GRAD_ACCUM * processes
RM_EPOCHS = 2  # passes over the preference pairs; 1 for a pretrained model
RM_MAX_LEN = 512  # tokens per sequence (prompt + answer); pairs with a longer side are dropped with a count
RM_LR = 1e-3  # peak learning rate (cosine decay); 1e-5 (full) or 1e-4 (LoRA) for a pretrained 1.5B model
RM_WARMUP_RATIO = 0.05  # share of steps spent warming the learning rate up
RM_CENTER_REWARDS_COEF = 0.01  # loss += coef * mean(score^2): scores near 0 (Eisenstein et al. 2023); 0 = off
RM_SCORE_BATCH_SIZE = 64  # sequences per forward when scoring (evaluation, normalisation); memory only
RM_ONPOLICY_SAMPLES = 0  # SFT answers per task sampled for extra pairs (failing vs passing); 0 = off; 4
RM_ONPOLICY_PROMPTS_FILE = "data/ppo_prompts.jsonl"  # tasks with unit tests for those pairs

# ---------------------------------------------------------------------------------------------
# Evaluation by execution (all stages)
# ---------------------------------------------------------------------------------------------
GEN_MAX_NEW_TOKENS = 160  # longest generated answer, in tokens
GEN_BATCH_SIZE = 512  # answers generated per call in the evaluations; memory only: lower it on out-of-memory
EVAL_MAX_TASKS = 0  # evaluate on at most this many held-out tasks; 0 = all
EVAL_SAMPLES = 8  # answers per held-out task sampled at temperature 1 -> pass@EVAL_SAMPLES; 0 = off
SEED_PROMPTS_FILE = "data/seed_prompts.jsonl"  # natural prompts with tests of what they ask; "" = no check
SEED_PROMPT_SAMPLES = 10  # answers per seed prompt, sampled as a user asks (temperature 0.7); 0 = off
MBPP_FILE = "mbpp:full:test"  # evaluate.py --benchmark mbpp: a file or hub id (or mbpp:sanitized:test)

# ---------------------------------------------------------------------------------------------
# Sandbox (evaluation by execution): every generated program runs in rlhf/sandbox/ (docs/SANDBOX.md)
# ---------------------------------------------------------------------------------------------
SANDBOX_MODE = "namespaces"  # namespaces: kernel isolation | weak: audit hook and limits only (not safe)
SANDBOX_TIMEOUT_S = 1.0  # seconds per program (load + its tests); CPU limit: +1; 3.0 for HumanEval/MBPP
SANDBOX_MEMORY_MB = 512  # MiB per process (RLIMIT_AS), and for the whole program where a cgroup can be made
SANDBOX_DISK_MB = 64  # MiB of private tmpfs work dir per program (in RAM); the rest is read-only
SANDBOX_FILE_SIZE_MB = 8  # largest single file a program may write (RLIMIT_FSIZE)
SANDBOX_MAX_PROCS = 64  # processes and threads per program (its cgroup, or RLIMIT_NPROC of its own uid)

# ---------------------------------------------------------------------------------------------
# Stage 3: PPO (train_ppo.py); defaults follow TRL <= 1.10 and the N+ implementation details
# ---------------------------------------------------------------------------------------------
PPO_DIR = "./ppo_model"  # output folder of the PPO stage
PPO_STEPS = 30  # PPO iterations (each: one batch of rollouts, then PPO_EPOCHS of updates)
PPO_BATCH_SIZE = 32  # answers rolled out per process per iteration (/ PPO_SAMPLES_PER_PROMPT prompts)
PPO_MINI_BATCH_SIZE = 8  # responses per gradient step (PPO_BATCH_SIZE must be a multiple)
PPO_EPOCHS = 4  # passes over each rollout batch (TRL: 4)
PPO_LR = 5e-5  # policy learning rate, linear decay to 0; ~1e-6..3e-6 for 1B+ models
PPO_CRITIC_LR = 3e-4  # critic (value model) learning rate, gae only; ~10x the policy's (OpenRLHF)
PPO_SAMPLES_PER_PROMPT = 4  # answers sampled per prompt in a batch (PPO_BATCH_SIZE must be a multiple)
PPO_OVERSAMPLE = 4  # prompts sampled per prompt trained on, those whose tests disagree first (DAPO); 1 = off
PPO_RESPONSE_LEN = 128  # max new tokens per rollout; shapes stay equal across processes
PPO_TEMPERATURE = 1.0  # sampling temperature, top_k 0, top_p 1 (TRL: 0.7)
PPO_KL_COEF = 0.05  # beta of the per-token KL penalty to the SFT reference (TRL 0.05)
PPO_KL_TARGET = 0.0  # > 0: adapt beta towards this KL per response (Ziegler et al. 2019); 0 = fixed
PPO_KL_HORIZON = 10000  # episodes over which the adaptive controller moves beta
PPO_KL_ESTIMATOR = "k1"  # k1 (logp - ref_logp, TRL/N+) | k2 (0.5 * k1^2, biased) | k3 (>= 0, lower variance)
PPO_CLIP = 0.2  # policy ratio clip range
PPO_VF_CLIP = 0.2  # value clip range (gae)
PPO_VF_COEF = 0.1  # weight of the value loss (gae)
PPO_ADVANTAGE = "grpo"  # gae (critic) | grpo | dr_grpo | rloo | reinforce++ (critic-free: no value model)
PPO_KL_LOSS = False  # True: the KL is a loss term (per token, k2 or k3; GRPO) instead of a reward penalty
PPO_LOSS_NORM = "batch"  # batch: each token of the batch weighs alike | mini_batch: token mean per mini-batch
PPO_SIL_COEF = 1.0  # weight of self-imitation on passing answers of mixed groups (Oh et al. 2018); 0 = off
PPO_GAMMA = 1.0  # discount
PPO_LAM = 0.95  # GAE lambda (gae)
PPO_MAX_GRAD_NORM = 1.0  # gradient clipping (TRL's PPO had none)
PPO_MISSING_EOS_PENALTY = -1.0  # score given instead of the RM's to a response that never ends (N+)
PPO_PENALIZE_MISSING_EOS = True  # False: responses cut at PPO_RESPONSE_LEN keep their score
PPO_RM_WEIGHT = 1.0  # weight of the normalised RM score on prompts without unit tests (all: PPO_RM_ON_TESTED)
PPO_RM_ON_TESTED = False  # True: add the RM score where unit tests exist too; False: the tests decide
PPO_EXEC_WEIGHT = 1.0  # weight of the unit-test reward (prompts with tests); 0 = RM only
PPO_EXEC_REWARD = "all"  # all: 1 only if every test passes (as pass@1) | fraction: share of tests passed
PPO_REWARD_FN = ""  # optional extra reward "module:function", f(prompt messages, response texts) -> floats
PPO_EVAL_EVERY = 10  # iterations between held-out evaluations (pass@1, RM score); 0 = only at the end
PPO_SAVE_EVERY = 10  # iterations between checkpoints (resume with RESUME); 0 = never
PPO_EVAL_TASKS = 64  # held-out tasks evaluated every PPO_EVAL_EVERY (a subset, for speed); all at the end
PPO_SHARD_FROZEN_MODELS = False  # DeepSpeed without LoRA: shard the reference and RM too (docs/SCALING.md)

# ---------------------------------------------------------------------------------------------
# Optional stage: DPO (train_dpo.py), preference pairs straight into the SFT model, no RM
# ---------------------------------------------------------------------------------------------
DPO_DIR = "./dpo_model"  # output folder of the DPO stage (it reads SFT_DIR only)
DPO_TRAIN_FILE = ""  # preference pairs {"prompt", "chosen", "rejected"}; "" = RM_TRAIN_FILE
DPO_EVAL_FILE = ""  # held-out pairs for the implicit reward's accuracy and margin; "" = RM_EVAL_FILE
DPO_LOSS_TYPE = "sigmoid"  # a loss of TRL's DPOConfig: sigmoid (DPO), ipo, hinge, robust, ...; a,b sums them
DPO_BETA = 0.1  # pull towards the reference model (higher = closer to it); IPO's tau
DPO_LABEL_SMOOTHING = 0.0  # robust: share of labels taken as flipped, [0, 0.5); exo_pair needs > 0 (1e-3)
DPO_LR = 1e-4  # peak learning rate (cosine decay); ~5e-7 (full) or ~5e-6 (LoRA) for a pretrained 1.5B model
DPO_WARMUP_RATIO = 0.1  # share of each round's steps spent warming the learning rate up
DPO_EPOCHS = 1  # passes over each round's pairs (each online round trains on its new pairs only)
DPO_BATCH_SIZE = 8  # preference pairs (2 sequences each) per device per step; lower it on out-of-memory
DPO_GRAD_ACCUM = 1  # gradient accumulation steps; global batch = DPO_BATCH_SIZE * DPO_GRAD_ACCUM * processes
DPO_ROUNDS = 0  # online rounds, each on pairs of the latest model's tested answers; 0 = offline (fixed pairs)
DPO_ONLINE_SAMPLES = 4  # answers per task of PPO_PROMPTS_FILE sampled each online round (temperature 1); 4-8

# ---------------------------------------------------------------------------------------------
# Launching the stages (scripts/pipeline.py; a stage launched by hand ignores these)
# ---------------------------------------------------------------------------------------------
ACCELERATE_CONFIG = ""  # accelerate config of SFT, RM (and PPO): accelerate_configs/*.yaml; "" = 1 process
PPO_ACCELERATE_CONFIG = ""  # PPO's own accelerate config (deepspeed_zero3.yaml, fsdp.yaml); "" = the above
NUM_PROCESSES = 0  # processes per stage under accelerate launch, all machines together; 0 = the config's
PIPELINE_DPO = False  # True: the pipeline trains DPO (train_dpo.py) after PPO, reported beside SFT and PPO
