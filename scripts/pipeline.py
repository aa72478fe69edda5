"""The whole pipeline in one command: data -> SFT -> reward model -> PPO (-> DPO) -> report.

Each stage runs as its own process (`python train_<stage>.py [overrides]`), exactly as you would
run it by hand; its output goes to the terminal and to <reports>/logs/<stage>.log. The pipeline
stops at the first stage that fails, with that stage's `error:` line. A stage whose output folder
already holds a finished model (rlhf_stage.json) is reused, so an interrupted pipeline picks up
where it stopped. With PIPELINE_DPO (--PIPELINE_DPO=true) DPO (train_dpo.py, from the SFT model)
runs after PPO, and the report puts it beside SFT and PPO. A finished stage made with other settings than this run gives (on the command
line or in its recipe), from another MODEL_NAME or with another RECIPE, is not reused silently:
the pipeline stops before any work with one line naming the `--redo` (train it again) or, for
settings, the `--reuse` (keep it as it is) to add. Wall times go to <reports>/timings.json. When
INDIST_TASKS_FILE exists (tasks of variants seen in training), the SFT, PPO (and DPO) models then answer
each of its tasks once, greedily (scripts/evaluate.py, into <reports>/indist_<stage>.jsonl; answers
newer than their model and the task file are reused). The report (scripts/report.py) comes last.

With ACCELERATE_CONFIG (--accelerate-config FILE) the stages run under `accelerate launch` with
that config and NUM_PROCESSES (--num-processes N) processes; PPO_ACCELERATE_CONFIG gives PPO its
own (ZeRO-3, FSDP: SFT and RM refuse them). A recipe (--RECIPE=recipes/...) sets them for you.

    bash run.sh                                        # set-up, then this script (the main job)
    python scripts/pipeline.py --redo ppo --PPO_STEPS=5    # train PPO again with a setting; reuse SFT and RM
    python scripts/pipeline.py --redo all              # train everything again
    python scripts/pipeline.py --PIPELINE_DPO=true     # DPO too, reported beside SFT and PPO
    python scripts/pipeline.py --RECIPE=recipes/qwen2.5-coder-7b-zero3.py --dry-run   # print the settings and commands
    python scripts/pipeline.py --accelerate-config accelerate_configs/ddp.yaml --num-processes 4
"""

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import config as C
from rlhf.common import run_stage
from rlhf.model_card import check_hub_login
from rlhf.handoff import (
    STAGE_INFO_FILE, STAGE_INPUTS, indist_answers_path, is_current, learning_rate_notes, read_stage_info, same_name,
)
from rlhf.settings import (
    SHARED_SECTION, STAGE_SOURCES, UserError, apply_overrides, check_values, config_sections, dpo_loss_types,
    names_read_by, resolve_overrides, scalar_settings, settings, tool_help,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [("sft", "train_sft.py", "SFT_DIR"), ("rm", "train_rm.py", "RM_DIR"), ("ppo", "train_ppo.py", "PPO_DIR"),
          ("dpo", "train_dpo.py", "DPO_DIR")]  # dpo only with PIPELINE_DPO (run_stages)
DATA_SETTINGS = ("SFT_TRAIN_FILE", "SFT_EVAL_FILE", "RM_TRAIN_FILE", "RM_EVAL_FILE", "PPO_PROMPTS_FILE", "EVAL_TASKS_FILE")
# settings that change where a stage writes, how it logs, resumes, uploads or is launched, or only its
# memory use: a finished stage made with other values is still this run's. MODEL_NAME and RECIPE are
# the lineage, checked apart (check_reuse).
RUN_SETTINGS = {"SFT_DIR", "RM_DIR", "PPO_DIR", "DPO_DIR", "PIPELINE_DPO", "RUNS_DIR", "RESUME", "OVERWRITE", "REPORT_TO", "LOG_EVERY", "GEN_BATCH_SIZE",
                "RM_SCORE_BATCH_SIZE", "PPO_SAVE_EVERY", "GRADIENT_CHECKPOINTING", "PPO_SHARD_FROZEN_MODELS", "SANDBOX_MODE",
                "PUSH_TO_HUB", "HUB_MODEL_ID", "ACCELERATE_CONFIG", "PPO_ACCELERATE_CONFIG", "NUM_PROCESSES",
                "INDIST_TASKS_FILE", "MODEL_NAME", "RECIPE"}


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Run data -> SFT -> RM -> PPO (-> DPO with --PIPELINE_DPO=true) -> report; extra --NAME=value "
                    "settings go to every stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--rep=...` must not silently mean --reports
        epilog="Any other setting of config.py goes to every stage as --NAME=value (e.g. --PPO_STEPS=5); "
               "`python train_<stage>.py --help` lists the ones each stage reads, with their defaults.\n\n"
               + tool_help(__file__, overrides=True))
    ap.add_argument("--redo", default="", metavar="STAGES",
                    help="comma list of stages to train again even if finished (sft,rm,ppo,dpo) or 'all'")
    ap.add_argument("--reuse", default="", metavar="STAGES",
                    help="comma list of finished stages to keep as they are although this run's settings differ "
                         "from theirs (sft,rm,ppo,dpo), e.g. SFT and RM of another SEED under a new PPO_DIR")
    ap.add_argument("--reports", default="reports", metavar="DIR", help="where logs, timings and the report go")
    ap.add_argument("--accelerate-config", metavar="FILE",
                    help="launch the stages under `accelerate launch --config_file FILE` (sets ACCELERATE_CONFIG)")
    ap.add_argument("--num-processes", type=int, metavar="N", help="processes per stage, one per GPU (sets NUM_PROCESSES)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved settings and the commands the pipeline would run; run nothing")
    args, overrides = ap.parse_known_args(argv)
    names = [s for s, _, _ in STAGES]
    stages = {}
    for flag in ("redo", "reuse"):
        chosen = {s.strip().lower() for s in getattr(args, flag).split(",") if s.strip()}
        chosen = set(names) if "all" in chosen else chosen
        if chosen - set(names):
            ap.error(f"--{flag}: unknown stage {sorted(chosen - set(names))[0]!r}; use sft, rm, ppo, dpo or all")
        stages[flag] = chosen
    if stages["redo"] & stages["reuse"]:
        ap.error(f"--redo and --reuse both name {sorted(stages['redo'] & stages['reuse'])[0]}")
    return args, stages["redo"], stages["reuse"], overrides


