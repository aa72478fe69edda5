"""What the three stages must do identically: settings and errors, seeding, precision, the
tokenizer's pad/EOS set-up, and the hand-off between stages (atomic save with a small metadata
file, clear errors for a missing input). Data loading is in rlhf/data.py, checkpoints in
rlhf/checkpoints.py."""

import datetime
import json
import os
import shutil
import sys
import time

import config as C
from rlhf.settings import UserError, apply_overrides, settings

STAGE_INFO_FILE = "rlhf_stage.json"  # written last: its presence marks a finished stage output
STAGE_COMMANDS = {"sft": "python train_sft.py", "rm": "python train_rm.py", "ppo": "python train_ppo.py"}


# ---------------------------------------------------------------------------------------------
# Entry point, settings, seeding, precision
# ---------------------------------------------------------------------------------------------

def run_stage(main):
    """Run a stage's main(argv); a UserError becomes one `error:` line and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def start_stage(name, argv):
    """Common start of every stage: apply overrides, fix the seed, print the settings that
    matter. Returns the accelerate PartialState (rank, world size, device)."""
    import torch
    from accelerate import PartialState

    apply_overrides(argv, quiet=False)
    check_values()
    # without CUDA, processes started by torchrun (accelerate_configs/cpu.yaml) join over gloo on the
    # CPU; accelerate only does that when told cpu=True (else each believes it is alone)
    state = PartialState(cpu=not torch.cuda.is_available())
    seed_everything(C.SEED + state.process_index)  # per-rank seed (N+ implementation details)
    qlora_load_kwargs()  # a QLoRA set-up this machine cannot run fails now, not after the data is loaded
    if name in ("sft", "rm") and launched_with_sharded_weights():
        raise UserError(f"train_{name}.py cannot run under DeepSpeed ZeRO-3 or FSDP yet: it evaluates and saves the "
                        "model on one process, which then holds only a shard of it. Use accelerate_configs/ddp.yaml "
                        "or deepspeed_zero2.yaml (train_ppo.py gathers the shards itself)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if state.is_main_process:
        reads = {"sft": C.MODEL_NAME, "rm": C.SFT_DIR, "ppo": f"{C.SFT_DIR} + {C.RM_DIR}"}[name]
        print(f"== {name} | {state.num_processes} process(es) on {state.device} | "
              f"precision {precision()} | from {reads} | lora {C.USE_LORA}")
    return state


# settings whose value must be one of a few words, or a positive number: checked before any work
CHOICES = {"PRECISION": ("auto", "fp32", "bf16", "fp16"), "REPORT_TO": ("tensorboard", "wandb", "none"),
           "PPO_KL_ESTIMATOR": ("k1", "k2", "k3"), "PPO_ADVANTAGE": ("gae", "grpo", "dr_grpo", "rloo", "reinforce++"),
           "PPO_EXEC_REWARD": ("fraction", "all")}
POSITIVE = ("BATCH_SIZE", "GRAD_ACCUM", "EPOCHS", "MAX_LEN", "LR", "LOG_EVERY", "RM_BATCH_SIZE", "RM_GRAD_ACCUM",
            "RM_EPOCHS", "RM_MAX_LEN", "RM_LR", "RM_SCORE_BATCH_SIZE", "GEN_MAX_NEW_TOKENS", "LORA_R", "PPO_STEPS",
            "PPO_BATCH_SIZE", "PPO_MINI_BATCH_SIZE", "PPO_EPOCHS", "PPO_LR", "PPO_CRITIC_LR", "PPO_SAMPLES_PER_PROMPT",
            "PPO_OVERSAMPLE", "PPO_RESPONSE_LEN", "PPO_TEMPERATURE")


def check_values():
    """A value of the right type can still be wrong (`--PPO_KL_ESTIMATOR=k4`, `--BATCH_SIZE=0`): one line
    at the start, not a traceback from deep inside a library later."""
    for name, allowed in CHOICES.items():
        value = getattr(C, name, None)
        if value is not None and str(value).lower() not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    for name in POSITIVE:
        value = getattr(C, name, None)
        if value is not None and not value > 0:
            raise UserError(f"{name} must be above 0, not {value!r} (config.py or --{name}=...)")


def launched_with_sharded_weights():
    """True when `accelerate launch` set up DeepSpeed ZeRO-3 or FSDP (read from the environment
    it passes to each process, before any Accelerator exists)."""
    from accelerate.utils import parse_flag_from_env

    zero3 = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return zero3 or parse_flag_from_env("ACCELERATE_USE_FSDP")


def seed_everything(seed):
    """Python, NumPy and torch RNGs (transformers.set_seed covers all three)."""
    from transformers import set_seed

    set_seed(seed)


def precision():
    """'bf16' on GPUs that support it, else 'fp32' (bf16 matmuls on CPUs without AMX run
    hundreds of times slower than fp32); PRECISION overrides."""
    import torch

    choice = C.PRECISION.lower()
    if choice not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"PRECISION must be auto, fp32, bf16 or fp16, not {C.PRECISION!r}")
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "fp16" and not torch.cuda.is_available():
        raise UserError("PRECISION=fp16 needs a CUDA GPU; use fp32 (or auto) on this machine")
    return choice


def torch_dtype():
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision()]


def trainer_args(config_cls):
    """TrainingArguments fields every TRL stage sets the same way: precision, device, gradient
    checkpointing, logging backend, seed. Precision is set explicitly both ways: TRL's configs
    default bf16 to True whatever the hardware (`use_cpu=True` alone leaves it on)."""
    import dataclasses

    import torch

    p = precision()
    fields = {f.name for f in dataclasses.fields(config_cls)}
    # transformers renamed gradient_checkpointing to activation_checkpointing; TRL defaults it on
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {
        "bf16": p == "bf16", "fp16": p == "fp16", "use_cpu": not torch.cuda.is_available(),
        checkpointing: C.GRADIENT_CHECKPOINTING,
        "report_to": report_to(), "seed": C.SEED,
        "include_num_input_tokens_seen": "non_padding",  # useful tokens, for tokens per second
    }


def report_to():
    choice = C.REPORT_TO.lower()
    if choice not in ("tensorboard", "wandb", "none"):
        raise UserError(f"REPORT_TO must be tensorboard, wandb or none, not {C.REPORT_TO!r}")
    return [] if choice == "none" else [choice]


def lora_config(task_type):
    """peft LoraConfig from the LORA_* settings (task_type 'CAUSAL_LM' or 'SEQ_CLS')."""
    from peft import LoraConfig

    targets = C.LORA_TARGET_MODULES
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=C.LORA_R, lora_alpha=C.LORA_ALPHA, lora_dropout=C.LORA_DROPOUT,
                      target_modules=targets, task_type=task_type)


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------

def resolve_base_model():
    """The folder or hub id of the base model. Builds the embedded default when it is what
    MODEL_NAME names and it does not exist yet."""
    name = C.MODEL_NAME
    if os.path.normpath(name) == os.path.normpath(C.BASE_MODEL_DIR) and not os.path.exists(
            os.path.join(name, "config.json")):
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            from rlhf.base_model import build_base_model

            build_base_model(name)
        state.wait_for_everyone()
        return name
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and os.path.exists(name.split(os.sep)[0])
    if looks_local and not os.path.exists(os.path.join(os.path.expanduser(name), "config.json")):
        raise UserError(f"MODEL_NAME {name!r} is not a model folder (no config.json there); "
                        "give a hub id or a folder saved with save_pretrained")
    return name


def load_tokenizer(path):
    """AutoTokenizer with a pad token distinct from EOS. If the tokenizer has none, an existing
    special token is borrowed (no new embedding rows); returns the tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of {path!r} has no chat template; use an instruct/chat model "
                        "or save one with tokenizer.chat_template = ...")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        spare = [t for t in ("<|pad|>", "<|endoftext|>", "<pad>", tok.unk_token, tok.bos_token)
                 if t is not None and t in tok.get_vocab() and tok.convert_tokens_to_ids(t) != tok.eos_token_id]
        if not spare:
            raise UserError(f"the tokenizer of {path!r} has no token to pad with other than EOS; "
                            "add a pad token (tokenizer.add_special_tokens) and resize the model")
        tok.pad_token = spare[0]
    return tok


