"""The whole pipeline in one command: data -> SFT -> reward model -> PPO -> report.

Each stage runs as its own process (`python train_<stage>.py [overrides]`), exactly as you would
run it by hand; its output goes to the terminal and to <reports>/logs/<stage>.log. The pipeline
stops at the first stage that fails, with that stage's `error:` line. A stage whose output folder
already holds a finished model (rlhf_stage.json) is reused, so an interrupted pipeline picks up
where it stopped. Wall times go to <reports>/timings.json. When INDIST_TASKS_FILE exists (tasks of
variants seen in training), the SFT and PPO models then answer each of its tasks once, greedily
(scripts/evaluate.py, into <reports>/indist_<stage>.jsonl; answers newer than their model and the
task file are reused). The report (scripts/report.py) comes last.

    bash run.sh                                        # set-up, then this script (the main job)
    python scripts/pipeline.py --PPO_STEPS=5           # any --NAME=value goes to every stage
    python scripts/pipeline.py --redo ppo              # train PPO again, reuse SFT and RM
    python scripts/pipeline.py --redo all              # train everything again
"""

import argparse
import json
import os
import subprocess
import sys
import time

import config as C
from rlhf.common import run_stage
from rlhf.handoff import STAGE_INFO_FILE, indist_answers_path, is_current, read_stage_info
from rlhf.settings import UserError, apply_overrides, check_values, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [("sft", "train_sft.py", "SFT_DIR"), ("rm", "train_rm.py", "RM_DIR"), ("ppo", "train_ppo.py", "PPO_DIR")]
DATA_SETTINGS = ("SFT_TRAIN_FILE", "SFT_EVAL_FILE", "RM_TRAIN_FILE", "RM_EVAL_FILE", "PPO_PROMPTS_FILE", "EVAL_TASKS_FILE")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Run data -> SFT -> RM -> PPO -> report; extra --NAME=value settings go to every stage.",
        allow_abbrev=False,  # `--rep=...` must not silently mean --reports
        epilog="Settings are the constants of config.py, e.g. --PPO_STEPS=5 --LR=1e-3; "
               "`python train_<stage>.py --help` lists the ones each stage reads, with their defaults.")
    ap.add_argument("--redo", default="", metavar="STAGES",
                    help="comma list of stages to train again even if finished (sft,rm,ppo) or 'all'")
    ap.add_argument("--reports", default="reports", metavar="DIR", help="where logs, timings and the report go")
    args, overrides = ap.parse_known_args(argv)
    names = [s for s, _, _ in STAGES]
    redo = {s.strip().lower() for s in args.redo.split(",") if s.strip()}
    if "all" in redo:
        redo = set(names)
    unknown = redo - set(names)
    if unknown:
        ap.error(f"--redo: unknown stage {sorted(unknown)[0]!r}; use sft, rm, ppo or all")
    return args, redo, overrides


def ensure_data(defaults):
    """The bundled data is committed; rebuild it if one of its files is missing. A file the user
    pointed a setting at is left to the stage, which names it in its error."""
    missing = [getattr(C, k) for k in DATA_SETTINGS if getattr(C, k) == defaults[k] and not os.path.exists(getattr(C, k))]
    if missing:
        print(f"pipeline: bundled data missing ({', '.join(missing)}): building it with scripts/build_data.py", flush=True)
        if subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_data.py")]).returncode != 0:
            raise UserError("building the bundled data failed (output above); run `python scripts/build_data.py` to retry")