def run_stages():
    """The stages this run has: SFT, RM, PPO, and DPO with PIPELINE_DPO."""
    return [stage for stage in STAGES if stage[0] != "dpo" or C.PIPELINE_DPO]


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


def stage_settings(stage):
    """The settings that decide what `stage` makes: the shared ones, those its sources read
    (`C.NAME`) and its own prefix's (RM_, PPO_), less RUN_SETTINGS. The embedded base model's build
    settings (rlhf/base_model.py) count only when it is built, once, so not here."""
    shared = {n for title, rows in config_sections() if title == SHARED_SECTION for n, _ in rows}
    sources = [p for p in STAGE_SOURCES[stage] if p != "rlhf/base_model.py"]
    prefix = {"sft": None, "rm": "RM_", "ppo": "PPO_", "dpo": "DPO_"}[stage]
    own = {n for n in settings() if prefix and n.startswith(prefix)}
    return (shared | names_read_by(*sources) | own) - RUN_SETTINGS


def stale_settings(stage, info, changes):
    """{NAME: (the stage's value, this run's)} of the settings this run gives (command line or
    recipe) that decide what `stage` makes (stage_settings) and differ from those it was made with."""
    saved, own = info.get("settings", {}), stage_settings(stage)
    return {k: (saved[k], v) for k, v in changes.items() if k in own and k in saved and saved[k] != v}


