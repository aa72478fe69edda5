"""Stage 2 of 3: reward model (RM) with TRL's RewardTrainer.

Reads  ./sft_model (SFT_DIR: the SFT stage's output, with its tokenizer and chat template) and
       the preference pairs in RM_TRAIN_FILE / RM_EVAL_FILE (TRL conversational preference
       format: {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}).
Writes ./rm_model (RM_DIR): a plain AutoModelForSequenceClassification folder with one output
       (merged when LoRA is on) and the SFT tokenizer, plus reward_normalization.json (mean/std
       for PPO; also in config.json as reward_mean/reward_std), eval_results.json (held-out
       accuracy, F1, margin, agreement with the tests), onpolicy_pairs.jsonl (the on-policy pairs
       below, when made) and rlhf_stage.json (hand-off metadata).

The SFT model gets a scalar head (`score`) and is trained with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022), plus a small centring term that keeps
scores near 0 (Eisenstein et al. 2023). The score is read at the last token the chat template
emits for prompt + answer; PPO scores its rollouts through rlhf.reward.score_responses, which
builds that same input.

Metrics on the held-out pairs (RM_EVAL_FILE):
  accuracy  share of pairs whose chosen answer scores above the rejected one;
  margin    mean of (chosen score - rejected score);
  F1        each pair counts as two examples, chosen (label 1) and rejected (label 0), each
            classified "preferred" when its score is above the normalisation mean (computed on
            the training pairs, so no held-out label is used); F1 = 2PR/(P+R) of that class.
            Accuracy compares two answers to the same prompt; F1 checks that one threshold
            separates good from bad answers across prompts, as PPO needs: it sees one answer at
            a time and its centred reward (score - mean) / std is positive exactly when the
            answer is classified preferred.
  accuracy_buggy, accuracy_wrong_value  the accuracy apart on the two kinds of pairs, when the
            eval file gives each pair's `bug`: a correct against a buggy program (any bug but
            "wrong_value"), and a correct program against another variant's correct program
            ("wrong_value": only the prompt can decide which is right).
  heldout_test_agreement  where the SFT model failed a held-out task's tests (SFT_DIR's
            eval_results.jsonl, EVAL_TASKS_FILE), the share where the RM scores the task's
            reference program above the failed answer: does it reward what the tests reward?
Reward normalisation: mean and std of the RM's scores on both sides of the training pairs (at most
NORM_PAIRS of them, evenly spread), after training, so 0 is the boundary between preferred and
rejected answers and +-1 about a typical one.

On-policy pairs (RM_ONPOLICY_SAMPLES > 0): before training, the SFT model answers each task of
RM_ONPOLICY_PROMPTS_FILE (prompts with unit tests) RM_ONPOLICY_SAMPLES times at temperature 1;
the tests label the answers, and each distinct failing answer (up to 2 per task) becomes the
rejected side of a pair whose chosen side passes (a passing sampled answer, else the task's
reference solution). These are the mistakes the policy actually makes, which the bundled pairs
can only guess at (AceCoder, Zeng et al. 2025, builds its RM pairs from tests the same way).

    python train_rm.py                                    # embedded default, CPU is fine
    python train_rm.py --USE_LORA=true --RM_LR=1e-4       # LoRA (score head fully trained), merged on save
    accelerate launch --config_file accelerate_configs/ddp.yaml train_rm.py  # several GPUs (docs/DISTRIBUTED.md: DeepSpeed, FSDP)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_rm.py  # 2 CPU processes

Any constant of config.py can be overridden as --NAME=value.
"""

import os
import time

import config as C
from rlhf.checkpoints import checkpoint_folder, rows_made_once, staging_folder, train_resumable
from rlhf.common import (
    check_lora_targets, load_tokenizer, lora_config, run_stage, start_stage, torch_dtype, trainer_args, trainer_schedule,
    trainer_sizes, use_log_line,
)
from rlhf.data import drop_too_long, load_preference_pairs, load_rows, pair_lengths, read_jsonl
from rlhf.handoff import check_output_dir, require_stage_output, save_stage, write_jsonl
from rlhf.settings import scalar_settings
from rlhf.reward import (
    agreement_with_tests, load_reward_model, preference_metrics, problems_with_tests, reward_statistics,
    save_reward_normalization, score_conversations, tested_pairs,
)


