"""What the three stages must do identically: start-up (settings, --help, errors, seeding),
precision, the Trainer settings SFT and RM share, LoRA, the tokenizer's pad/EOS set-up and model
loading. The hand-off between stages (atomic save with a small metadata file, clear errors for a
missing input) is in rlhf/handoff.py, data loading in rlhf/data.py, checkpoints in
rlhf/checkpoints.py."""

import os
import random
import sys
import time

import config as C
from rlhf.handoff import STAGE_COMMANDS, check_lineage, learning_rate_notes
from rlhf.model_card import check_hub_login
from rlhf.settings import UserError, apply_overrides, check_values, scalar_settings, stage_help
from rlhf.settings import choice as settings_choice


# ---------------------------------------------------------------------------------------------
# Entry point, settings, seeding, precision
# ---------------------------------------------------------------------------------------------

def run_stage(main):
    """Run a stage's or a tool's main(argv); a UserError becomes one `error:` line and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def start_stage(name, argv):
    """Common start of every stage: apply overrides, fix the seed, check what can fail early, print
    the settings that matter. Part of each stage's main(): it reads and sets config.py's constants
    (REPORT_TO to what PPO can log to, MODEL_NAME to the SFT output's) and hands the helpers values.
    Returns the accelerate PartialState (rank, world size, device)."""
    if any(a in ("-h", "--help") for a in argv):  # the stage's docstring and the settings it reads
        script = sys.modules.get(f"train_{name}") or sys.modules["__main__"]
        print(stage_help(name, script.__doc__ or ""))
        sys.exit(0)
    import torch
    from accelerate import PartialState

    given = apply_overrides(argv, quiet=False)
    check_values()
    # without CUDA, processes started by torchrun (accelerate_configs/cpu.yaml) join over gloo on the
    # CPU; accelerate only does that when told cpu=True (else each believes it is alone)
    state = PartialState(cpu=not torch.cuda.is_available())
    seed_everything(C.SEED + state.process_index)  # per-rank seed (N+ implementation details)
    qlora_load_kwargs(C.QLORA)  # a QLoRA set-up this machine cannot run fails now, not after the data is loaded
    check_hub_login(C.PUSH_TO_HUB)  # PUSH_TO_HUB without a token: now, not after training
    C.REPORT_TO = check_report_to(C.REPORT_TO, name, state.is_main_process)  # unknown or not installed: now
    if name in ("sft", "rm", "dpo") and launched_with_sharded_weights():
        raise UserError(f"train_{name}.py cannot run under DeepSpeed ZeRO-3 or FSDP yet: it evaluates and saves the "
                        "model on one process, which then holds only a shard of it. Use accelerate_configs/ddp.yaml "
                        "or deepspeed_zero2.yaml (train_ppo.py gathers the shards itself)")
    # the earlier stage outputs: this run's MODEL_NAME and RECIPE
    C.MODEL_NAME = check_lineage(name, given, scalar_settings(), state.is_main_process)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if state.is_main_process:
        for line in learning_rate_notes(name, given, scalar_settings()):
            print(line)
        reads = {"sft": C.MODEL_NAME, "rm": C.SFT_DIR, "ppo": f"{C.SFT_DIR} + {C.RM_DIR}", "dpo": C.SFT_DIR}[name]
        print(f"== {name} | {state.num_processes} process(es) on {state.device} | "
              f"precision {precision(C.PRECISION)} | from {reads} | lora {C.USE_LORA}")
    return state


def launched_with_sharded_weights():
    """True when `accelerate launch` set up DeepSpeed ZeRO-3 or FSDP (read from the environment
    it passes to each process, before any Accelerator exists)."""
    from accelerate.utils import parse_flag_from_env

    zero3 = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return zero3 or parse_flag_from_env("ACCELERATE_USE_FSDP")


def head_scales_logits(model):
    """True when a causal LM's output is more than its LM head's linear layer (soft-capped or
    scaled logits: Gemma 2, Cohere, Granite, ...): code that calls the head itself must then leave
    the model's own forward in charge."""
    config = model.config.get_text_config()
    return any(getattr(config, a, None) is not None for a in
               ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def seed_everything(seed):
    """Python, NumPy and torch RNGs (every device's), as transformers.set_seed seeds them; not
    through it: importing it loads transformers' Trainer utilities and with them peft, ~4 s of
    start-up for a process that needs neither (PPO, the tools)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def precision(setting):
    """The precision the PRECISION setting (`setting`) stands for: auto is 'bf16' on GPUs that
    support it, else 'fp32' (bf16 matmuls on CPUs without AMX run hundreds of times slower than fp32)."""
    import torch

    choice = settings_choice("PRECISION", setting)
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "fp16" and not torch.cuda.is_available():
        raise UserError("PRECISION=fp16 needs a CUDA GPU; use fp32 (or auto) on this machine")
    return choice


def mixed_precision(setting):
    """accelerate's mixed_precision for PRECISION = `setting`: "bf16", "fp16" (with its loss
    scaling) or "no" (fp32)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision(setting), "no")