def check_reuse(name, folder, info, changes, reuse, earlier):
    """A finished stage the pipeline would reuse: made from this run's MODEL_NAME (when given) and
    RECIPE, on the stage outputs it reads (`earlier`: their rlhf_stage.json), and with this run's
    settings unless --reuse names it; else one line naming what to add. Returns the notes to print."""
    later = [s for n, _, s in run_stages() if n == name or name in dict(STAGE_INPUTS[n])]
    redo = f"add --redo {name} to train it (and the stages after it) again, or give this run its own {', '.join(later)}"
    recipe = info.get("settings", {}).get("RECIPE", "")
    if not same_name(recipe, C.RECIPE):
        raise UserError(f"{name}: {folder} was made with RECIPE={recipe!r}, this run gives {C.RECIPE!r}: {redo}")
    model = info.get("base_model")
    if model and not same_name(model, C.MODEL_NAME):
        if "MODEL_NAME" in changes or name != "sft":
            raise UserError(f"{name}: {folder} was trained from MODEL_NAME={model!r}, this run gives {C.MODEL_NAME!r}: {redo}")
        C.MODEL_NAME = model  # as the stages do (rlhf.handoff.check_lineage): the one the run builds on
    sft_info = earlier.get("sft")
    made_on = info.get("inputs", {}).get("sft", {}).get("finished_at")
    if name in ("rm", "dpo") and sft_info and made_on and made_on != sft_info.get("finished_at"):
        raise UserError(f"{name}: {folder} was trained on an SFT model finished at {made_on}, {C.SFT_DIR} was finished at "
                        f"{sft_info.get('finished_at')}: {redo}")
    stale = stale_settings(name, info, changes)
    if stale and name not in reuse:
        made = ", ".join(f"{k}={old!r}" for k, (old, _) in stale.items())
        given = ", ".join(f"{k}={new!r}" for k, (_, new) in stale.items())
        raise UserError(f"{name}: {folder} was made with {made}, this run gives {given}: add --redo {name} to train it "
                        f"(and the stages after it) again, or --reuse {name} to keep it as it is")
    return [f"{name}: note: {folder} was made with {k}={old!r}, not {new!r}; reused as --reuse asks"
            for k, (old, new) in stale.items()]


def plan_stages(redo, reuse, changes):
    """[(stage, script, folder, train?, notes)]: which finished stages are reused (check_reuse) and
    which are trained; a stage built on one that is trained (rlhf.handoff.STAGE_INPUTS) is trained too."""
    plan, infos, trained = [], {}, []
    for name, script, setting in run_stages():
        folder = getattr(C, setting)
        info = read_stage_info(folder)
        inputs = [earlier for earlier, _ in STAGE_INPUTS[name] if earlier in trained]
        if info and name not in redo and not inputs:
            notes = check_reuse(name, folder, info, changes, reuse, infos)
            plan.append((name, script, folder, False, [f"{name}: {folder} is finished, reusing it (--redo {name} to "
                                                        "train again)", *notes]))
            infos[name] = info
            continue
        notes = [f"{name}: {inputs[0]} is trained again, so {name} is trained again too"] if info and name not in redo \
            and inputs else []
        plan.append((name, script, folder, True, notes))
        trained.append(name)
    return plan


def accelerate_config(name):
    """The accelerate config `name` launches with ("" for one plain process): the path as given, or
    inside the repository (accelerate_configs/...) when it is not there."""
    config = (C.PPO_ACCELERATE_CONFIG or C.ACCELERATE_CONFIG) if name == "ppo" else C.ACCELERATE_CONFIG
    return config if not config or os.path.isfile(config) else os.path.join(ROOT, config)


def check_launch(plan, dry_run):
    """The accelerate configs of the stages to train exist, SFT's and RM's do not shard the weights
    (they refuse ZeRO-3 and FSDP), and DeepSpeed is installed where one uses it: one line before any
    work (a note on a dry run, which may be made on a machine without it)."""
    import yaml

    if C.NUM_PROCESSES and not any(accelerate_config(name) for name, *_ in plan):
        raise UserError("--num-processes (NUM_PROCESSES) needs an accelerate config: --accelerate-config FILE")
    for name, _, _, train, _ in plan:
        config = accelerate_config(name)
        if not (train and config):
            continue
        if not os.path.isfile(config):
            raise UserError(f"accelerate config {os.path.relpath(config, ROOT)} not found (accelerate_configs/ has "
                            f"{', '.join(sorted(os.listdir(os.path.join(ROOT, 'accelerate_configs'))))})")
        with open(config, encoding="utf-8") as f:
            launch = yaml.safe_load(f) or {}
        config = os.path.relpath(config, ROOT) if config.startswith(ROOT + os.sep) else config  # as the user wrote it
        kind = launch.get("distributed_type")
        sharded = kind == "FSDP" or kind == "DEEPSPEED" and (launch.get("deepspeed_config") or {}).get("zero_stage") == 3
        if sharded and name in ("sft", "rm", "dpo"):
            raise UserError(f"{config} shards the weights ({kind}), which train_{name}.py refuses: give SFT and RM "
                            "accelerate_configs/ddp.yaml or deepspeed_zero2.yaml (ACCELERATE_CONFIG) and PPO this one "
                            f"(--PPO_ACCELERATE_CONFIG={config})")
        if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            if not dry_run:
                raise UserError(f"{config} needs deepspeed: pip install -e \".[deepspeed]\"")
            print(f"{name}: note: {config} needs deepspeed, which is not installed here (pip install -e \".[deepspeed]\")")


