"""Stage 1 of 3: supervised fine-tuning (SFT) with TRL's SFTTrainer.

Reads  MODEL_NAME (the embedded ./base_model by default, built when missing) and the
       conversations in SFT_TRAIN_FILE / SFT_EVAL_FILE (TRL formats: `messages`, or
       `prompt` + `completion`).
Writes ./sft_model: a plain Hugging Face causal-LM folder (merged when LoRA is on) with
       tokenizer, chat template and generation config, plus eval_results.json (held-out
       perplexity, token accuracy, greedy pass@1, pass@EVAL_SAMPLES of sampled answers),
       eval_results.jsonl (each held-out task's greedy answer and verdict, as
       scripts/evaluate.py writes them; train_rm.py checks its RM against them) and
       rlhf_stage.json (hand-off metadata).

The loss is on the assistant's answer only (TRL's prompt-completion form); in a conversation with
several assistant turns, on every assistant turn (rlhf.data.assistant_labels). Batches group
sequences of similar length so little compute goes to padding (PACKING=True packs padding-free,
the faster choice on GPUs with flash-attention); precision follows the hardware.

    python train_sft.py                                   # embedded default, CPU is fine
    python train_sft.py --USE_LORA=true --LR=1e-4         # LoRA, merged on save
    python train_sft.py --MODEL_NAME=bigcode/starcoder2-3b --CHAT_TEMPLATE=chatml  # a base model: tuned on ChatML
    accelerate launch --config_file accelerate_configs/ddp.yaml train_sft.py  # several GPUs (docs/DISTRIBUTED.md: DeepSpeed, FSDP)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_sft.py  # 2 CPU processes

Any constant of config.py can be overridden as --NAME=value.
"""

import math
import os
import time

import config as C
from rlhf.base_model import resolve_base_model
from rlhf.checkpoints import checkpoint_folder, staging_folder, train_resumable
from rlhf.codeeval import load_problems, sandbox_limits, stage_evaluation
from rlhf.common import (
    check_lora_targets, fit_embeddings, head_scales_logits, load_causal_lm, load_tokenizer, lora_config,
    merge_lora_weights, run_stage, start_stage, stop_at_end_of_turn, torch_dtype, trainer_args, trainer_schedule,
    trainer_sizes, use_log_line,
)
from rlhf.data import conversation, drop_too_long, load_sft_examples, sft_rows, template_lengths
from rlhf.handoff import check_output_dir, save_stage, write_jsonl
from rlhf.settings import scalar_settings


def token_lengths(tokenizer, examples, source="SFT data"):
    """Tokens of prompt + completion as the chat template renders them (what SFTTrainer sees)."""
    return template_lengths(tokenizer, [conversation(ex) for ex in examples], source)


