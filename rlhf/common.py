"""What the three stages must do identically: settings and errors, seeding, precision, the
tokenizer's pad/EOS set-up, data loading and validation, and the hand-off between stages
(atomic save with a small metadata file, clear errors for a missing input)."""

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
    """Refuse to replace a finished stage output unless OVERWRITE is set."""
    if os.path.exists(os.path.join(path, STAGE_INFO_FILE)) and not C.OVERWRITE:
        raise UserError(f"{path} already holds a finished model; move it away or pass --OVERWRITE=true to replace it")


def save_stage_output(path, stage, save_fn, metrics, extra=None):
    """Save atomically: `save_fn(tmp_dir)` writes the model and tokenizer into a temporary
    sibling folder, we add the metadata file, then swap it into place. A crash mid-save leaves
    the previous output (or nothing), never a half-written folder that looks finished."""
    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    info = {
        "stage": stage,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "base_model": C.MODEL_NAME,
        "metrics": metrics,
        "settings": {k: v for k, v in settings().items() if isinstance(v, (bool, int, float, str, type(None)))},
    }
    info.update(extra or {})
    with open(os.path.join(tmp, STAGE_INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
    old = f"{path.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Data: TRL standard formats from local files or hub datasets, validated with file:line errors
# ---------------------------------------------------------------------------------------------

def load_rows(source):
    """Rows (list of dicts) from a .jsonl/.json/.parquet file or a `datasets` hub id
    ("name" or "name:split")."""
    if os.path.exists(source):
        if os.path.getsize(source) == 0:
            raise UserError(f"{source} is empty")
        if source.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(source)
        if source.endswith(".json"):
            try:
                with open(source, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{source}: not valid UTF-8 JSON ({e})") from None
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of objects")
            return data
        if source.endswith(".parquet"):
            import datasets

            return datasets.load_dataset("parquet", data_files=source, split="train").to_list()
        raise UserError(f"{source}: unknown file type; use .jsonl, .json or .parquet")
    if source.startswith((".", "/")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise UserError(f"data file {source} not found (build the bundled data with `python scripts/build_data.py`)")
    import datasets

    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train").to_list()
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise UserError(f"cannot load dataset {source!r} from the hub ({type(e).__name__}); "
                        "download it first or point the setting at a local file") from None


def read_jsonl(path):
    """Rows of a .jsonl (or .jsonl.gz) file, each with its line number in `_line`; a bad line is a
    UserError naming the file and line."""
    import gzip

    rows = []
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def _where(source, row, index):
    return f"{source}:{row.get('_line', index + 1)}"


def _check_messages(messages, where, field):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `{field}` must be a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message in `{field}` needs a string `role` and `content`")


def as_conversation(value, role):
    """A TRL field that may be plain text or a list of messages -> a list of messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def load_sft_examples(source):
    """SFT rows in TRL's conversational prompt-completion form: {"prompt": [messages],
    "completion": [assistant message]}. Accepts {"messages": [...]} (the last message must be
    the assistant's; loss goes on it) or {"prompt", "completion"} as text or messages."""
    out = []
    for i, row in enumerate(load_rows(source)):
        where = _where(source, row, i)
        if "messages" in row:
            _check_messages(row["messages"], where, "messages")
            if row["messages"][-1]["role"] != "assistant":
                raise UserError(f"{where}: the last message must be the assistant's answer")
            prompt, completion = row["messages"][:-1], row["messages"][-1:]
        elif "prompt" in row and "completion" in row:
            prompt, completion = as_conversation(row["prompt"], "user"), as_conversation(row["completion"], "assistant")
            _check_messages(prompt, where, "prompt")
            _check_messages(completion, where, "completion")
        else:
            raise UserError(f"{where}: missing field: each row needs `messages`, or `prompt` and `completion`")
        out.append({"prompt": prompt, "completion": completion})
    return out


def load_preference_pairs(source):
    """RM rows in TRL's conversational preference form {"prompt", "chosen", "rejected"}
    (implicit-prompt rows with only chosen/rejected conversations are accepted too)."""
    out = []
    for i, row in enumerate(load_rows(source)):
        where = _where(source, row, i)
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{where}: missing field `{missing[0]}`: each row needs `prompt`, `chosen`, `rejected`")
        prompt = as_conversation(row.get("prompt", []), "user")
        chosen, rejected = as_conversation(row["chosen"], "assistant"), as_conversation(row["rejected"], "assistant")
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            _check_messages(value, where, field)
        if prompt:
            _check_messages(prompt, where, "prompt")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def drop_too_long(examples, lengths, max_len, source):
    """Drop examples over max_len tokens with a count; an error if none is left."""
    kept = [ex for ex, n in zip(examples, lengths) if n <= max_len]
    dropped = len(examples) - len(kept)
    if not kept:
        raise UserError(f"{source}: all {len(examples)} examples are longer than MAX_LEN={max_len} tokens; raise MAX_LEN")
    if dropped:
        print(f"dropped {dropped} of {len(examples)} examples of {source} longer than MAX_LEN={max_len} tokens")
    return kept


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
