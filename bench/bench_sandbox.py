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
    sandbox.run_many([TRIVIAL] * 2)  # the namespaces' set-up process starts once, not timed
    for name, job in (("trivial", TRIVIAL), ("typical", TYPICAL)):
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
        sandbox.run_many([TRIVIAL] * 2)


def cpu_seconds():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_seconds():
    """CPU seconds the whole machine spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


if __name__ == "__main__":
    main()
