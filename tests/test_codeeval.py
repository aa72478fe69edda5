"""Code extraction, pass@k, the three problem formats, evaluate.py and the HumanEval check."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from rlhf import codeeval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECT = {"task_id": "p/0", "family": "add", "lang": "en", "prompt": "Write add(a, b).", "entry_point": "add",
           "solution": "def add(a, b):\n    return a + b", "tests": [{"call": "add(1, 2)", "expected": "3"}], "setup": ""}
HUMANEVAL = {"task_id": "HumanEval/x", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
             "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
MBPP = {"task_id": 7, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "", "challenge_test_list": []}


def test_extract_code():
    assert codeeval.extract_code("hi\n```python\nx = 1\n```\nbye ```python\ny\n```") == "x = 1"
    assert codeeval.extract_code("```\nx = 2\n```") == "x = 2"
    assert codeeval.extract_code("```python\nx = 3\n") == "x = 3"  # no closing fence
    assert codeeval.extract_code("x = 4") == "x = 4"


def test_pass_at_k_hand_computed():
    assert codeeval.pass_at_k(10, 0, 1) == 0.0
    assert codeeval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert codeeval.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert codeeval.pass_at_k(10, 5, 3) == pytest.approx(1 - 10 / 120)  # 1 - C(5,3)/C(10,3)
    assert codeeval.pass_at_k(4, 2, 3) == 1.0  # fewer than k wrong samples


def test_summary_averages_pass_at_k_over_tasks_and_per_language():
    """summarize() from verdicts (no sandbox): pass@k, the mean over tasks of pass_at_k(n, c, k), for
    each k up to the fewest samples of a task; pass@1 per language where tasks name one."""
    problems = [codeeval.Problem("a", "project", {**PROJECT, "task_id": "a", "lang": "en"}),
                codeeval.Problem("b", "project", {**PROJECT, "task_id": "b", "lang": "zh"})]
    results = [{"task_id": t, "passed": ok, "status": "passed" if ok else "failed"}
               for t, oks in (("a", [True, False, False]), ("b", [True, True, False])) for ok in oks]
    summary = codeeval.summarize(problems, results, ks=(1, 2, 3, 5))
    assert summary["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert summary["pass@2"] == pytest.approx((1 - 1 / 3 + 1.0) / 2)  # a: 1 - C(2,2)/C(3,2); b: one wrong < 2
    assert summary["pass@3"] == 1.0 and "pass@5" not in summary  # 5 > the 3 samples a task has
    assert summary["pass@1_en"] == pytest.approx(1 / 3) and summary["pass@1_zh"] == pytest.approx(2 / 3)
    assert (summary["samples"], summary["passed"], summary["statuses"]) == (6, 3, {"passed": 3, "failed": 3})
    assert codeeval.pass_at_1_metrics(summary) == {"pass_at_1": summary["pass@1"], "pass_at_1_en": pytest.approx(1 / 3),
                                                   "pass_at_1_zh": pytest.approx(2 / 3)}
    # the default ks (1, 10, 100): each as soon as every task has that many samples; none without results
    assert [k for k in codeeval.summarize(problems, results) if k.startswith("pass@")] == ["pass@1", "pass@1_en", "pass@1_zh"]
    many = [{"task_id": "a", "passed": i == 0, "status": "x"} for i in range(100)]
    summary = codeeval.summarize(problems[:1], many)
    assert summary.pop("statuses") == {"x": 100} and summary == pytest.approx(
        {"problems": 1, "problems_scored": 1, "samples": 100, "passed": 1,
         "pass@1": 0.01, "pass@10": 0.1, "pass@100": 1.0, "pass@1_en": 0.01})  # 1 - C(99,10)/C(100,10) = 0.1
    assert not [k for k in codeeval.summarize(problems, []) if k.startswith("pass@")]
    # k up to the FEWEST samples of a task (b has 2 here); a language whose tasks have no results: no key
    fewer = [r for r in results if r["task_id"] == "a"] + [{"task_id": "b", "passed": True, "status": "passed"}] * 2
    assert [k for k in codeeval.summarize(problems, fewer, ks=(0, 1, 2, 3)) if k.startswith("pass@")] == \
        ["pass@1", "pass@2", "pass@1_en", "pass@1_zh"]
    assert "pass@1_zh" not in codeeval.summarize(problems, fewer[:3])


@pytest.mark.parametrize("record,fmt", [(PROJECT, "project"), (HUMANEVAL, "humaneval"), (MBPP, "mbpp")])
def test_formats_round_trip_and_score(tmp_path, record, fmt):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    problems = codeeval.load_problems(str(path))
    codeeval.save_problems(problems, str(tmp_path / "q.jsonl"))
    again = codeeval.load_problems(str(tmp_path / "q.jsonl"))
    assert again == problems and problems[0].format == fmt
    assert "add" in problems[0].messages()[0]["content"].lower()
    good = {"project": PROJECT["solution"], "humaneval": HUMANEVAL["canonical_solution"], "mbpp": MBPP["code"]}[fmt]
    summary, _ = codeeval.score_samples(problems, [{"task_id": problems[0].task_id, "completion": good},
                                                   {"task_id": problems[0].task_id, "completion": "def add(a, b):\n    return 0"}],
                                        progress=False)
    assert summary["passed"] == 1 and summary["pass@1"] == pytest.approx(0.5)


def run_evaluate(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.parametrize("content,message", [
    (None, "not found"), ('{"task_id": 1}\nnot json\n', ":2: malformed JSON"),
    ('{"task_id": 1, "foo": 2}\n', "unknown task format")])
def test_user_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    r = run_evaluate("--problems", str(path), "--samples", "canonical")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr


@pytest.mark.parametrize("tests, message", [
    ("add(1, 2) == 3", r"p.jsonl:1: `tests` must be a list"),
    ([{"call": "add(1, 2)", "expected": "three"}], r"p.jsonl:1: expected 'three' is not a Python literal"),
    ([{"call": "add(1, 2)"}], r"p.jsonl:1: each test needs a string `call` and `expected`"),
])
def test_task_rows_whose_tests_cannot_run(tmp_path, tests, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(dict(PROJECT, tests=tests)) + "\n")
    with pytest.raises(codeeval.UserError, match=message):
        codeeval.load_problems(str(path))
    assert codeeval.problem_from_row({"prompt": "no tests here"}, "x:1") is None  # a plain prompt (PPO)


def test_samples_file_and_results(tmp_path):
    problems, samples = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    problems.write_text(json.dumps(PROJECT) + "\n")
    samples.write_text("".join(json.dumps({"task_id": "p/0", "completion": c}) + "\n"
                               for c in (PROJECT["solution"], "def add(a, b):\n    return a * b")))
    r = run_evaluate("--problems", str(problems), "--samples", str(samples), "--k", "1,2")
    summary = json.loads(r.stdout)
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
    rows = [json.loads(x) for x in open(str(samples) + "_results.jsonl")]
    assert [x["passed"] for x in rows] == [True, False] and rows[1]["status"] == "failed"


def test_model_results_never_replace_the_stage_answers(tmp_path, tiny_base):
    """--model writes under reports/evaluate/ of the working directory, nothing in the model folder
    (whose eval_results.jsonl holds the answers a stage saved, which train_rm.py reads), and
    generates GEN_MAX_NEW_TOKENS tokens unless told otherwise."""
    model = tmp_path / "sft_model"
    shutil.copytree(tiny_base, model)
    (model / "eval_results.jsonl").write_text("the stage's answers\n")
    before = sorted(os.listdir(model))
    problems = tmp_path / "tasks.jsonl"
    problems.write_text(json.dumps(PROJECT) + "\n")
    r = run_evaluate("--problems", str(problems), "--model", str(model), "--k", "1", "--GEN_MAX_NEW_TOKENS=7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = os.path.join("reports", "evaluate", "sft_model_tasks.jsonl")
    assert json.loads(r.stdout)["results_file"] == results
    assert sorted(os.listdir(model)) == before and (model / "eval_results.jsonl").read_text() == "the stage's answers\n"
    from transformers import AutoTokenizer

    raw = json.loads(open(tmp_path / results).readline())["raw"]
    assert len(AutoTokenizer.from_pretrained(tiny_base)(raw)["input_ids"]) <= 14  # the default would be 160


def test_humaneval_canonical_all_pass_broken_none():
    # the acceptance check: 164/164 canonical solutions, 0 for `return None`
    # at HumanEval's own time limit: at 1 s a canonical solution timed out now and then on a loaded 2-core machine
    assert json.loads(run_evaluate("--benchmark", "humaneval", "--samples", "canonical", "--SANDBOX_TIMEOUT_S=3").stdout)["passed"] == 164
    assert json.loads(run_evaluate("--benchmark", "humaneval", "--samples", "broken", "--SANDBOX_TIMEOUT_S=3").stdout)["passed"] == 0


def test_pass_at_1_metrics_one_spelling_for_the_stages():
    summary = {"pass@1": 0.5, "pass@1_zh": 0.25, "pass@1_en": 0.75, "pass@10": 0.9, "problems": 4}
    assert codeeval.pass_at_1_metrics(summary) == {"pass_at_1": 0.5, "pass_at_1_zh": 0.25, "pass_at_1_en": 0.75}


def test_a_natural_prompt_takes_the_function_under_its_own_spelling():
    """"Implement the quicksort algorithm in Python." names no function: a working `quicksort` passes
    the seed-prompt check like `quick_sort` does; another function, or two candidates, do not."""
    seed_prompts = codeeval.load_problems(os.path.join(ROOT, "data", "seed_prompts.jsonl"))
    problem = next(p for p in seed_prompts if p.record["lang"] == "en" and p.record["entry_point"] == "quick_sort")
    right = problem.reference().replace("quick_sort", "quicksort")
    assert "quick_sort" not in right
    answers = {"as is": right, "bound": codeeval.named_as_asked(right, "quick_sort"),
               "camel": codeeval.named_as_asked(right.replace("quicksort", "quickSort"), "quick_sort"),
               "other name": codeeval.named_as_asked(right.replace("quicksort", "sort_list"), "quick_sort"),
               "two candidates": codeeval.named_as_asked(right + "\n" + right.replace("quicksort", "QuickSort"), "quick_sort"),
               "not python": codeeval.named_as_asked("def quicksort(:", "quick_sort")}
    samples = [{"task_id": problem.task_id, "completion": c} for c in answers.values()]
    _, results = codeeval.score_samples([problem], samples, ks=(1,), progress=False)
    assert dict(zip(answers, (r["passed"] for r in results))) == {
        "as is": False, "bound": True, "camel": True, "other name": False, "two candidates": False, "not python": False}
    assert codeeval.named_as_asked(problem.reference(), "quick_sort") == problem.reference()
