"""Peak memory of each stage (SFT, RM, PPO), full fine-tuning and LoRA, on the embedded default.

Each stage script runs as a user runs it, in its own process, for a few optimizer steps on the
data that sets the peak of a full run: SFT and RM on the 64 longest conversations / pairs of
the bundled training files (batches are grouped by length, so a full run's first batch is its
longest: the one measured here), PPO for PPO_STEPS=2 at the default batch sizes and response
length. Peak memory is the stage process's own peak resident set (ru_maxrss from wait4, the
kernel's figure); a sampled sum over the process and its children (sandboxed programs) is shown
as a check. The libraries alone (python + torch + transformers + trl + peft + accelerate
imported, nothing loaded) are measured the same way, so the part a stage adds is visible.

    python bench/bench_memory.py                   # needs ./sft_model and ./rm_model (bash run.sh)
    python bench/bench_memory.py --write-readme    # also records the table in bench/README.md

It measures CPU memory (RSS), which is what the embedded default uses; on a GPU the same
stages would be measured with torch.cuda.max_memory_allocated (not done here: no GPU).
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "bench", "README.md")
HEADING = "## Peak memory of the stages"
MIB = 1024 * 1024


def run_measured(cmd, log_path):
    """Run cmd; return (exit code, peak RSS of the process in MiB, sampled peak of the process
    tree in MiB, seconds)."""
    import psutil

    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
    tree_peak = [0]

    def sample():  # every 50 ms: resident memory of the stage and any child it has at that moment
        try:
            root = psutil.Process(proc.pid)
            while proc.returncode is None:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                tree_peak[0] = max(tree_peak[0], total)
                time.sleep(0.05)
        except psutil.NoSuchProcess:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join(timeout=1)
    return proc.returncode, usage.ru_maxrss / 1024, tree_peak[0] / MIB, time.time() - t0


def longest_rows(path, n, length, out_path):
    """Write the n rows of a jsonl file with the largest length(row) to out_path."""
    from rlhf.data import read_jsonl

    rows = [{k: v for k, v in row.items() if k != "_line"} for row in read_jsonl(path)]
    rows.sort(key=length, reverse=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows[:n]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out_path


def parameter_count(folder):
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def main(argv):
    import torch

    from rlhf.common import load_tokenizer

    write = "--write-readme" in argv
    sft_dir, rm_dir = os.path.join(ROOT, "sft_model"), os.path.join(ROOT, "rm_model")
    for folder, command in ((sft_dir, "python train_sft.py"), (rm_dir, "python train_rm.py")):
        if not os.path.exists(os.path.join(folder, "rlhf_stage.json")):
            sys.exit(f"error: {folder} holds no finished model: run `{command}` (or `bash run.sh`) first")
    tok = load_tokenizer(sft_dir)

    def tokens(messages):
        return len(tok.apply_chat_template(messages, tokenize=True)["input_ids"])

    work = tempfile.mkdtemp(prefix="bench_memory_")
    sft_data = longest_rows(os.path.join(ROOT, "data", "sft_train.jsonl"), 64, lambda r: tokens(r["messages"]),
                            os.path.join(work, "sft_longest.jsonl"))
    rm_data = longest_rows(os.path.join(ROOT, "data", "rm_train.jsonl"), 64,
                           lambda r: max(tokens(r["prompt"] + r["chosen"]), tokens(r["prompt"] + r["rejected"])),
                           os.path.join(work, "rm_longest.jsonl"))
    tasks = longest_rows(os.path.join(ROOT, "data", "eval_tasks.jsonl"), 8, lambda r: 0, os.path.join(work, "tasks.jsonl"))

    py = sys.executable
    base = ["--REPORT_TO=none", f"--RUNS_DIR={work}/runs", "--OVERWRITE=true", f"--EVAL_TASKS_FILE={tasks}"]
    runs = {
        "libraries only": [py, "-c", "import torch, transformers, trl, peft, accelerate, rlhf.common"],
        "SFT": [py, "train_sft.py", *base, f"--SFT_DIR={work}/sft", "--MODEL_NAME=./base_model", "--EPOCHS=1",
                f"--SFT_TRAIN_FILE={sft_data}", f"--SFT_EVAL_FILE={sft_data}", "--SFT_EVAL_PASS_AT_1=false"],
        "RM": [py, "train_rm.py", *base, f"--RM_DIR={work}/rm", f"--SFT_DIR={sft_dir}", "--RM_EPOCHS=1",
               f"--RM_TRAIN_FILE={rm_data}", f"--RM_EVAL_FILE={rm_data}"],
        "PPO": [py, "train_ppo.py", *base, f"--PPO_DIR={work}/ppo", f"--SFT_DIR={sft_dir}", f"--RM_DIR={rm_dir}",
                "--PPO_STEPS=2", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0", "--RESUME=false"],
    }
    variants = {"full": [], "LoRA": ["--USE_LORA=true"]}
    # LoRA without its dropout: peft keeps a dropped-out copy of the input of every adapted layer
    extra = {"SFT": {"LoRA, LORA_DROPOUT=0": ["--USE_LORA=true", "--LORA_DROPOUT=0"]}}
    results = []
    for name, cmd in runs.items():
        for variant, flags in ({"": []} if name == "libraries only" else {**variants, **extra.get(name, {})}).items():
            full_cmd = cmd + flags
            label = f"{name}, {variant}" if variant else name
            log = os.path.join(work, label.replace(", ", "_").replace(" ", "_") + ".log")
            code, peak, tree, seconds = run_measured(full_cmd, log)
            if code != 0:
                sys.exit(f"error: {label} failed (exit {code}); see {log}")
            print(f"{label}: peak {peak:,.0f} MiB (tree {tree:,.0f} MiB), {seconds:.0f} s", flush=True)
            results.append({"run": label, "peak_mib": peak, "tree_peak_mib": tree, "seconds": seconds,
                            "command": " ".join(os.path.relpath(c, ROOT) if c.startswith(work) else c for c in full_cmd[1:])})

    by = {r["run"]: r["peak_mib"] for r in results}
    libs = by["libraries only"]
    n_params = parameter_count(sft_dir)
    load = os.getloadavg()[0]
    lines = [
        f"- command: `python bench/bench_memory.py`; date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"{platform.system()}; python {platform.python_version()}, torch {torch.__version__}; fp32 on CPU",
        f"- model: the embedded default (./sft_model, ./rm_model), {n_params / 1e6:.1f}M parameters per network, "
        "4,096-token vocabulary; SFT/RM batch 16 on the 64 longest examples (tokens up to MAX_LEN 512), "
        "PPO 2 iterations of 32 responses (mini-batch 8, up to 128 new tokens)",
        f"- load average (1 min) at the end: {load:.2f} (other jobs running: memory figures are per process, "
        "unaffected; the seconds are not comparable)",
        "",
        "| run | peak RSS (MiB) | above the libraries (MiB) | process tree, sampled (MiB) | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        above = "" if r["run"] == "libraries only" else f"{r['peak_mib'] - libs:,.0f}"
        lines.append(f"| {r['run']} | {r['peak_mib']:,.0f} | {above} | {r['tree_peak_mib']:,.0f} | {r['seconds']:.0f} |")
    ratio = by["PPO, LoRA"] / by["SFT, LoRA"]
    ratio_above = (by["PPO, LoRA"] - libs) / (by["SFT, LoRA"] - libs)
    lines += ["", f"PPO / SFT with LoRA: **{ratio:.2f}x** peak RSS ({ratio_above:.2f}x above the libraries); "
              f"full fine-tuning: {by['PPO, full'] / by['SFT, full']:.2f}x."]
    print("\n".join(lines))
    with open(os.path.join(work, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if write:
        text = open(README, encoding="utf-8").read() if os.path.exists(README) else "# Benchmarks\n"
        begin, end = "<!-- MEMORY -->", "<!-- /MEMORY -->"
        block = begin + "\n" + "\n".join(lines) + "\n" + end
        if begin in text and end in text:  # replace the previous result only
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
        with open(README, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"written to {README}")


if __name__ == "__main__":
    main(sys.argv[1:])