NORM_PAIRS = 512  # training pairs scored for the normalisation and train accuracy: an even spread of them gives
#   the mean and std of all the pairs' scores within a few percent, in a fraction of the time


def spread(items, n):
    """At most n of items, evenly spaced over the list (the bundled files are grouped by task family)."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def score_pairs(model, tokenizer, pairs, device, batch_size):
    """(chosen scores, rejected scores) of the pairs, each a float tensor (N,); batch_size: RM_SCORE_BATCH_SIZE."""
    scores = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs] +
                                 [p["prompt"] + p["rejected"] for p in pairs], batch_size, device)
    return scores[:len(pairs)], scores[len(pairs):]


def accuracy_by_pair_kind(chosen_scores, rejected_scores, bugs):
    """{"accuracy_buggy", "pairs_buggy", "accuracy_wrong_value", "pairs_wrong_value"}: the share of
    pairs whose chosen answer scores above the rejected one, apart for the pairs whose rejected
    program has a bug (`bug` other than "wrong_value") and those whose rejected program is another
    variant's correct one ("wrong_value"); pairs of unknown bug (None) count in neither, a kind with
    no pair is left out."""
    right = (chosen_scores > rejected_scores).tolist()
    out = {}
    for kind, wanted in (("buggy", lambda bug: bug != "wrong_value"), ("wrong_value", lambda bug: bug == "wrong_value")):
        mine = [r for r, bug in zip(right, bugs) if bug is not None and wanted(bug)]
        if mine:
            out.update({f"accuracy_{kind}": sum(mine) / len(mine), f"pairs_{kind}": len(mine)})
    return out


def on_policy_pairs(tokenizer, state):
    """Preference pairs from the SFT model's own sampled answers, labelled by the unit tests (see
    the module docstring), and the share of sampled answers that passed; ([], None) when off. The
    main process samples and writes them to the stage's checkpoint folder, where every process
    reads them; a resumed run reuses that file, so it trains on the pairs it started with."""
    from rlhf.codeeval import sandbox_limits
    from rlhf.common import load_causal_lm

    if not (C.RM_ONPOLICY_SAMPLES and C.RM_ONPOLICY_PROMPTS_FILE):
        return [], None

    def sample():
        problems = problems_with_tests(C.RM_ONPOLICY_PROMPTS_FILE)
        model = load_causal_lm(C.SFT_DIR, torch_dtype(C.PRECISION), for_training=False).to(state.device)
        rows, share = tested_pairs(model, tokenizer, problems, C.RM_ONPOLICY_SAMPLES, C.GEN_MAX_NEW_TOKENS,
                                   sandbox_limits(C), C.GEN_BATCH_SIZE)
        return [dict(r, passed_share=share) for r in rows]

    rows = rows_made_once(os.path.join(checkpoint_folder(C.RUNS_DIR, "rm"), "on_policy_pairs.jsonl"), sample, state,
                          C.RESUME)
    passed = rows[0]["passed_share"] if rows else None
    if state.is_main_process:
        print(f"on-policy pairs: {len(rows)} from {C.RM_ONPOLICY_PROMPTS_FILE}"
              + (f" ({passed:.1%} of the SFT model's sampled answers passed)" if rows else ""))
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], passed


def sft_failures(sft_dir, tasks_file, main_process):
    """(held-out tasks, the SFT model's answers to them) when the SFT stage saved its pass@1
    answers (`sft_dir`/eval_results.jsonl) for the task file `tasks_file` (EVAL_TASKS_FILE) that
    exists now; else None, with a line when the answers are for another task file (SFT evaluated on
    the validation split, say). Read before training, so that a bad task file stops the run before
    anything is trained."""
    from rlhf.codeeval import load_problems

    path = os.path.join(sft_dir, "eval_results.jsonl")
    if not (os.path.exists(path) and tasks_file):
        return None
    problems, answers = load_problems(tasks_file), read_jsonl(path)
    if {p.task_id for p in problems} & {str(a.get("task_id")) for a in answers}:
        return problems, answers
    if main_process:
        print(f"rm vs tests | no agreement figure: {path} answers none of the tasks of {tasks_file} "
              "(pass --EVAL_TASKS_FILE=<the file the SFT stage was evaluated on>)")
    return None


def main(argv):
    state = start_stage("rm", argv)
    check_output_dir(C.RM_DIR, C.OVERWRITE)
    require_stage_output(C.SFT_DIR, "sft")
    tokenizer = load_tokenizer(C.SFT_DIR)  # the SFT stage's tokenizer: same chat template, same ids

    # ---- data: conversational preference pairs, too-long pairs dropped with a count
    train = load_preference_pairs(C.RM_TRAIN_FILE)
    evals = [dict(p, bug=row.get("bug"))  # the kind of pair, for the accuracy by kind (None where the file says none)
             for p, row in zip(load_preference_pairs(C.RM_EVAL_FILE), load_rows(C.RM_EVAL_FILE))]
    failures = sft_failures(C.SFT_DIR, C.EVAL_TASKS_FILE, state.is_main_process)
    onpolicy, onpolicy_passed = on_policy_pairs(tokenizer, state)  # the SFT model's failing answers, tested
    train += onpolicy
    # `length` lets the sampler batch pairs of similar length: each pair is padded to the longest
    # sequence of its batch, and random batches of the bundled data would be ~40% padding.
    train = [dict(p, length=n) for p, n in zip(train, pair_lengths(tokenizer, train, C.RM_TRAIN_FILE))]
    evals = [dict(p, length=n) for p, n in zip(evals, pair_lengths(tokenizer, evals, C.RM_EVAL_FILE))]
    train = drop_too_long(train, [p["length"] for p in train], C.RM_MAX_LEN, C.RM_TRAIN_FILE, "RM_MAX_LEN")
    evals = drop_too_long(evals, [p["length"] for p in evals], C.RM_MAX_LEN, C.RM_EVAL_FILE, "RM_MAX_LEN")
    if state.is_main_process:
        print(f"data: {len(train)} train / {len(evals)} eval preference pairs")
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # ---- model: the SFT model with a new scalar head (num_labels=1), padding known to its config
    model = load_reward_model(C.SFT_DIR, dtype=torch_dtype(C.PRECISION), for_training=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # pooling reads the last token that is not padding
    check_lora_targets(model, C.USE_LORA, C.LORA_TARGET_MODULES)
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(C.RUNS_DIR, "rm")
    checkpoints, run_settings = checkpoint_folder(C.RUNS_DIR, "rm"), scalar_settings()
    args = RewardConfig(
        output_dir=staging_folder(checkpoints),  # checkpoints are moved from there when complete (train_resumable)
        **trainer_sizes(C.RM_BATCH_SIZE, C.RM_GRAD_ACCUM, C.RM_EPOCHS, C.RM_LR),
        max_length=C.RM_MAX_LEN,  # nothing left to filter: too-long pairs were dropped above
        train_sampling_strategy="group_by_length",  # shuffled mega-batches sorted by `length` (less padding)
        remove_unused_columns=False,  # keeps `length` for the sampler; the collator reads only the token ids
        center_rewards_coefficient=C.RM_CENTER_REWARDS_COEF or None,
        disable_dropout=True,
        **trainer_schedule(C.RM_WARMUP_RATIO, C.EVAL_EVERY, C.LOG_EVERY),  # cosine after warm-up; log, evaluate, save as SFT
        **trainer_args(RewardConfig, C),  # fp32 on CPU: TRL's bf16 default is ~20x slower here
    )
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list([{k: v for k, v in p.items() if k != "bug"} for p in evals]),
        peft_config=lora_config("SEQ_CLS", C) if C.USE_LORA else None,  # the new score head is trained fully
    )
    use_log_line(trainer, "rm", [("loss", "loss"), ("accuracy", "acc"), ("margin", "margin"), ("eval_loss", "eval loss"),
                                 ("eval_accuracy", "eval acc"), ("eval_margin", "eval margin"), ("learning_rate", "lr")])

    # ---- train (resuming from the last complete checkpoint of an interrupted run)
    t0 = time.time()
    result = train_resumable(trainer, "rm", "RM_LR", checkpoints, run_settings)
    train_seconds = time.time() - t0
    train_tokens = trainer.state.num_input_tokens_seen or None  # chosen + rejected, padding excluded

    model = trainer.model
    if C.USE_LORA:
        model = model.merge_and_unload()  # a plain model: PPO and transformers load it as is
    model.eval()

    # ---- normalisation on the training pairs, then held-out accuracy / F1 / margin
    if state.is_main_process:
        t1 = time.time()
        norm_pairs = spread(train, NORM_PAIRS)
        train_chosen, train_rejected = score_pairs(model, tokenizer, norm_pairs, state.device, C.RM_SCORE_BATCH_SIZE)
        stats = reward_statistics(train_chosen, train_rejected, f"both answers of {len(norm_pairs)} of the "
                                                                f"{len(train)} training pairs (evenly spread)")
        eval_chosen, eval_rejected = score_pairs(model, tokenizer, evals, state.device, C.RM_SCORE_BATCH_SIZE)
        held_out = preference_metrics(eval_chosen, eval_rejected, threshold=stats["mean"])
        on_train = preference_metrics(train_chosen, train_rejected, threshold=stats["mean"])
        held_out.update(accuracy_by_pair_kind(eval_chosen, eval_rejected, [p["bug"] for p in evals]))
        metrics = {f"eval_{k}": v for k, v in held_out.items()}
        metrics.update({
            "train_accuracy": on_train["accuracy"], "train_margin": on_train["margin"],
            "train_loss": result.training_loss, "train_seconds": train_seconds, "train_tokens": train_tokens,
            "train_tokens_per_second": train_tokens / train_seconds if train_tokens else None,
            "score_seconds": time.time() - t1, "onpolicy_pairs": len(onpolicy), "onpolicy_passed": onpolicy_passed,
            "reward_mean": stats["mean"], "reward_std": stats["std"],
        })
        kinds = "".join(f"{kind} {held_out[f'accuracy_{kind}']:.4f} ({held_out[f'pairs_{kind}']} pairs) | "
                        for kind in ("buggy", "wrong_value") if f"accuracy_{kind}" in held_out)
        print(f"rm eval | accuracy {held_out['accuracy']:.4f} | f1 {held_out['f1']:.4f} | "
              f"margin {held_out['margin']:.4g} | {held_out['pairs']} pairs | {kinds}"
              f"reward mean {stats['mean']:.4g} std {stats['std']:.4g}")

        # ---- does the RM agree with the tests on held-out tasks? where the SFT model failed them, the
        # task's reference program should score above the failed answer (scripts/rm_vs_tests.py)
        groups = agreement_with_tests(model, tokenizer, *failures, device=state.device) if failures else {}
        if groups:
            share, n = groups["all failures"][:2]
            metrics.update(heldout_test_agreement=share, heldout_test_failures=n)
            if "held-out parameter values" in groups:
                metrics["heldout_test_agreement_heldout_params"] = groups["held-out parameter values"][0]
            print(f"rm vs tests | prefers the reference to {n} failed SFT answers on held-out tasks {share:.1%}")

        # ---- save ./rm_model (atomic, with metadata; the normalisation also goes into config.json)
        metrics["log_history"] = trainer.state.log_history

        def also(tmp):
            save_reward_normalization(tmp, stats, model)
            if onpolicy:  # what the RM was trained on besides RM_TRAIN_FILE, to read
                write_jsonl(os.path.join(tmp, "onpolicy_pairs.jsonl"), onpolicy)

        save_stage("rm", C.RM_DIR, model, tokenizer, metrics, checkpoints, run_settings, also=also,
                   extra={"sft_model": C.SFT_DIR},
                   show=("eval_accuracy", "eval_f1", "eval_margin", "heldout_test_agreement", "train_loss",
                         "train_seconds", "train_tokens_per_second"))
    state.wait_for_everyone()


if __name__ == "__main__":
    run_stage(main)
