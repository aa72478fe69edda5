"""train_rm.py as a user runs it on a tiny model, and the reward helpers PPO relies on: the RM
input built by score_responses is exactly what RewardTrainer trained on, and the normalisation
stored with the model reads back."""

import json
import os
import re

import pytest

from conftest import run_script, toy_preference_pairs, toy_tasks, write_jsonl


@pytest.fixture(scope="module")
def rm_run(tiny_sft, toy_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    # held-out pairs with a `bug`, as the bundled ones have: a third only the prompt could decide
    evals = write_jsonl(out / "rm_eval.jsonl", [dict(p, bug="wrong_value" if i % 3 == 0 else "wrong_operator")
                                                for i, p in enumerate(toy_preference_pairs(16, seed=4))])
    args = [f"--SFT_DIR={tiny_sft}", f"--RM_DIR={out / 'rm_model'}", f"--RUNS_DIR={out / 'runs'}",
            f"--RM_TRAIN_FILE={toy_pairs['rm_train']}", f"--RM_EVAL_FILE={evals}",
            "--RM_EPOCHS=2", "--RM_BATCH_SIZE=16", "--RM_LR=5e-3", "--LOG_EVERY=2",
            f"--RM_ONPOLICY_PROMPTS_FILE={toy_pairs['tasks']}", "--RM_ONPOLICY_SAMPLES=2", "--GEN_MAX_NEW_TOKENS=8"]
    proc = run_script("train_rm.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _pairs(path):
    from rlhf.data import load_preference_pairs

    return load_preference_pairs(path)


def _margin(model, tok, pairs):
    from rlhf.reward import score_responses

    prompts = [p["prompt"] for p in pairs]
    chosen = score_responses(model, tok, prompts, [p["chosen"][0]["content"] for p in pairs])
    rejected = score_responses(model, tok, prompts, [p["rejected"][0]["content"] for p in pairs])
    return (chosen - rejected).mean().item()


def test_rm_saves_a_loadable_reward_model(rm_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, proc = rm_run
    folder = out / "rm_model"
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.score.out_features == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    batch = tok(["a", "bb"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 1)
    results = json.load(open(folder / "eval_results.json"))
    for key in ("eval_accuracy", "eval_f1", "eval_margin"):
        assert key in results
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["eval_f1"] <= 1.0
    # the accuracy apart for pairs with a buggy program and pairs only the prompt decides: 10 + 6 of 16
    assert (results["eval_pairs_buggy"], results["eval_pairs_wrong_value"]) == (10, 6)
    assert results["eval_accuracy"] == pytest.approx((10 * results["eval_accuracy_buggy"]
                                                      + 6 * results["eval_accuracy_wrong_value"]) / 16)
    assert results["train_tokens"] > 0
    info = json.load(open(folder / "rlhf_stage.json"))
    assert info["stage"] == "rm" and info["metrics"]["eval_accuracy"] == results["eval_accuracy"]
    text = proc.stdout + proc.stderr
    assert "rm step 2/" in text and f"rm eval | accuracy {results['eval_accuracy']:.4f}" in text
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "runs" / "rm"))
    assert not os.path.exists(out / "runs" / "rm" / "checkpoints")  # cleaned after a finished run


def test_rm_adds_on_policy_pairs_labelled_by_the_tests(rm_run, toy_pairs):
    """The SFT model's sampled answers to the 3 toy tasks, run against their tests: the tiny model's
    8-token answers all fail, so each distinct one (at most 2 per task) is paired with the reference."""
    out, proc = rm_run
    metrics = json.load(open(out / "rm_model" / "rlhf_stage.json"))["metrics"]
    assert metrics["onpolicy_passed"] == 0.0 and 3 <= metrics["onpolicy_pairs"] <= 6
    pairs = _pairs(str(out / "rm_model" / "onpolicy_pairs.jsonl"))  # kept beside the model, to read
    assert len(pairs) == metrics["onpolicy_pairs"] and all(p["chosen"][0]["content"].startswith("```python\ndef add_")
                                                           for p in pairs)
    assert f"on-policy pairs: {metrics['onpolicy_pairs']} from {toy_pairs['tasks']} (0.0% of" in proc.stdout
    assert f"data: {48 + metrics['onpolicy_pairs']} train / 16 eval preference pairs" in proc.stdout


def test_rm_pulls_chosen_and_rejected_apart(rm_run, tiny_sft, toy_pairs):
    import config as C
    from rlhf.common import load_tokenizer, seed_everything
    from rlhf.reward import load_reward_model

    out, _ = rm_run
    pairs = _pairs(toy_pairs["rm_train"])
    tok = load_tokenizer(tiny_sft)
    seed_everything(C.SEED)  # the same random head the stage started from
    before = _margin(load_reward_model(tiny_sft), tok, pairs)
    after = _margin(load_reward_model(str(out / "rm_model")), tok, pairs)
    assert after > before + 0.05, (before, after)
    results = json.load(open(out / "rm_model" / "eval_results.json"))
    assert results["eval_margin"] > 0 and results["eval_accuracy"] >= 0.9  # an easy toy preference


def test_reward_normalization_is_stored_and_matches_a_recomputation(rm_run, toy_pairs):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rlhf.reward import load_reward_model, load_reward_normalization, normalize_rewards, score_responses

    out, proc = rm_run
    folder = str(out / "rm_model")
    stats = load_reward_normalization(folder)
    assert stats == load_reward_normalization(os.path.join(folder, "reward_normalization.json"))
    printed = re.search(r"reward mean (\S+) std (\S+)", proc.stdout + proc.stderr)
    assert abs(float(printed.group(1)) - stats["mean"]) <= 1e-3 * max(1.0, abs(stats["mean"]))
    assert abs(float(printed.group(2)) - stats["std"]) <= 1e-3 * stats["std"]
    config = AutoConfig.from_pretrained(folder)  # round trip through config.json
    assert config.reward_mean == stats["mean"] and config.reward_std == stats["std"]
    results = json.load(open(os.path.join(folder, "eval_results.json")))
    assert results["reward_mean"] == stats["mean"]

    pairs = _pairs(toy_pairs["rm_train"]) + _pairs(os.path.join(folder, "onpolicy_pairs.jsonl"))  # all it trained on
    model, tok = load_reward_model(folder), AutoTokenizer.from_pretrained(folder)
    prompts = [p["prompt"] for p in pairs] * 2
    answers = [p["chosen"][0]["content"] for p in pairs] + [p["rejected"][0]["content"] for p in pairs]
    scores = score_responses(model, tok, prompts, answers, batch_size=7)
    assert scores.mean().item() == pytest.approx(stats["mean"], abs=1e-5)
    assert scores.std().item() == pytest.approx(stats["std"], rel=1e-4)
    normalized = normalize_rewards(scores, stats)
    assert normalized.mean().abs().item() < 1e-4 and normalized.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.isfinite(normalized).all()


def test_score_responses_matches_reward_trainer_forward(rm_run, toy_pairs, tmp_path):
    """PPO scores decoded rollouts with score_responses; the RM was trained on RewardTrainer's
    tokenisation and collation. Same ids, same last token (`<|im_end|>` then the template's
    newline, no extra EOS), same score."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.common import load_tokenizer
    from rlhf.reward import conversation_ids, load_reward_model, response_conversation, score_responses

    out, _ = rm_run
    folder = str(out / "rm_model")
    model, tok = load_reward_model(folder), load_tokenizer(folder)
    pairs = _pairs(toy_pairs["rm_eval"])[:6]  # English and Chinese prompts: unequal lengths, so padding
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, max_length=None)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(pairs))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    assert (batch["attention_mask"] == 0).any()  # the comparison covers padded rows
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits.squeeze(-1)  # (2N,): chosen first, then rejected
    prompts = [p["prompt"] for p in pairs]
    chosen_text = [p["chosen"][0]["content"] for p in pairs]
    rejected_text = [p["rejected"][0]["content"] for p in pairs]
    for i, p in enumerate(pairs):
        ids = conversation_ids(tok, response_conversation(p["prompt"], chosen_text[i]))
        assert trainer.train_dataset[i]["chosen_ids"] == ids
        assert tok.decode(ids[-2:]) == "<|im_end|>\n" and ids[-3:].count(tok.eos_token_id) == 1
    for batch_size in (1, 4):
        chosen = score_responses(model, tok, prompts, chosen_text, batch_size=batch_size)
        rejected = score_responses(model, tok, prompts, rejected_text, batch_size=batch_size)
        torch.testing.assert_close(torch.cat([chosen, rejected]), logits.float(), rtol=1e-4, atol=1e-5)
    # a prompt given as plain text is the user's message
    text_prompt = score_responses(model, tok, [prompts[0][0]["content"]], chosen_text[:1])
    torch.testing.assert_close(text_prompt, logits[:1].float(), rtol=1e-4, atol=1e-5)


def test_preference_metrics_definitions():
    import torch

    from rlhf.reward import preference_metrics

    chosen, rejected = torch.tensor([3.0, 1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    m = preference_metrics(chosen, rejected, threshold=0.75)
    assert m["accuracy"] == 0.75 and m["margin"] == pytest.approx(1.125)
    # preferred when > 0.75: chosen 3, 1, 2 (tp 3, fn 1); rejected 1, 2 (fp 2)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_accuracy_by_pair_kind_splits_buggy_from_wrong_value_pairs():
    import torch

    from train_rm import accuracy_by_pair_kind

    chosen, rejected = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 1.0, -1.0, 0.0])
    bugs = ["off_by_one", "wrong_value", "wrong_value", "missing_return", None]  # right, wrong, wrong, right, right
    assert accuracy_by_pair_kind(chosen, rejected, bugs) == {"accuracy_buggy": 1.0, "pairs_buggy": 2,
                                                             "accuracy_wrong_value": 0.0, "pairs_wrong_value": 2}
    assert accuracy_by_pair_kind(chosen, rejected, [None] * 5) == {}  # an eval file without `bug`: no split
    assert accuracy_by_pair_kind(chosen[:1], rejected[:1], ["off_by_one"]) == {"accuracy_buggy": 1.0, "pairs_buggy": 1}


def test_rm_lora_trains_the_head_and_saves_a_merged_model(tiny_sft, toy_pairs, tmp_path, run_in_process):
    import torch
    from transformers import AutoModelForSequenceClassification

    import config as C
    from rlhf.common import seed_everything
    from rlhf.reward import load_reward_model

    proc = run_in_process("train_rm.py", f"--SFT_DIR={tiny_sft}", f"--RM_DIR={tmp_path / 'rm'}",
                          f"--RUNS_DIR={tmp_path / 'runs'}", f"--RM_TRAIN_FILE={toy_pairs['rm_train']}",
                          f"--RM_EVAL_FILE={toy_pairs['rm_eval']}", "--RM_BATCH_SIZE=16", "--RM_LR=3e-3",
                          "--USE_LORA=true", "--RM_ONPOLICY_SAMPLES=0", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    seed_everything(C.SEED)
    start = load_reward_model(tiny_sft)
    assert not torch.equal(merged.score.weight, start.score.weight)  # modules_to_save=["score"]
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)


def test_rm_clear_errors_for_user_mistakes(tmp_path, tiny_sft, toy_pairs, run_in_process):
    proc = run_in_process("train_rm.py", f"--SFT_DIR={tmp_path / 'no_sft'}", f"--RM_DIR={tmp_path / 'o'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'no_sft'} does not exist: run `python train_sft.py` first" in proc.stderr

    rows = toy_preference_pairs(4)
    del rows[2]["rejected"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_in_process("train_rm.py", f"--SFT_DIR={tiny_sft}", f"--RM_DIR={tmp_path / 'o'}", f"--RM_TRAIN_FILE={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:3: missing field `rejected`" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    assert not os.path.exists(tmp_path / "o")  # nothing written on error


def test_rm_missing_data_file(tmp_path, tiny_sft, toy_pairs, run_in_process):
    proc = run_in_process("train_rm.py", f"--SFT_DIR={tiny_sft}", f"--RM_DIR={tmp_path / 'o'}",
                          f"--RM_TRAIN_FILE={toy_pairs['rm_train']}", f"--RM_EVAL_FILE={tmp_path / 'nope.jsonl'}")
    assert proc.returncode == 2 and "nope.jsonl not found" in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_rm_agreement_needs_sft_answers_to_the_task_file(tmp_path, capsys):
    """train_rm.sft_failures: the SFT stage's answers and the task file go together; answers to
    another file (SFT evaluated on the validation split) give no figure and a line that says so."""
    import train_rm

    tasks = write_jsonl(tmp_path / "tasks.jsonl", toy_tasks(2))
    write_jsonl(tmp_path / "eval_results.jsonl", [{"task_id": "t1", "passed": False, "raw": "x"}])
    problems, answers = train_rm.sft_failures(str(tmp_path), str(tasks), True)
    assert [p.task_id for p in problems] == ["t1", "t2"] and answers[0]["task_id"] == "t1"
    assert "rm vs tests" not in capsys.readouterr().out
    assert train_rm.sft_failures(str(tmp_path), "", True) is None  # no task file: no figure
    write_jsonl(tmp_path / "eval_results.jsonl", [{"task_id": "val/7", "passed": False, "raw": "x"}])
    assert train_rm.sft_failures(str(tmp_path), str(tasks), True) is None
    assert f"answers none of the tasks of {tasks}" in capsys.readouterr().out
    assert train_rm.sft_failures(str(tmp_path), str(tasks), False) is None
    assert capsys.readouterr().out == ""  # one line per run, from the main process
