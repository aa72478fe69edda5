"""What every bench script shares: the machine and versions line, the measured matmul peak, the
FLOP count of a model, step timing inside a Trainer, the bench's own --name=value options, the
held-out evaluation of a trained policy, and the raw-results file (bench/results/<name>.json).
Imported as `import _common` (the scripts run as `python bench/<script>.py`, so bench/ is first on
sys.path), before config and rlhf: it puts the tree the script lives in right after bench/ on
sys.path, so a bench run from a second checkout (a git worktree of an older commit, say) measures
that checkout's code, not the copy installed in the virtual environment (`pip install -e .` of
another folder)."""

import datetime
import json
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path[:2]:
    sys.path.insert(1, ROOT)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = names[0].strip() if names else cpu
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.machine()}"


def versions():
    import torch
    import transformers
    import trl

    return (f"python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}")


def header(command):
    """The provenance every result carries: command, date, machine, versions, threads, load."""
    import torch

    return {"command": command, "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "machine": machine(), "versions": versions(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0]}


def own_options(argv, defaults):
    """Split argv into this bench's own --name=value options (lower-case names in `defaults`,
    converted to the default's type) and the rest (config.py overrides, --NAME=value)."""
    own, rest = dict(defaults), []
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in defaults:
            value = arg.split("=", 1)[1] if "=" in arg else "true"
            kind = type(defaults[name])
            own[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        else:
            rest.append(arg)
    return own, rest


def matmul_peak(threads=None, sizes=(512, 1024, 2048), repeats=5):
    """Measured fp32 matmul throughput (FLOP/s): best of `repeats` timed torch.matmul calls on
    square matrices of each size, with the torch threads the stages use. The physical limit the
    MFU figures divide by; returns (best FLOP/s, {size: FLOP/s})."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up (allocations, BLAS thread pool)
        best = float("inf")
        calls = max(1, min(100, int(2e9 // (2 * n**3))))  # ~2 GFLOP per timed sample (at most 100 calls)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.matmul(a, b)
            best = min(best, (time.perf_counter() - t0) / calls)
        per_size[n] = 2 * n**3 / best
    return max(per_size.values()), per_size


def flop_params(model):
    """Parameters that cost 2 FLOPs per token in a forward: every weight except the input
    embedding (a table lookup, no multiply). The output layer counts even when it shares the
    embedding's weights (tied): its vocab x hidden matmul runs on every token. Norm weights count
    too (negligible). So for a tied model this equals the total parameter count."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return total if tied else total - embed


def attention_flops_per_token(config, seq_len):
    """FLOPs per token of the attention scores and weighted sum (not in 6N), forward + backward:
    6 x 2 x layers x hidden x seq_len (PaLM appendix B counts 6 x L x H x T per the same product).
    seq_len is the mean context length the tokens see."""
    return 12 * config.num_hidden_layers * config.hidden_size * seq_len


def timing_callback(warmup):
    """A Trainer callback recording (seconds, tokens seen) at the end of every optimizer step
    from step `warmup` on."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= warmup:
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return Timing()


def save_results(name, result):
    """Write bench/results/<name>.json (raw figures; the README tables are made from them)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(f"raw results: {path}")
    return path


def table(header_row, rows):
    """A Markdown table (list of lines)."""
    lines = ["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def run_train_ppo(out, steps, overrides=()):
    """train_ppo.py for `steps` iterations in a subprocess, without evaluation or checkpoints,
    writing under `out`; returns its per-iteration history (seconds, generate_seconds,
    reward_seconds, update_seconds, response_length, rm_score, ...)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "train_ppo.py"), f"--PPO_STEPS={steps}", f"--PPO_DIR={out}/ppo_model",
           f"--RUNS_DIR={out}/runs", "--EVAL_TASKS_FILE=", "--PPO_SAVE_EVERY=0", "--PPO_EVAL_EVERY=0",
           "--REPORT_TO=none", *overrides]
    subprocess.run(cmd, check=True, cwd=root)
    with open(os.path.join(out, "ppo_model", "rlhf_stage.json"), encoding="utf-8") as f:
        return json.load(f)["metrics"]["history"]


def held_out(policy_dir, tasks_file, max_tasks=None):
    """Greedy pass@1 ("pass_at_1") and mean normalised RM score ("rm_score", C.RM_DIR's) of the causal LM
    in `policy_dir` on the first `max_tasks` tasks of `tasks_file` (None: all), through the PPO stage's
    own evaluation (rlhf.ppo_setup.evaluate: answers up to GEN_MAX_NEW_TOKENS, sandboxed tests) with the
    SFT stage's tokenizer, so policies trained by different code are judged alike."""
    import torch
    from transformers import AutoModelForCausalLM

    import config as C
    from rlhf.codeeval import load_problems, sandbox_limits
    from rlhf.common import load_tokenizer
    from rlhf.ppo_setup import evaluate
    from rlhf.reward import load_reward_model, load_reward_normalization

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    problems = load_problems(tasks_file)[:max_tasks]
    summary, _ = evaluate(policy, load_tokenizer(C.SFT_DIR), load_reward_model(C.RM_DIR), load_tokenizer(C.RM_DIR),
                          load_reward_normalization(C.RM_DIR), problems, "cpu", C.GEN_MAX_NEW_TOKENS, sandbox_limits(C),
                          C.GEN_BATCH_SIZE)
    return summary