def score_answer_tokens_only(model):
    """On a CPU, make the forward TRL's SFTTrainer calls (`fused_lm_head=True`) project only the
    answer positions through the LM head, with plain log_softmax.

    TRL computes the loss without materialising (batch, seq, vocab) logits: on GPUs with Triton
    only the positions that carry a label go through the head; elsewhere its tiled torch
    fallback scores every position (prompts and padding too) and recomputes each tile in the
    backward pass. On the embedded default that fallback was 40% of an SFT step (bench/README.md);
    here the head sees the answer tokens once: (answer tokens, vocab) logits, ~20 MiB per batch.
    Same loss, gradients and metrics as TRL's (tests/test_sft.py)."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    if model.device.type != "cpu" or head_scales_logits(model):  # GPUs: TRL's kernel is already compact; scaled heads: keep TRL's
        return
    trl_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                               **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # (B, T, H)
        if shift_labels is None:  # position t predicts token t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100  # (B, T-1): answer tokens
        target = labels[mask]
        logps = self.get_output_embeddings()(hidden[mask]).float().log_softmax(-1)  # (answer tokens, vocab)
        token_logps = logps.gather(-1, target[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logps.exp() * logps).sum(-1)
            is_top1 = logps.argmax(-1) == target
        full = lambda x: x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731  back to (B, T-1), 0 elsewhere
        log_probs = full(token_logps)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=full(entropy),
                                   is_top1=full(is_top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)


def sft_trainer(model, tokenizer, train, evals, output_dir, answer_only_head=True, **overrides):
    """The SFTTrainer of this stage, writing checkpoints to output_dir; `overrides` replace SFTConfig
    fields (bench/ uses max_steps); answer_only_head=False keeps TRL's own CPU loss path (bench/)."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    fields = dict(
        output_dir=output_dir,
        **trainer_sizes(C.BATCH_SIZE, C.GRAD_ACCUM, C.EPOCHS, C.LR),
        weight_decay=C.WEIGHT_DECAY,
        max_length=C.MAX_LEN,
        # padding-free packing needs varlen attention (flash-attention) to pay off; without it,
        # batches of similar lengths waste little on padding
        packing=C.PACKING,
        train_sampling_strategy="random" if C.PACKING else "group_by_length",
        **trainer_schedule(C.WARMUP_RATIO, C.EVAL_EVERY, C.LOG_EVERY),  # cosine after warm-up; log, evaluate, save as RM does
        # with early stopping the checkpoint of lowest held-out loss is kept and loaded at the end
        load_best_model_at_end=C.SFT_EARLY_STOP_PATIENCE > 0,
        metric_for_best_model="eval_loss",
    )
    fields.update(trainer_args(SFTConfig, C), **overrides)
    fields["load_best_model_at_end"] &= fields["eval_strategy"] != "no"  # no evaluations, nothing to stop on
    args = SFTConfig(**fields)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(sft_rows(tokenizer, train)), eval_dataset=Dataset.from_list(sft_rows(tokenizer, evals)),
        peft_config=lora_config("CAUSAL_LM", C) if C.USE_LORA else None,
        callbacks=[EarlyStoppingCallback(C.SFT_EARLY_STOP_PATIENCE)] if args.load_best_model_at_end else None,
    )
    if answer_only_head:  # on the model TRL patched (under the LoRA wrapper when there is one)
        score_answer_tokens_only(trainer.model.get_base_model() if C.USE_LORA else trainer.model)
    return trainer


def final_evaluation(trainer):
    """The held-out metrics of the weights training ended with: those of the evaluation that scored
    them during training (the best checkpoint, which early stopping loads, or the last step), so
    they are not computed twice; trainer.evaluate() only when no evaluation did."""
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end else state.global_step
    scored = [h for h in state.log_history if "eval_loss" in h and h.get("step") == step]
    return scored[-1] if scored else trainer.evaluate()