def stage_command(name, script, overrides):
    """How the pipeline runs a stage: `python train_<stage>.py [overrides]`, or under `accelerate
    launch` with its config and NUM_PROCESSES."""
    config, path = accelerate_config(name), os.path.join(ROOT, script)
    if not config:
        return [sys.executable, path, *overrides]
    processes = ["--num_processes", str(C.NUM_PROCESSES)] if C.NUM_PROCESSES else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *processes, path, *overrides]


def shown(cmd):
    """A command as a user would type it: `python`, `accelerate launch`, paths inside the repository
    relative to it."""
    words = ["accelerate", "launch"] + cmd[3:] if cmd[1:3] == ["-m", "accelerate.commands.launch"] else ["python"] + cmd[1:]
    return shlex.join(os.path.relpath(w, ROOT) if w.startswith(ROOT + os.sep) else w for w in words)


def dry_run(args, plan, overrides, changes):
    """Print what the run would do: the settings it changes (and where from), the stages it reuses
    and the commands it would run; nothing is built, trained or written."""
    print("pipeline: dry run: nothing is built, trained or written")
    resolved = resolve_overrides(overrides)
    defaults = {n: v for n, v in vars(sys.modules["config"]).items() if n.isupper()}
    print("settings (config.py's, then these):" if resolved else "settings: config.py's")
    for name, value, source in resolved:
        print(f"  {name} = {value!r}  ({source})")
    for flag, setting in (("--accelerate-config", "ACCELERATE_CONFIG"), ("--num-processes", "NUM_PROCESSES")):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            print(f"  {setting} = {defaults[setting]!r}  ({flag})")
    for name, _, _, train, _ in plan:
        for line in learning_rate_notes(name, changes, scalar_settings()) if train else []:
            print(line)
    check_launch(plan, dry_run=True)
    for name, script, folder, train, notes in plan:
        for line in notes:
            print(line)
        if train:
            print(f"{name}: would train {folder}: {shown(stage_command(name, script, overrides))}")
    for stage, setting in indist_stages():
        if os.path.exists(C.INDIST_TASKS_FILE):
            print(f"{stage} in-distribution: {shown(indist_command(stage, getattr(C, setting), args.reports, overrides))}")
    print(f"report: {shown(report_command(args.reports, overrides))}")


def indist_stages():
    """(stage, setting) of the models that answer INDIST_TASKS_FILE: SFT, PPO, and DPO with PIPELINE_DPO."""
    return [(name, setting) for name, _, setting in run_stages() if name != "rm"]


def evaluate_in_distribution(reports, overrides):
    """The SFT, PPO (and DPO) models' greedy answers to INDIST_TASKS_FILE, one per task, by
    scripts/evaluate.py (as a user runs it) into <reports>/indist_<stage>.jsonl for the report;
    answers newer than their model and the task file are kept. Nothing when the file does not exist."""
    if not os.path.exists(C.INDIST_TASKS_FILE):
        print(f"pipeline: no in-distribution evaluation: INDIST_TASKS_FILE {C.INDIST_TASKS_FILE} does not exist", flush=True)
        return
    for stage, setting in indist_stages():
        folder, out = getattr(C, setting), indist_answers_path(reports, stage)
        if is_current(out, os.path.join(folder, STAGE_INFO_FILE), C.INDIST_TASKS_FILE):
            print(f"{stage}: {out} answers {C.INDIST_TASKS_FILE} for this model, reusing it", flush=True)
            continue
        cmd = indist_command(stage, folder, reports, overrides)
        print(f"pipeline: {stage} in-distribution: {shown(cmd)}", flush=True)
        log = os.path.join(reports, "logs", f"indist_{stage}.log")
        code, error = run_logged(cmd, log)
        if code != 0:
            print(f"pipeline: stopped at the in-distribution evaluation of {stage} (exit {code}); log: {log}", file=sys.stderr)
            print(error or "error: scripts/evaluate.py crashed, see the traceback above", file=sys.stderr)
            sys.exit(code)


def indist_command(stage, folder, reports, overrides):
    return [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--model", folder,
            "--problems", C.INDIST_TASKS_FILE, "--k", "1", "--out", indist_answers_path(reports, stage), *overrides]