def torch_dtype(setting):
    """The torch dtype of PRECISION = `setting`."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision(setting)]


def trainer_args(config_cls, settings):
    """TrainingArguments fields every TRL stage sets the same way from `settings` (config.py's module
    in a stage): precision, device, gradient checkpointing, logging backend, seed. Precision is set
    explicitly both ways: TRL's configs default bf16 to True whatever the hardware (`use_cpu=True`
    alone leaves it on)."""
    import dataclasses

    import torch

    p = precision(settings.PRECISION)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    # transformers renamed gradient_checkpointing to activation_checkpointing; TRL defaults it on
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {
        "bf16": p == "bf16", "fp16": p == "fp16", "use_cpu": not torch.cuda.is_available(),
        checkpointing: settings.GRADIENT_CHECKPOINTING,
        "report_to": report_to(settings.REPORT_TO), "seed": settings.SEED,
        "include_num_input_tokens_seen": "non_padding",  # useful tokens, for tokens per second
    }


def trainer_sizes(batch_size, grad_accum, epochs, learning_rate):
    """The TrainingArguments fields each TRL stage (SFT, RM, DPO) fills from its own settings: the
    per-device batch for training and evaluation, gradient accumulation, epochs, peak learning rate."""
    return {"per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
            "gradient_accumulation_steps": grad_accum, "num_train_epochs": epochs, "learning_rate": learning_rate}


def trainer_schedule(warmup_ratio, eval_every, log_every):
    """When SFT's and RM's Trainer log, evaluate and save, and their learning-rate schedule: cosine
    decay after a warm-up share of the steps; a line every `log_every` optimizer steps (LOG_EVERY);
    a held-out evaluation and a checkpoint every `eval_every` (EVAL_EVERY; 0: each epoch), one
    checkpoint kept."""
    every = "steps" if eval_every else "epoch"
    return {
        "lr_scheduler_type": "cosine",
        "warmup_steps": warmup_ratio,  # a float below 1 is a share of the total steps (check_values keeps it there)
        "logging_steps": log_every,
        "eval_strategy": every, "eval_steps": eval_every or None,
        "save_strategy": every, "save_steps": eval_every or None,
        "save_total_limit": 1,
    }


def report_to(setting):
    """The REPORT_TO setting (`setting`) as a list of tracker names ([] for none); check_report_to has
    checked them."""
    names = [n.strip().lower() for n in setting.split(",") if n.strip()]
    return [] if names == ["none"] else names


def check_report_to(setting, stage, main_process=True):
    """REPORT_TO (`setting`) names trackers that transformers' Trainer supports (SFT, RM: its
    report_to) and that are installed, else one line; PPO logs through accelerate, which has fewer:
    the others are left out of PPO's with a line. Returns the REPORT_TO the stage logs to."""
    names = report_to(setting)
    if "none" in names:
        raise UserError(f"REPORT_TO={setting!r}: none stands alone")
    if stage == "ppo":
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        known, installed = {t.value for t in LoggerType}, {t.value for t in get_available_trackers()}
        left_out = [n for n in names if n not in known]
        if left_out:
            check_transformers_trackers(left_out)  # a typo is an error, a Trainer-only tracker a note
            if main_process:
                print(f"ppo: REPORT_TO {', '.join(left_out)}: not a tracker of accelerate, which PPO logs through "
                      f"(it has {', '.join(sorted(known - {'all'}))}); left out")
            names = [n for n in names if n in known]
            setting = ",".join(names) or "none"
    else:
        installed = check_transformers_trackers(names)
    missing = [n for n in names if n != "all" and n not in installed]
    if missing:
        raise UserError(f"REPORT_TO={setting!r}: {', '.join(missing)} is not installed here: pip install "
                        f"{' '.join(missing)} (or --REPORT_TO=tensorboard)")
    return setting