def run_logged(cmd, log_path):
    """Run cmd with its output (stdout and stderr merged, as a terminal shows them) copied to the
    terminal and to log_path as it comes. Returns (exit code, last `error:` line or None)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    error, tail = None, b""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        # raw chunks, not lines: progress bars redraw with \r and would otherwise stall
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
            tail = (tail + chunk)[-65536:]
        code = proc.wait()
    for line in tail.decode("utf-8", "replace").splitlines():
        if line.startswith("error: "):
            error = line
    return code, error


def stale_settings(stage, info, changes):
    """Settings given on this command line that differ from those a reused stage was trained
    with. RM_* and PPO_* settings only concern their own stage; any other one is reported at
    the first reused stage it differs for (redoing that stage redoes the later ones)."""
    saved = info.get("settings", {})
    own = {"rm": "RM_", "ppo": "PPO_"}
    return {k: (saved[k], v) for k, v in changes.items() if k in saved and saved[k] != v
            and all(not k.startswith(prefix) or s == stage for s, prefix in own.items())}


def evaluate_in_distribution(reports, overrides):
    """The SFT and PPO models' greedy answers to INDIST_TASKS_FILE, one per task, by
    scripts/evaluate.py (as a user runs it) into <reports>/indist_<stage>.jsonl for the report;
    answers newer than their model and the task file are kept. Nothing when the file does not exist."""
    if not os.path.exists(C.INDIST_TASKS_FILE):
        print(f"pipeline: no in-distribution evaluation: INDIST_TASKS_FILE {C.INDIST_TASKS_FILE} does not exist", flush=True)
        return
    for stage, setting in (("sft", "SFT_DIR"), ("ppo", "PPO_DIR")):
        folder, out = getattr(C, setting), indist_answers_path(reports, stage)
        if is_current(out, os.path.join(folder, STAGE_INFO_FILE), C.INDIST_TASKS_FILE):
            print(f"{stage}: {out} answers {C.INDIST_TASKS_FILE} for this model, reusing it", flush=True)
            continue
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--model", folder,
               "--problems", C.INDIST_TASKS_FILE, "--k", "1", "--out", out, *overrides]
        print(f"pipeline: {stage} in-distribution: {' '.join(cmd[1:])}", flush=True)
        log = os.path.join(reports, "logs", f"indist_{stage}.log")
        code, error = run_logged(cmd, log)
        if code != 0:
            print(f"pipeline: stopped at the in-distribution evaluation of {stage} (exit {code}); log: {log}", file=sys.stderr)
            print(error or "error: scripts/evaluate.py crashed, see the traceback above", file=sys.stderr)
            sys.exit(code)


def write_timings(path, timings):
    with open(path, "w") as f:
        json.dump(timings, f, indent=2)


def main(argv):
    args, redo, overrides = parse_args(argv)
    defaults = settings()
    changes = apply_overrides(overrides, quiet=True)  # fail on a typo before hours of training
    check_values()  # and on a value out of range (--WARMUP_RATIO=2), before the data is built
    if C.OVERWRITE:
        redo = {s for s, _, _ in STAGES}  # --OVERWRITE=true reaches every stage: it means redo all
    ensure_data(defaults)
    if os.path.normpath(C.MODEL_NAME) == os.path.normpath(C.BASE_MODEL_DIR) and not os.path.exists(
            os.path.join(C.MODEL_NAME, "config.json")):
        print(f"pipeline: base model {C.MODEL_NAME} not built yet: train_sft.py builds it first", flush=True)

    os.makedirs(args.reports, exist_ok=True)
    timings_path = os.path.join(args.reports, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    noted = set()  # settings already reported as differing from a reused stage's
    trained = None  # the first stage trained in this run: every later stage must follow it
    for name, script, dir_setting in STAGES:
        folder = getattr(C, dir_setting)
        info = read_stage_info(folder)
        if info and name not in redo and trained is None:
            print(f"{name}: {folder} is finished, reusing it (--redo {name} to train again)", flush=True)
            for key, (old, new) in stale_settings(name, info, changes).items():
                if key not in noted:
                    noted.add(key)
                    print(f"{name}: note: {folder} was trained with {key}={old!r}, not {new!r}; "
                          f"--redo {name} to apply it", flush=True)
            earlier = timings.get(name, {})
            if earlier.get("finished_at") != info.get("finished_at"):  # trained outside the pipeline
                earlier = {"seconds": info.get("metrics", {}).get("train_seconds"), "finished_at": info.get("finished_at"),
                           "source": "train_seconds of rlhf_stage.json"}
            timings[name] = earlier
            continue
        if info and name not in redo:
            print(f"{name}: {trained} was trained again, so {name} is trained again too", flush=True)
        cmd = [sys.executable, os.path.join(ROOT, script), *overrides]
        if info:
            cmd.append("--OVERWRITE=true")  # the stage refuses to replace a finished model without it
        print(f"pipeline: {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        code, error = run_logged(cmd, os.path.join(args.reports, "logs", f"{name}.log"))
        if code != 0:  # the stage's own error line last, so it is what the user sees
            print(f"pipeline: stopped at {name} (exit {code}); log: {os.path.join(args.reports, 'logs', name + '.log')}",
                  file=sys.stderr)
            print(error or f"error: {name} crashed, see the traceback above", file=sys.stderr)
            sys.exit(code)
        info = read_stage_info(folder) or {}
        timings[name] = {"seconds": time.time() - t0, "finished_at": info.get("finished_at"), "source": "pipeline"}
        trained = trained or name
        write_timings(timings_path, timings)  # after each stage: a later failure keeps the earlier times
    write_timings(timings_path, timings)
    evaluate_in_distribution(args.reports, overrides)

    code, error = run_logged([sys.executable, os.path.join(ROOT, "scripts", "report.py"),
                                        f"--reports={args.reports}", *overrides],
                             os.path.join(args.reports, "logs", "report.log"))
    if code != 0:
        print(error or "error: the report crashed, see the traceback above", file=sys.stderr)
        sys.exit(code)
    print(f"pipeline: done | report: {os.path.join(args.reports, 'report.md')}")


if __name__ == "__main__":
    run_stage(main)
