"""rlhf.reward without training: the normalisation statistics and their file, the unit-test reward
(all or fraction), how the sequence score is mixed, the held-out preference metrics at their edges,
the reference answer the RM is compared on, and the dtype a reward model loads in."""

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close

from conftest import toy_tasks
from rlhf import reward as R
from rlhf.codeeval import load_problems, problem_from_row
from rlhf.settings import UserError


def test_reward_statistics_floor_the_std_and_give_a_side_of_one_answer_no_spread():
    stats = R.reward_statistics(torch.tensor([2.0]), torch.tensor([2.0]), "pairs")
    assert stats["std"] == 1e-6 and stats["chosen_std"] == 0.0 and stats["rejected_std"] == 0.0  # all alike: no 0
    stats = R.reward_statistics(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0]), "pairs")  # two a side: spreads
    assert stats["chosen_std"] == pytest.approx(2 ** 0.5) and stats["rejected_std"] == pytest.approx(8 ** 0.5)
    assert stats["mean"] == pytest.approx(2.0) and stats["count"] == 4


@pytest.mark.parametrize("stats", [{"std": 1.0}, {"mean": "0", "std": 1.0}, {"mean": 0.0, "std": "1"},
                                   {"mean": 0.0, "std": 0.0}, {"mean": 0.0, "std": -1.0}])
def test_a_normalisation_file_without_a_numeric_mean_and_a_positive_std_is_refused(tmp_path, stats):
    (tmp_path / R.NORMALIZATION_FILE).write_text(json.dumps(stats))
    with pytest.raises(UserError, match="numeric `mean` and a positive `std`"):
        R.load_reward_normalization(str(tmp_path))


def test_a_normalisation_file_is_read_from_its_folder_or_itself(tmp_path):
    (tmp_path / R.NORMALIZATION_FILE).write_text(json.dumps({"mean": 0.5, "std": 2}))
    assert R.load_reward_normalization(str(tmp_path))["std"] == 2
    assert R.load_reward_normalization(str(tmp_path / R.NORMALIZATION_FILE))["mean"] == 0.5
    with pytest.raises(UserError, match="run `python train_rm.py`"):
        R.load_reward_normalization(str(tmp_path / "elsewhere"))


def two_test_task():
    row = dict(toy_tasks(1)[0], tests=[{"call": "add_1(1)", "expected": "2"}, {"call": "add_1(5)", "expected": "6"}])
    return problem_from_row(row, "t.jsonl")


def test_exec_reward_pays_all_or_the_fraction_of_tests_passed_and_nan_without_tests():
    problem = two_test_task()
    batch = [{"problem": problem}, {"problem": problem}, {"problem": None}]
    texts = ["```python\ndef add_1(x):\n    return 2 if x == 1 else 0\n```",  # passes one test of two
             "```python\ndef add_1(x):\n    return x + 1\n```", "no tests here"]
    mix = R.RewardMix(rm_weight=1.0, exec_weight=1.0, exec_reward="all", rm_on_tested=False)
    assert R.exec_rewards(batch, texts, "cpu", mix)[:2].tolist() == [0.0, 1.0]
    fraction = R.exec_rewards(batch, texts, "cpu", dataclasses.replace(mix, exec_reward="fraction"))
    assert fraction[:2].tolist() == [0.5, 1.0] and fraction[2].isnan()
    assert R.exec_rewards(batch, texts, "cpu", dataclasses.replace(mix, exec_weight=0.0)).isnan().all()


def test_sequence_score_mixes_tests_rm_the_users_function_and_the_missing_eos_penalty(monkeypatch):
    read = []
    monkeypatch.setattr(R, "score_responses", lambda rm, tok, prompts, texts, device=None: read.append(list(texts))
                        or torch.tensor([float(len(t)) for t in texts]))
    nan = float("nan")
    batch, texts = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(4)], ["a", "bb", "ccc", "dddd"]
    passed, ended = torch.tensor([1.0, 0.0, nan, nan]), torch.tensor([True, True, True, False])
    norm = {"mean": 1.0, "std": 2.0}
    mix = R.RewardMix(rm_weight=0.5, exec_weight=2.0, exec_reward="all", rm_on_tested=False,
                      reward_fn=lambda messages, texts: [0.25 * len(messages)] * len(texts), missing_eos_penalty=-3.0)
    score, rm_score = R.sequence_scores(None, None, norm, batch, texts, ended, passed, "cpu", mix)
    assert read == [["ccc", "dddd"]]  # by default the RM reads only the answers it is asked about
    assert_close(rm_score[2:], torch.tensor([1.0, 1.5]))  # (3 - 1) / 2, (4 - 1) / 2
    assert rm_score[:2].isnan().all()
    # tests x 2 where tested, RM x 0.5 elsewhere, + the user's 0.25 x 4 messages; the unended answer gets -3
    assert_close(score, torch.tensor([2.0 + 1.0, 0.0 + 1.0, 0.5 + 1.0, -3.0]))
    with pytest.raises(dataclasses.FrozenInstanceError):  # set once from the settings
        mix.rm_weight = 1.0