def load_causal_lm(path, for_training=True, dtype=None):
    """A causal LM in the stage's precision (or `dtype`); dropout off when not training. With
    QLORA a model for training is loaded in 4-bit and prepared for k-bit training (peft)."""
    from transformers import AutoModelForCausalLM

    quantized = qlora_load_kwargs() if for_training else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch_dtype(), **quantized)
    except OSError as e:
        raise UserError(f"cannot load a model from {path!r}: {str(e).splitlines()[0]}") from None
    if quantized:
        from peft import prepare_model_for_kbit_training

        # norms and the output layer in fp32, input grads on for the adapters (Dettmers et al. 2023)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=C.GRADIENT_CHECKPOINTING)
    if not for_training:
        model.eval()
    return model


def qlora_load_kwargs():
    """from_pretrained arguments that load the frozen base in 4-bit NF4 with double quantisation
    and bf16/fp16 compute (QLoRA, Dettmers et al. 2023) when QLORA is set; {} otherwise."""
    if not C.QLORA:
        return {}
    import importlib.util

    import torch

    if not C.USE_LORA:
        raise UserError("QLORA=True trains LoRA adapters on a 4-bit base: add --USE_LORA=true")
    if not torch.cuda.is_available():
        raise UserError("QLORA=True needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none; "
                        "use --QLORA=false (--USE_LORA=true alone trains LoRA without quantisation)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("QLORA=True needs bitsandbytes: pip install bitsandbytes (or use --QLORA=false)")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    # a quantised model is placed when loaded: each process on its own GPU (data parallel only)
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def merge_lora_weights(base_path, state_dict, dtype=None):
    """A plain causal LM: base_path loaded in full precision (the stage's, or `dtype`) with the
    LoRA weights found in `state_dict` (a state dict of a peft model made with
    lora_config("CAUSAL_LM"); other keys are ignored) merged in.

    For where merging in place would be wrong: a 4-bit base (QLoRA: merged into quantised
    weights, the saved model would be quantised and rounded) or weights sharded across processes
    (ZeRO-3, FSDP: the caller gathers the state dict first)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch_dtype()),
                           lora_config("CAUSAL_LM"))
    lora = {k: v for k, v in state_dict.items() if "lora_" in k}
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(lora) != expected:
        raise RuntimeError(f"merge_lora_weights: {len(expected - set(lora))} LoRA weights missing, "
                           f"{len(set(lora) - expected)} unexpected (LORA_* settings changed since training?)")
    model.load_state_dict(lora, strict=False)
    return model.merge_and_unload()


def save_tokenizer(tokenizer, folder):
    """save_pretrained with right padding. transformers 5 keeps a per-call padding_side="left"
    (used for generation) in the Rust backend and writes it to tokenizer.json, so the saved
    tokenizer would pad left for whoever loads it next; the padding state is reset first."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "no_padding"):
        backend.no_padding()
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)


