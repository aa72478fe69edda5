"""Sandbox throughput: programs per second, trivial and typical, on this machine.

    python bench/bench_sandbox.py [--n 200] [--workers 4]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    print(f"{datetime.date.today()} | {platform.node()} | {os.cpu_count()} CPUs | {platform.platform()} | "
          f"load {os.getloadavg()[0]:.1f} | sandbox {sandbox.active_mode()}")
    for name, job in (("trivial", TRIVIAL), ("typical", TYPICAL)):
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        verdicts = sandbox.run_many([job] * args.n, workers=args.workers)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        assert all(v.passed for v in verdicts), verdicts[0]
        # CPU per program (ours + the children's) depends less on other load than programs/s does
        print(f"{name:8s} {args.n / dt:6.1f} programs/s ({args.n} programs, {dt:.1f} s), "
              f"{1000 * cpu / args.n:.0f} ms CPU per program")


def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()