def check_transformers_trackers(names):
    """The trackers transformers supports: an unknown name in `names` is one line that lists them.
    Returns the installed ones."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK and n != "all"]
    if unknown:
        raise UserError(f"REPORT_TO: unknown tracker {unknown[0]!r}; transformers supports "
                        f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, all or none (comma-separated)")
    return set(get_available_reporting_integrations())


def lora_config(task_type, settings):
    """peft LoraConfig from the LORA_* of `settings` (config.py's module in a stage): task_type
    'CAUSAL_LM' (SFT, PPO policy) or 'SEQ_CLS' (reward model, PPO critic), whose new scalar head
    `score` is trained fully, not through an adapter."""
    from peft import LoraConfig

    targets = settings.LORA_TARGET_MODULES
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=settings.LORA_R, lora_alpha=settings.LORA_ALPHA, lora_dropout=settings.LORA_DROPOUT,
                      target_modules=targets,
                      task_type=task_type, modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


def check_lora_targets(model, use_lora, target_modules):
    """LORA_TARGET_MODULES (`target_modules`) names layers `model` has, when USE_LORA (`use_lora`): one
    line listing its linear layers, before any training, instead of peft's error from inside the Trainer."""
    if not use_lora or target_modules == "all-linear":
        return
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
    missing = [t for t in wanted if not any(name == t or name.endswith("." + t) for name, _ in model.named_modules())]
    if missing or not wanted:
        raise UserError(f"LORA_TARGET_MODULES: the model has no layer named {', '.join(missing) or '(none given)'}; "
                        f"its linear layers are {', '.join(linear)} (or use all-linear)")


def prompt_rng(seed, rank, step):
    """The random generator that picks the prompts of one PPO step: a function of (seed, rank,
    step) only, so a resumed run sees the prompts it would have seen, with no sampler state to
    save, and each process draws its own."""
    return random.Random(seed * 1_000_003 + rank * 10_007 + step)


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------

def load_tokenizer(path, chat_template="model"):
    """AutoTokenizer with a pad token distinct from EOS. If the tokenizer has none, an existing
    special token is borrowed (no new embedding rows); returns the tokenizer. chat_template
    (CHAT_TEMPLATE, which SFT passes): "model" keeps the tokenizer's own, "chatml" puts ChatML in
    its place (use_chatml; the model's embeddings must then fit the tokenizer: fit_embeddings)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if chat_template.lower() == "chatml":
        use_chatml(tok)
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of {path!r} has no chat template (a base model?): train_sft.py "
                        "--CHAT_TEMPLATE=chatml tunes it on ChatML, or start from an instruct/chat model")
    ends = end_of_turn_ids(tok)
    if tok.pad_token_id is None or tok.pad_token_id in ends:
        spare = [t for t in ("<|pad|>", "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<|fim_pad|>", "<fim_pad>",
                             tok.unk_token, tok.bos_token)  # fim_pad: the fill-in-the-middle padding of code models
                 if t is not None and t in tok.get_vocab() and tok.convert_tokens_to_ids(t) not in ends]
        if not spare:
            raise UserError(f"the tokenizer of {path!r} has no token to pad with other than the end of a turn; "
                            "add a pad token (tokenizer.add_special_tokens) and resize the model")
        tok.pad_token = spare[0]
    return tok


def use_chatml(tokenizer):
    """Put ChatML (the embedded default's template, rlhf/base_model.py) in place of the tokenizer's
    chat template, after its BOS when it has one of its own (Llama, Mistral and Gemma saw BOS before
    every document in pre-training; GPT-style tokenizers such as StarCoder2's name their EOS as BOS
    and add none), and add <|im_start|> and <|im_end|> as special tokens where the vocabulary lacks
    them. <|im_end|> ends a turn (end_of_turn_ids finds it in the template)."""
    from rlhf.base_model import CHAT_TEMPLATE

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = "{%- if bos_token and bos_token != eos_token %}{{- bos_token }}{%- endif %}" + CHAT_TEMPLATE


def fit_embeddings(model, tokenizer, lora):
    """Grow the model's input and output embeddings to the tokenizer's vocabulary when it has more
    tokens (CHAT_TEMPLATE=chatml added ChatML's), the new rows at the mean of the others. Not under
    LoRA: its adapters would leave those rows untrained, and a mean output row is never the most
    likely token, so the model could not learn to end a turn."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return
    if lora:
        raise UserError(f"the chat template's tokens are new to the model ({len(tokenizer) - rows} embedding rows to "
                        "train) and LoRA does not train embeddings: run SFT with --USE_LORA=false, or start from a "
                        "model whose tokenizer has a chat template")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def end_of_turn_ids(tokenizer, model=None):
    """The token ids that end an answer, the one definition every stage samples, masks and stops
    with: the tokenizer's EOS, the EOS ids of the model's generation_config (Qwen2.5 lists
    <|im_end|> and <|endoftext|>), and the special token the chat template writes right after an
    assistant message, which the tokenizer's EOS need not be (Llama 3 ends a turn with <|eot_id|>
    and a document with <|end_of_text|>; a base model tuned on a ChatML template ends turns with
    <|im_end|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [] if configured is None else [configured]
    ids = [tokenizer.eos_token_id, *configured, *template_end_ids(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def stop_at_end_of_turn(model, tokenizer):
    """Write end_of_turn_ids and the pad id into the generation_config a causal LM is saved with,
    so that transformers' generate() and pipelines stop where our stages stop."""
    ids = end_of_turn_ids(tokenizer, model)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def template_end_ids(tokenizer):
    """[id] of the special token the chat template puts right after an assistant message's text
    ([] when it puts none there, or there is no template): found by rendering a two-turn
    conversation and reading what follows the answer."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    answer = "4f1c9e2a"  # text no template rewrites
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001  a template that rejects this conversation (jinja raise_exception) marks nothing
        return []
    tail = text[text.rfind(answer) + len(answer):] if answer in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[:1] if ids and ids[0] in special else []


def load_causal_lm(path, dtype, for_training=True, qlora=False, gradient_checkpointing=False):
    """A causal LM in `dtype` (torch_dtype(PRECISION) in a stage); dropout off when not training.
    With `qlora` (QLORA) a model for training is loaded in 4-bit and prepared for k-bit training
    (peft), with `gradient_checkpointing` (GRADIENT_CHECKPOINTING) on."""
    from transformers import AutoModelForCausalLM

    quantized = qlora_load_kwargs(qlora) if for_training else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
    except OSError as e:
        raise UserError(f"cannot load a model from {path!r}: {str(e).splitlines()[0]}") from None
    if quantized:
        from peft import prepare_model_for_kbit_training

        # norms and the output layer in fp32, input grads on for the adapters (Dettmers et al. 2023)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if not for_training:
        model.eval()
    return model


def load_for_generation(name, precision_setting):
    """(model, tokenizer) of a stage output or hub id, as the tools in scripts/ use it: the model in
    the precision of PRECISION = `precision_setting` (auto: bf16 on GPUs that support it, else fp32),
    dropout off, on the GPU when there is one; the tokenizer with load_tokenizer's pad/EOS set-up."""
    path = os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or os.path.isdir(path)
    if looks_local and not os.path.exists(os.path.join(path, "config.json")):
        stage = {"sft_model": "sft", "rm_model": "rm", "ppo_model": "ppo", "dpo_model": "dpo"}.get(
            os.path.basename(name.rstrip("/")))
        hint = (f"run `{STAGE_COMMANDS[stage]}` (or `bash run.sh`) first" if stage else
                "give a model folder saved with save_pretrained, or a hub id")
        raise UserError(f"{name} is not a model folder (no config.json there): {hint}")
    import torch  # after the folder check: a typo should not wait for torch to import

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, torch_dtype(precision_setting), for_training=False)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def qlora_load_kwargs(qlora):
    """from_pretrained arguments that load the frozen base in 4-bit NF4 with double quantisation
    and bf16/fp16 compute (QLoRA, Dettmers et al. 2023) when `qlora` (QLORA); {} otherwise."""
    if not qlora:
        return {}
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("QLORA=True needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none; "
                        "use --QLORA=false (--USE_LORA=true alone trains LoRA without quantisation)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("QLORA=True needs bitsandbytes: pip install -e \".[qlora]\" (or use --QLORA=false)")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    # a quantised model is placed when loaded: each process on its own GPU (data parallel only)
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def merge_lora_weights(base_path, state_dict, lora, dtype):
    """A plain causal LM: base_path loaded in `dtype` with the LoRA weights found in `state_dict`
    (a state dict of a peft model made with the LoraConfig `lora`, lora_config("CAUSAL_LM", ...);
    other keys are ignored) merged in.

    For where merging in place would be wrong: a 4-bit base (QLoRA: merged into quantised
    weights, the saved model would be quantised and rounded) or weights sharded across processes
    (ZeRO-3, FSDP: the caller gathers the state dict first)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype), lora)
    adapters = {k: v for k, v in state_dict.items() if "lora_" in k}
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(adapters) != expected:
        raise RuntimeError(f"merge_lora_weights: {len(expected - set(adapters))} LoRA weights missing, "
                           f"{len(set(adapters) - expected)} unexpected (LORA_* settings changed since training?)")
    model.load_state_dict(adapters, strict=False)
    return model.merge_and_unload()


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