def main(argv):
    state = start_stage("sft", argv)
    check_output_dir(C.SFT_DIR, C.OVERWRITE)

    # ---- data: conversational prompt-completion, too-long examples dropped with a count
    train = load_sft_examples(C.SFT_TRAIN_FILE)  # read before the base model is built: bad data writes nothing
    evals = load_sft_examples(C.SFT_EVAL_FILE)
    problems = None  # held-out code tasks for pass@1 at the end, read now: a bad row stops the run before training
    if C.SFT_EVAL_PASS_AT_1 and C.EVAL_TASKS_FILE:  # a file or hub id; one that cannot be read stops the run
        problems = load_problems(C.EVAL_TASKS_FILE)[: C.EVAL_MAX_TASKS or None]
    seed_problems = load_problems(C.SEED_PROMPTS_FILE) if problems and C.SEED_PROMPT_SAMPLES and C.SEED_PROMPTS_FILE else []
    base = resolve_base_model(C)
    tokenizer = load_tokenizer(base, C.CHAT_TEMPLATE)  # chatml: ChatML in place of the model's own
    train = drop_too_long(train, token_lengths(tokenizer, train, C.SFT_TRAIN_FILE), C.MAX_LEN, C.SFT_TRAIN_FILE)
    evals = drop_too_long(evals, token_lengths(tokenizer, evals, C.SFT_EVAL_FILE), C.MAX_LEN, C.SFT_EVAL_FILE)
    if state.is_main_process:
        print(f"data: {len(train)} train / {len(evals)} eval conversations")

    # ---- model
    model = load_causal_lm(base, torch_dtype(C.PRECISION), qlora=C.QLORA, gradient_checkpointing=C.GRADIENT_CHECKPOINTING)
    fit_embeddings(model, tokenizer, C.USE_LORA)  # room for the tokens CHAT_TEMPLATE=chatml added
    check_lora_targets(model, C.USE_LORA, C.LORA_TARGET_MODULES)
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(C.RUNS_DIR, "sft")
    # checkpoints are written to the staging folder and moved when complete (train_resumable)
    checkpoints, run_settings = checkpoint_folder(C.RUNS_DIR, "sft"), scalar_settings()
    trainer = sft_trainer(model, tokenizer, train, evals, staging_folder(checkpoints))
    use_log_line(trainer, "sft", [("loss", "loss"), ("eval_loss", "eval loss"), ("mean_token_accuracy", "acc"),
                                  ("eval_mean_token_accuracy", "eval acc"), ("learning_rate", "lr")])

    # ---- train (resuming from the last complete checkpoint of an interrupted run)
    t0 = time.time()
    result = train_resumable(trainer, "sft", "LR", checkpoints, run_settings)
    train_seconds = time.time() - t0

    # ---- held-out loss and token accuracy of the model training ended with
    metrics = final_evaluation(trainer)
    metrics = {
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": math.exp(min(metrics["eval_loss"], 50.0)),
        "eval_token_accuracy": metrics.get("eval_mean_token_accuracy"),
        "train_loss": result.training_loss,
        "train_seconds": train_seconds,
        "train_tokens": trainer.state.num_input_tokens_seen or None,
        "epochs_trained": round(trainer.state.epoch or 0, 2),
    }
    if C.SFT_EARLY_STOP_PATIENCE > 0 and state.is_main_process:
        print(f"early stopping: best held-out loss {trainer.state.best_metric:.4f} at "
              f"{trainer.state.best_model_checkpoint}, trained {metrics['epochs_trained']} of {C.EPOCHS} epochs")
    model = trainer.model
    if C.USE_LORA:  # a plain model: RM, PPO and transformers load it as is (QLoRA: merged into a full-precision base)
        model = (merge_lora_weights(base, model.state_dict(), lora_config("CAUSAL_LM", C), torch_dtype(C.PRECISION))
                 if C.QLORA else model.merge_and_unload())
    model.eval()
    stop_at_end_of_turn(model, tokenizer)

    # ---- pass@1 on held-out code tasks, run in the sandbox
    answers = []  # per task: the answer and its verdict (saved as eval_results.jsonl)
    if problems is not None and state.is_main_process:
        results, answers = stage_evaluation(model, tokenizer, problems, seed_problems, C.EVAL_SAMPLES,
                                            C.SEED_PROMPT_SAMPLES, C.GEN_MAX_NEW_TOKENS, sandbox_limits(C),
                                            C.GEN_BATCH_SIZE)
        metrics.update(results)
    elif C.SFT_EVAL_PASS_AT_1 and state.is_main_process:
        print("no pass@1: EVAL_TASKS_FILE is empty (set it, or SFT_EVAL_PASS_AT_1=False)")

    # ---- save ./sft_model (main process; atomic, with metadata)
    if state.is_main_process:
        metrics["log_history"] = trainer.state.log_history
        save_stage("sft", C.SFT_DIR, model, tokenizer, metrics, checkpoints, run_settings,
                   also=lambda tmp: write_jsonl(os.path.join(tmp, "eval_results.jsonl"), answers) if answers else None)
    state.wait_for_everyone()


if __name__ == "__main__":
    run_stage(main)