def require_stage_output(path, stage):
    """Fail with the command to run when a previous stage's output is missing or unfinished."""
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: run `{STAGE_COMMANDS[stage]}` first")
    if not os.path.exists(os.path.join(path, STAGE_INFO_FILE)):
        raise UserError(f"{path} holds no finished {stage.upper()} model (no {STAGE_INFO_FILE}; "
                        f"the run may have been interrupted): run `{STAGE_COMMANDS[stage]}` again")
    return path


def read_stage_info(folder):
    """A stage output's metadata (rlhf_stage.json) as a dict, or None when it is not finished."""
    path = os.path.join(folder, STAGE_INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_output_dir(path):
    """Refuse to replace a finished stage output unless OVERWRITE is set (after finishing a save
    that a kill interrupted)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        recover_interrupted_save(path)
    PartialState().wait_for_everyone()
    if os.path.exists(os.path.join(path, STAGE_INFO_FILE)) and not C.OVERWRITE:
        raise UserError(f"{path} already holds a finished model; move it away or pass --OVERWRITE=true to replace it")


def recover_interrupted_save(path):
    """What a kill during save_stage_output left next to `path`: a complete `<path>.tmp-PID` (killed
    between its two renames, `path` itself gone) is moved into place; an incomplete one (killed while
    writing: possibly gigabytes) is removed; a `<path>.old-PID` whose replacement is in place is removed.
    Each with a line."""
    import glob

    base = path.rstrip("/")
    for tmp in sorted(glob.glob(f"{glob.escape(base)}.tmp-*")):
        if os.path.exists(os.path.join(tmp, STAGE_INFO_FILE)) and not os.path.exists(path):
            print(f"{path}: finishing a save that was interrupted (moving {tmp} into place)")
            os.rename(tmp, path)
        else:
            print(f"removing {tmp}: an incomplete save of {path} (the run was stopped while saving it)")
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(glob.glob(f"{glob.escape(base)}.old-*")):
        if os.path.exists(path):
            print(f"removing {old}: the model {path} replaced (the run was stopped before removing it)")
            shutil.rmtree(old, ignore_errors=True)


def save_stage_output(path, stage, save_fn, metrics, extra=None):
    """Save atomically: `save_fn(tmp_dir)` writes the model and tokenizer into a temporary
    sibling folder, we add the metadata file, then swap it into place. A crash mid-save leaves
    the previous output (or nothing), never a half-written folder that looks finished."""
    from rlhf.checkpoints import disk_full_is_an_error  # (it imports this module)

    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"{path} is unchanged" if os.path.exists(path) else f"nothing was written to {path}"
    with disk_full_is_an_error(path, tmp, f"{kept}, the checkpoints under {C.RUNS_DIR} are kept"):
        os.makedirs(tmp)
        save_fn(tmp)
        info = {
            "stage": stage,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "base_model": C.MODEL_NAME,
            "metrics": metrics,
            "settings": scalar_settings(),
        }
        info.update(extra or {})
        write_json(os.path.join(tmp, STAGE_INFO_FILE), info)
    old = f"{path.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def scalar_settings():
    return {k: v for k, v in settings().items() if isinstance(v, (bool, int, float, str, type(None)))}


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

def log_line_callback(stage, keys):
    """A Trainer callback that replaces the dict printout with one fixed-format line per log step
    (`sft step 40/206 | loss 1.2 | lr 0.002 | 5.1 s`), keeping the progress bar. `keys` lists
    (log key, label) pairs to show, in order."""
    from transformers.trainer_callback import ProgressCallback

    class LogLine(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            if not any(k in logs for k in ("loss", "eval_loss")):
                return  # the end-of-training summary: printed by the stage itself
            parts = [f"{stage} step {state.global_step}/{state.max_steps}"]
            parts += [f"{label} {logs[key]:.4g}" for key, label in keys if key in logs]
            now = time.time()
            parts.append(f"{now - getattr(self, '_last', now):.1f} s")
            self._last = now
            self.training_bar.write(" | ".join(parts))

    return LogLine


def use_log_line(trainer, stage, keys):
    """Swap the Trainer's default progress printer for log_line_callback."""
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log_line_callback(stage, keys))