def report_command(reports, overrides):
    return [sys.executable, os.path.join(ROOT, "scripts", "report.py"), f"--reports={reports}", *overrides]


def write_timings(path, timings):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(timings, f, indent=2)


def main(argv):
    args, redo, reuse, overrides = parse_args(argv)
    defaults = settings()
    changes = apply_overrides(overrides, quiet=True)  # fail on a typo before hours of training
    if args.accelerate_config is not None:
        C.ACCELERATE_CONFIG = args.accelerate_config
    if args.num_processes is not None:
        C.NUM_PROCESSES = args.num_processes
    check_values()  # and on a value out of range (--WARMUP_RATIO=2), before the data is built
    if "dpo" in {s.strip().lower() for s in f"{args.redo},{args.reuse}".split(",")} and not C.PIPELINE_DPO:
        raise UserError("--redo/--reuse dpo: DPO is not part of this run; add --PIPELINE_DPO=true")
    if C.PIPELINE_DPO:
        # an unknown DPO_LOSS_TYPE: one line now, not after SFT, RM and PPO
        dpo_loss_types(C.DPO_LOSS_TYPE, C.DPO_LABEL_SMOOTHING)
    if C.OVERWRITE:
        redo = {s for s, _, _ in STAGES}  # --OVERWRITE=true reaches every stage: it means redo all
    plan = plan_stages(redo, reuse, changes)  # a finished stage made otherwise: one line now, not after SFT
    if args.dry_run:
        dry_run(args, plan, overrides, changes)
        return
    check_launch(plan, dry_run=False)
    for name, _, _, train, _ in plan:  # the embedded model's learning rates on another model: said before SFT starts
        for line in learning_rate_notes(name, changes, scalar_settings()) if train else []:
            print(f"pipeline: {line}", flush=True)
    check_hub_login(C.PUSH_TO_HUB)  # PUSH_TO_HUB without a token: before any stage trains
    ensure_data(defaults)
    if os.path.normpath(C.MODEL_NAME) == os.path.normpath(C.BASE_MODEL_DIR) and not os.path.exists(
            os.path.join(C.MODEL_NAME, "config.json")):
        print(f"pipeline: base model {C.MODEL_NAME} not built yet: train_sft.py builds it first", flush=True)

    os.makedirs(args.reports, exist_ok=True)
    timings_path = os.path.join(args.reports, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path, encoding="utf-8") as f:
            timings = json.load(f)
    for name, script, folder, train, notes in plan:
        for line in notes:
            print(line, flush=True)
        info = read_stage_info(folder)
        if not train:
            earlier = timings.get(name, {})
            if earlier.get("finished_at") != info.get("finished_at"):  # trained outside the pipeline
                earlier = {"seconds": info.get("metrics", {}).get("train_seconds"), "finished_at": info.get("finished_at"),
                           "source": "train_seconds of rlhf_stage.json"}
            timings[name] = earlier
            continue
        cmd = stage_command(name, script, overrides)
        if info:
            cmd.append("--OVERWRITE=true")  # the stage refuses to replace a finished model without it
        print(f"pipeline: {name}: {shown(cmd)}", flush=True)
        t0 = time.time()
        code, error = run_logged(cmd, os.path.join(args.reports, "logs", f"{name}.log"))
        if code != 0:  # the stage's own error line last, so it is what the user sees
            print(f"pipeline: stopped at {name} (exit {code}); log: {os.path.join(args.reports, 'logs', name + '.log')}",
                  file=sys.stderr)
            print(error or f"error: {name} crashed, see the traceback above", file=sys.stderr)
            sys.exit(code)
        info = read_stage_info(folder) or {}
        timings[name] = {"seconds": time.time() - t0, "finished_at": info.get("finished_at"), "source": "pipeline"}
        write_timings(timings_path, timings)  # after each stage: a later failure keeps the earlier times
    write_timings(timings_path, timings)
    evaluate_in_distribution(args.reports, overrides)

    code, error = run_logged(report_command(args.reports, overrides), os.path.join(args.reports, "logs", "report.log"))
    if code != 0:
        print(error or "error: the report crashed, see the traceback above", file=sys.stderr)
        sys.exit(code)
    print(f"pipeline: done | report: {os.path.join(args.reports, 'report.md')}")


if __name__ == "__main__":
    run_stage(main)