def test_preference_metrics_at_their_edges():
    # one chosen and one rejected above the threshold: precision 1/2; recall 1/2 (tp = fn = 1)
    m = R.preference_metrics(torch.tensor([1.0, -1.0]), torch.tensor([1.0, -1.0]), threshold=0.0)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    # nothing above the threshold: no precision, recall or F1 rather than a division by zero
    m = R.preference_metrics(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]), threshold=0.0)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_the_reference_answer_of_a_humaneval_task_is_its_whole_program():
    from rlhf.codeeval import humaneval_path

    problem = next(p for p in load_problems(humaneval_path()) if p.task_id == "HumanEval/53")
    answer = R.reference_answer(problem)
    assert answer.startswith("```python\n" + problem.record["prompt"]) and answer.endswith(problem.reference() + "\n```")
    assert R.reference_answer(problem_from_row(dict(toy_tasks(1)[0], solution=""), "t.jsonl")) is None


def test_agreement_with_tests_averages_the_scores_of_each_side(monkeypatch):
    monkeypatch.setattr(R, "score_responses", lambda rm, tok, prompts, texts, device=None: torch.tensor(
        [3.0 if "+" in text else float(len(text) % 5) for text in texts]))
    problems = [problem_from_row(r, "t.jsonl") for r in toy_tasks(2)]
    results = [{"task_id": "t1", "passed": False, "raw": "x"}, {"task_id": "t2", "passed": False, "raw": "xy"}]
    # the references (`return x + k`) score 3, the failed answers 1 and 2
    assert R.agreement_with_tests(None, None, problems, results)["all failures"] == (1.0, 2, 3.0, 1.5)


def test_a_reward_model_loads_in_fp32_unless_told(tiny_base, tmp_path):
    model = R.load_reward_model(tiny_base, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    model.save_pretrained(tmp_path)  # a bf16 checkpoint
    assert R.load_reward_model(str(tmp_path)).dtype == torch.float32


def fake_answers(monkeypatch, answers):
    """rlhf.codeeval.evaluate_model replaced by one that hands out `answers` ({task_id: [(raw, passed)]})
    as its per-answer rows, as the real one fills results_out; returns the calls' keyword arguments."""
    import rlhf.codeeval

    calls = []

    def evaluate_model(model, tokenizer, problems, results_out=None, **kw):
        calls.append(dict(kw, tasks=[p.task_id for p in problems]))
        results_out += [{"task_id": t, "raw": raw, "passed": passed} for t, rows in answers.items() for raw, passed in rows]

    monkeypatch.setattr(rlhf.codeeval, "evaluate_model", evaluate_model)
    return calls


def test_tested_pairs_pair_each_distinct_failure_with_a_passing_answer_of_its_prompt(monkeypatch):
    problems = [problem_from_row(r, "t.jsonl") for r in toy_tasks(3)]
    calls = fake_answers(monkeypatch, {
        "t1": [("ok-a", True), ("bad-a", False), ("ok-b", True), ("bad-a", False), ("bad-b", False), ("bad-c", False)],
        "t2": [("bad-x", False), ("bad-y", False)],  # nothing passed: the reference is the chosen side
        "t3": [("ok-z", True), ("ok-z", True)]})  # nothing failed: no pair
    rows, share = R.tested_pairs("model", "tokenizer", problems, samples=6, max_new_tokens=32, limits=None,
                                 answers_per_call=4)
    assert share == pytest.approx(4 / 10)  # of every sampled answer
    assert calls[0]["num_samples"] == 6 and calls[0]["temperature"] == 1.0 and calls[0]["answers_per_call"] == 4
    pairs = [(r["task_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    # at most per_task=2 distinct failures a task, in order; the passing answers cycled
    assert pairs == [("t1", "ok-a", "bad-a"), ("t1", "ok-b", "bad-b"),
                     ("t2", R.reference_answer(problems[1]), "bad-x"), ("t2", R.reference_answer(problems[1]), "bad-y")]
    assert rows[0]["prompt"] == problems[0].messages()
    rows, _ = R.tested_pairs("model", "tokenizer", problems, 6, 32, None, 4, reference_fallback=False, per_task=1)
    assert [(r["task_id"], r["rejected"][0]["content"]) for r in rows] == [("t1", "bad-a")]


def test_problems_with_tests_leave_out_plain_prompts(tmp_path):
    rows = toy_tasks(2) + [{"prompt": "Explain recursion."}, dict(toy_tasks(3)[2], tests=[])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [p.task_id for p in R.problems_with_tests(str(path))] == ["t1", "t2"]
