"""Sandbox throughput: programs per second, trivial, typical and stdin/stdout, on this machine; with --model,
what the time limit costs on a model's own answers.

    python bench/bench_sandbox.py [--n 200] [--workers 4]
    python bench/bench_sandbox.py --model ./sft_model [--limits 5,1]   # + data/val_tasks.jsonl, data/ppo_prompts.jsonl

--model: 8 answers per task sampled at temperature 1 (as pass@8 and PPO's rollouts sample), each
distinct program judged with each SANDBOX_TIMEOUT_S of --limits, alternating, twice: wall time,
time-outs, the slowest passing program, and how many verdicts differ from the first limit's.
"""
import argparse
import datetime
import os
import platform
import resource
import time

import _common  # noqa: F401  (this checkout's rlhf first on sys.path)
from rlhf import sandbox

TRIVIAL = dict(program="def f(x):\n    return x\n", calls=["f(1)"], expected=[1])
TYPICAL = dict(  # a data-set style quicksort with 7 test calls
    program="def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr[:]\n    p = arr[0]\n"
            "    return quick_sort([x for x in arr if x < p]) + [x for x in arr if x == p] + "
            "quick_sort([x for x in arr if x > p])\n",
    calls=[f"quick_sort({list(range(n, 0, -1))})" for n in range(0, 70, 10)],
    expected=[list(range(1, n + 1)) for n in range(0, 70, 10)])
STDIO = dict(  # a stdin/stdout program (APPS style) with 3 tests: a process per test
    program="a, b = map(int, input().split())\nprint(a + b)\n",
    stdin_tests=[{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(3)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--model", default=None, help="also judge this model's sampled answers with each of --limits")
    ap.add_argument("--limits", default="5,1", help="SANDBOX_TIMEOUT_S values for --model, seconds")
    ap.add_argument("--tasks", default="data/val_tasks.jsonl,data/ppo_prompts.jsonl")
    args = ap.parse_args()
    print(f"{datetime.date.today()} | {platform.node()} | {os.cpu_count()} CPUs | {platform.platform()} | "
          f"load {os.getloadavg()[0]:.1f} | sandbox {sandbox.active_mode()} | cgroup per program: "
          f"{', '.join(n.split('.')[0] for _, files in sandbox._cgroups() for n, _ in files[:1]) or 'none'}")
    for name, job in (("trivial", TRIVIAL), ("typical", TYPICAL), ("stdio", STDIO)):
        sandbox.run_many([TRIVIAL] * 2)  # (re)starts the namespaces' set-up process: not timed
        t0, cpu0, busy0 = time.perf_counter(), cpu_seconds(), machine_busy_seconds()
        verdicts = sandbox.run_many([job] * args.n, workers=args.workers)
        dt, busy = time.perf_counter() - t0, machine_busy_seconds() - busy0
        sandbox.shutdown()  # its processes' CPU time reaches our children's once it is reaped
        cpu = cpu_seconds() - cpu0
        assert all(v.passed for v in verdicts), verdicts[0]
        # CPU per program depends less on other load than programs/s does: ours plus the
        # children's, and the whole machine's (it also holds the kernel's own work, e.g. freeing
        # network namespaces, and anything else running)
        print(f"{name:8s} {args.n / dt:6.1f} programs/s ({args.n} programs, {dt:.1f} s), "
              f"{1000 * cpu / args.n:.1f} ms CPU per program ({1000 * busy / args.n:.1f} ms of the machine's)")
    if args.model:
        time_limits(args.model, [float(x) for x in args.limits.split(",")], args.tasks.split(","), args.workers)


def time_limits(model_dir, limits, task_files, workers):
    import config as C
    from rlhf import codeeval
    from rlhf.common import load_causal_lm, load_tokenizer, seed_everything, torch_dtype

    model, tokenizer = load_causal_lm(model_dir, torch_dtype(C.PRECISION)), load_tokenizer(model_dir)
    for path in task_files:
        problems = codeeval.load_problems(path)
        seed_everything(C.SEED)
        texts = codeeval.generate_completions(model, tokenizer, [p.messages() for p in problems], C.GEN_MAX_NEW_TOKENS,
                                              num_samples=8, temperature=1.0, top_p=1.0, progress=False,
                                              answers_per_call=C.GEN_BATCH_SIZE)
        jobs = {}
        for p, answers in zip(problems, texts):
            for text in answers:
                job = p.job(codeeval.completion_for(p, text))
                jobs.setdefault(repr(sorted(job.items())), job)
        jobs = list(jobs.values())
        first = None
        sandbox.run_many([TRIVIAL] * 2)  # the set-up process is up before the first timed limit
        for limit in limits * 2:
            t0 = time.perf_counter()
            verdicts = sandbox.run_many(jobs, workers=workers, limits=sandbox.Limits(timeout_s=limit))
            dt = time.perf_counter() - t0
            first = first or verdicts
            slowest = max((v.seconds for v in verdicts if v.passed), default=0.0)
            print(f"{path}: {len(jobs)} distinct programs, limit {limit:g} s: {dt:.1f} s, "
                  f"{sum(v.status == 'timeout' for v in verdicts)} time-outs, {sum(v.passed for v in verdicts)} pass "
                  f"(slowest {1000 * slowest:.0f} ms), {sum(a.passed != b.passed for a, b in zip(first, verdicts))} "
                  f"verdicts differ from limit {limits[0]:g} s")


def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_seconds():
    """CPU seconds the whole machine spent not idle since boot (/proc/stat)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


if __name__ == "__main__":
    main()
