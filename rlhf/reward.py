"""Reward-model helpers shared by the RM stage (train_rm.py) and PPO (train_ppo.py): loading a
scalar-head model, building its input exactly as TRL's RewardTrainer did in training, scoring,
and the reward normalisation stored with the model. And PPO's whole reward: unit tests, RM score,
a function of the user's and the missing-EOS penalty mixed into one score per answer.

What the RM sees (TRL 1.16 RewardTrainer, conversational data): the chat template applied to
prompt + [assistant answer], tokenised by `apply_chat_template`, with no EOS appended (TRL only
appends EOS to non-conversational text) and no generation prompt. With our ChatML template the
sequence ends `...answer<|im_end|>\\n`, and the score is read at its last token, the newline
(the model's own pooling: the rightmost token that is not `pad_token_id`). PPO must score the
decoded response through `score_responses` so the score is read at that same position
(Huang et al. 2024, "score at the last real token"); tests/test_rm.py checks the match.
"""

import dataclasses
import json
import os

from rlhf.sandbox.verdict import Limits
from rlhf.settings import UserError

NORMALIZATION_FILE = "reward_normalization.json"


def load_reward_model(path, dtype=None, for_training=False):
    """AutoModelForSequenceClassification with one output (the reward) from a causal-LM folder
    (./sft_model: the score head is new and random) or a saved reward model (./rm_model).
    `config.pad_token_id` is set: the model pools at the last token that is not padding."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(path, num_labels=1)
    except OSError as e:
        raise UserError(f"cannot load a model from {path!r}: {str(e).splitlines()[0]}") from None
    if config.get_text_config().pad_token_id is None:
        raise UserError(f"{path}/config.json has no pad_token_id; the reward model needs it to find the last real token")
    # From a causal LM, `score.weight` is missing (new head) and `lm_head` is unused: expected, so
    # those load messages are silenced (TRL's RewardTrainer does the same).
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    if not for_training:
        model.eval()
    return model


def conversation_ids(tokenizer, messages):
    """Token ids of a whole conversation as TRL's RewardTrainer tokenises a conversational
    preference sample: `apply_chat_template(prompt + answer, tokenize=True)`, nothing added."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def response_conversation(prompt, response):
    """prompt (text or messages) + the assistant's `response` text -> the messages the RM scores."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return prompt + [{"role": "assistant", "content": response}]


def score_conversations(rm, tokenizer, conversations, batch_size=64, device=None):
    """Scalar RM score of each conversation (list of messages) -> float32 tensor (N,) on the CPU.

    Right padding with the tokenizer's pad token, as TRL's collator does; the model pools at the
    last non-pad token. Sequences are batched longest first to waste little on padding; the
    order of the result is the order of `conversations`."""
    import torch

    device = device or next(rm.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs a pad token distinct from EOS (use rlhf.common.load_tokenizer)")
    if rm.config.get_text_config().pad_token_id != pad_id:
        raise ValueError(f"reward model pads with id {rm.config.get_text_config().pad_token_id}, tokenizer with {pad_id}")
    ids = [conversation_ids(tokenizer, conv) for conv in conversations]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    scores = torch.empty(len(ids), dtype=torch.float32)
    was_training = rm.training
    rm.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(ids[chunk[0]])
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(chunk):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, :len(ids[i])] = 1
            logits = rm(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
            scores[chunk] = logits.squeeze(-1).float().cpu()  # (B,)
    rm.train(was_training)
    return scores


def score_responses(rm, tokenizer, prompts, responses, batch_size=64, device=None):
    """RM score of each (prompt, response text) pair -> float32 tensor (N,) on the CPU.

    `prompts`: text or lists of messages (without the answer); `responses`: the assistant's
    answer as text, e.g. a PPO rollout decoded with skip_special_tokens=True and cut at EOS.
    The input is built as in RM training (see the module docstring)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    conversations = [response_conversation(p, r) for p, r in zip(prompts, responses)]
    return score_conversations(rm, tokenizer, conversations, batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------
# Reward normalisation: PPO uses (score - mean) / std
# ---------------------------------------------------------------------------------------------

def reward_statistics(chosen_scores, rejected_scores, source):
    """Mean and std of the RM's scores over reference responses, both sides of the training
    pairs. Centred this way, 0 is the boundary between preferred and rejected answers and one
    std is about half the gap between them, so a normalised reward is near +1 for a typical
    preferred answer and near -1 for a rejected one. (Chosen answers alone would centre on the
    good answers, N+ style, but a well-trained RM scores those tightly, and dividing by their
    small spread would blow up every other reward.)"""
    import torch

    both = torch.cat([chosen_scores, rejected_scores]).double()
    return {
        "mean": both.mean().item(),
        "std": max(both.std().item(), 1e-6),
        "count": len(both),
        "chosen_mean": chosen_scores.double().mean().item(),
        "chosen_std": chosen_scores.double().std().item() if len(chosen_scores) > 1 else 0.0,
        "rejected_mean": rejected_scores.double().mean().item(),
        "rejected_std": rejected_scores.double().std().item() if len(rejected_scores) > 1 else 0.0,
        "source": source,
        "usage": "normalised reward = (score - mean) / std",
    }


def save_reward_normalization(folder, stats, model=None):
    """Write reward_normalization.json into `folder`; with `model`, also store mean/std in its
    config (`reward_mean`, `reward_std`, as OpenRLHF does) before it is saved."""
    with open(os.path.join(folder, NORMALIZATION_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    if model is not None:
        model.config.reward_mean = stats["mean"]
        model.config.reward_std = stats["std"]


def load_reward_normalization(path):
    """{'mean', 'std', ...} from a reward-model folder or its reward_normalization.json."""
    file = os.path.join(path, NORMALIZATION_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise UserError(f"{file} not found: the reward model was not saved by train_rm.py; run `python train_rm.py`")
    with open(file, encoding="utf-8") as f:
        stats = json.load(f)
    if not all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std")) or stats["std"] <= 0:
        raise UserError(f"{file}: needs numeric `mean` and a positive `std`")
    return stats


def normalize_rewards(scores, stats):
    """(score - mean) / std, with the statistics from load_reward_normalization."""
    return (scores - stats["mean"]) / stats["std"]


# ---------------------------------------------------------------------------------------------
# PPO's reward: unit tests, the RM, a function of the user's, the missing-EOS penalty
# (train_ppo.py; the one place to change what PPO rewards)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardMix:
    """How PPO's sequence score of an answer is made; train_ppo's setup fills it from the settings."""
    rm_weight: float  # PPO_RM_WEIGHT: weight of the normalised RM score
    exec_weight: float  # PPO_EXEC_WEIGHT: weight of the unit-test reward; 0 = the RM only
    exec_reward: str  # PPO_EXEC_REWARD: "all" (1 only if every test passes) | "fraction" (share passed)
    rm_on_tested: bool  # PPO_RM_ON_TESTED: the RM scores answers whose prompt has tests too
    reward_fn: object = None  # PPO_REWARD_FN, imported (reward_function): f(messages, texts) -> floats; None = none
    missing_eos_penalty: float | None = None  # score of an answer that never ended; None = it keeps its own
    sandbox_limits: Limits = Limits()  # SANDBOX_*: how the answers run (rlhf.codeeval.sandbox_limits)


def reward_function(spec):
    """The function a PPO_REWARD_FN value names ("package.module:function")."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"PPO_REWARD_FN={spec!r}: no such function; write it as module:function") from None


def exec_rewards(batch, texts, device, mix):
    """Unit-test reward (B,) of each response (mix.exec_reward of its sandbox verdict); NaN where the
    prompt has no tests or mix.exec_weight is 0."""
    import torch

    from rlhf.codeeval import completion_for
    from rlhf.sandbox import run_unique

    passed = torch.full((len(batch),), float("nan"), device=device)
    tested = [i for i, r in enumerate(batch) if r["problem"] is not None]
    if tested and mix.exec_weight:
        verdicts = run_unique([batch[i]["problem"].job(completion_for(batch[i]["problem"], texts[i])) for i in tested],
                              limits=mix.sandbox_limits)
        # "all": the verdict greedy pass@1 counts; "fraction" also pays for near misses
        passed[tested] = torch.tensor([float(v.passed) if mix.exec_reward == "all" else v.pass_fraction
                                       for v in verdicts], device=device)
    return passed


def sequence_scores(rm, rm_tokenizer, norm, batch, texts, ends_with_eos, passed, device, mix, every_row=False):
    """Sequence scores (B,) and the normalised RM scores (B,) (NaN where the RM was not asked).

    Where the prompt has unit tests, they decide: score = exec_weight x test reward (+ the RM's
    with rm_on_tested; off by default: docs/RESULTS.md measures how often our RM prefers the
    failing answer). Elsewhere score = rm_weight x normalised RM score, read as in RM training
    (prompt + answer through the chat template, at its last token; score_responses), normalised
    with the mean/std the RM stage stored. Then the user's reward_fn is added, and an answer that
    never ended gets missing_eos_penalty instead.
    every_row: the RM reads every answer, its scores kept where they are asked for: where the RM's
    forwards are collectives (ZeRO-3, FSDP), each process must run as many as the others, whatever
    share of its batch has tests."""
    import torch

    tested = ~torch.isnan(passed)  # (B,)
    asked = torch.ones_like(tested) if mix.rm_on_tested else ~tested
    rm_score = torch.full_like(passed, float("nan"))
    read = torch.ones_like(asked) if every_row else asked
    if read.any():
        rows = read.nonzero().flatten().tolist()
        raw = score_responses(rm, rm_tokenizer, [batch[i]["messages"] for i in rows], [texts[i] for i in rows], device=device)
        rm_score[rows] = normalize_rewards(raw.float().to(device), norm)
        rm_score = torch.where(asked, rm_score, float("nan"))
    score = mix.rm_weight * torch.nan_to_num(rm_score) + mix.exec_weight * torch.nan_to_num(passed)
    if mix.reward_fn is not None:  # a user's own reward on top: f(list of messages, list of texts) -> floats
        score = score + torch.tensor(mix.reward_fn([r["messages"] for r in batch], texts), dtype=score.dtype, device=device)
    if mix.missing_eos_penalty is not None:
        score = apply_missing_eos_penalty(score, ends_with_eos, mix.missing_eos_penalty)
    return score, rm_score


def apply_missing_eos_penalty(score, ends_with_eos, penalty):
    """Scores (B,) where a response that never emitted EOS gets `penalty` INSTEAD of its RM score.

    Replace, not subtract, as in the N+ code (Huang et al. 2024, penalty -1): a response cut at the
    length limit is worth a fixed low value whatever the RM thinks of the fragment, so the policy
    cannot earn reward by rambling. (TRL's `missing_eos_penalty` subtracts instead, which keeps the RM's
    ranking among cut responses but lets a high-scoring fragment beat a finished answer.)
    Pick `penalty` below the usual range of the (normalised) RM score.
    """
    import torch

    return torch.where(ends_with_eos, score, torch.full_like(score, penalty))  # (B,)


# ---------------------------------------------------------------------------------------------
# Held-out metrics
# ---------------------------------------------------------------------------------------------

def preference_metrics(chosen_scores, rejected_scores, threshold):
    """accuracy: share of pairs whose chosen answer scores above the rejected one.
    margin: mean of chosen minus rejected score.
    F1: each pair gives two examples, chosen (label 1) and rejected (label 0), classified as
    preferred when score > threshold; F1 = 2PR / (P + R) of the preferred class. The threshold
    is the normalisation mean (from the training pairs, so no held-out label is used): F1 says
    how well the sign of the normalised reward PPO sees, one answer at a time, separates
    good from bad answers across prompts, where accuracy only compares answers of one prompt."""
    import torch

    chosen, rejected = chosen_scores.double(), rejected_scores.double()
    tp = (chosen > threshold).sum().item()
    fp = (rejected > threshold).sum().item()
    fn = len(chosen) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (chosen > rejected).double().mean().item(),
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "precision": precision,
        "recall": recall,
        "margin": (chosen - rejected).mean().item(),
        "threshold": float(threshold),
        "pairs": len(chosen),
        "chosen_mean": chosen.mean().item(),
        "rejected_mean": rejected.mean().item(),
        "score_std": torch.cat([chosen, rejected]).std().item(),
    }


# ---------------------------------------------------------------------------------------------
# Does the RM agree with the unit tests? (train_rm.py at the end, scripts/rm_vs_tests.py)
# ---------------------------------------------------------------------------------------------

def reference_answer(problem):
    """A problem's reference program as an assistant answer (one fenced block, as the RM's data
    writes answers), or None when the problem has none."""
    code = problem.reference()
    if code and problem.format == "humaneval":  # the whole program: signature and docstring, then the body
        code = (problem.record.get("prompt") or "") + code
    return f"```python\n{code}\n```" if code else None


def problems_with_tests(source):
    """The tasks of `source` whose answers the tests can label (ours with `tests`, any other
    format), read as PPO reads its prompts, the plain prompts among them left out: what on-policy
    pairs are sampled for (RM_ONPOLICY_PROMPTS_FILE, DPO's PPO_PROMPTS_FILE)."""
    from rlhf.codeeval import prompt_and_problem
    from rlhf.data import load_rows, row_where

    problems = [prompt_and_problem(row, row_where(source, row, i), str(i))[1] for i, row in enumerate(load_rows(source))]
    return [p for p in problems if p is not None and (p.record.get("tests") or p.format != "project")]


def tested_pairs(model, tokenizer, problems, samples, max_new_tokens, limits, answers_per_call, reference_fallback=True,
                 per_task=2):
    """(pairs, share passed): preference pairs from `model`'s own answers labelled by the unit
    tests (AceCoder, Zeng et al. 2025, builds RM pairs the same way). Each problem is answered
    `samples` times at temperature 1; each distinct failing answer (at most `per_task` a problem)
    is the rejected side of a pair whose chosen side is a distinct passing answer to the same
    prompt (cycled), or with `reference_fallback`, when none passed, the problem's reference
    program. Pairs are {"prompt", "chosen", "rejected", "task_id"} rows; the share is of all the
    sampled answers; answers_per_call: GEN_BATCH_SIZE. train_rm.py (RM_ONPOLICY_SAMPLES) and train_dpo.py
    (its online rounds) call it."""
    from rlhf.codeeval import evaluate_model

    answers = []
    evaluate_model(model, tokenizer, problems, num_samples=samples, temperature=1.0, top_p=1.0,
                   max_new_tokens=max_new_tokens, ks=(), results_out=answers, limits=limits,
                   answers_per_call=answers_per_call)
    by_task = {}
    for a in answers:
        by_task.setdefault(a["task_id"], []).append(a)
    rows, share = [], sum(a["passed"] for a in answers) / max(len(answers), 1)
    for p in problems:
        mine = by_task.get(p.task_id, [])
        good = list(dict.fromkeys(a["raw"] for a in mine if a["passed"]))
        if not good and reference_fallback and reference_answer(p):
            good = [reference_answer(p)]
        bad = list(dict.fromkeys(a["raw"] for a in mine if not a["passed"]))[:per_task]
        rows += [{"prompt": p.messages(), "chosen": [{"role": "assistant", "content": good[i % len(good)]}],
                  "rejected": [{"role": "assistant", "content": b}], "task_id": p.task_id}
                 for i, b in enumerate(bad) if good]
    return rows, share


def agreement_with_tests(rm, tokenizer, problems, results, device=None):
    """For every answer in `results` (per-task rows of scripts/evaluate.py or the SFT stage:
    task_id, passed, raw) that FAILED its tests and whose task has a reference program: does the
    RM score the reference above the failed answer? An RM that rewards correctness does; one that
    rewards looking like its training data may not, and PPO would then pull towards the failure.

    Returns {group: (share where the RM prefers the reference, n, mean score of the references,
    mean score of the failed answers)} for "all failures" and, where tasks say so
    (`heldout_params`), "held-out parameter values" / "seen parameter values"; {} without failures."""
    by_id = {p.task_id: p for p in problems}
    failed = [r for r in results if not r.get("passed") and str(r.get("task_id")) in by_id and "raw" in r
              and reference_answer(by_id[str(r["task_id"])])]
    if not failed:
        return {}
    tasks = [by_id[str(r["task_id"])] for r in failed]
    prompts = [p.messages() for p in tasks]
    wrong = score_responses(rm, tokenizer, prompts, [r["raw"] for r in failed], device=device)
    right = score_responses(rm, tokenizer, prompts, [reference_answer(p) for p in tasks], device=device)
    heldout = [p.record.get("heldout_params") for p in tasks]
    groups = {"all failures": [True] * len(failed), "held-out parameter values": [h is True for h in heldout],
              "seen parameter values": [h is False for h in heldout]}
    out = {}
    for name, member in groups.items():
        idx = [i for i, m in enumerate(member) if m]
        if idx:
            out[name] = (sum(bool(right[i] > wrong[i]) for i in idx) / len(idx), len(idx),
                         sum(float(right[i]) for i in idx) / len(idx), sum(float(wrong[i]) for i in idx) / len(idx))
    return out
