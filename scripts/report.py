"""The report of a pipeline run: reads the stage folders (their rlhf_stage.json) and
<reports>/timings.json, writes <reports>/report.json (metrics, timings, settings, machine),
<reports>/report.md (SFT versus PPO, and DPO beside them when it ran; the reward model, timings)
and PNG plots of training. A stage that has not run is reported as missing (DPO only with
PIPELINE_DPO: without it, a finished DPO_DIR is reported and none is asked for).

Greedy pass@1 with a 95% interval comes from each model's answer to each task: on the held-out
tasks (EVAL_TASKS_FILE) the stages' own eval_results.jsonl (SFT_DIR, PPO_DIR, DPO_DIR), on the
in-distribution tasks (INDIST_TASKS_FILE, when it exists) <reports>/indist_sft.jsonl,
indist_ppo.jsonl (and indist_dpo.jsonl), which the pipeline writes with scripts/evaluate.py. Each
set is also split into the families with a planted habitual bug (the task rows' `habit`) and the rest. A file that is
missing is named in the report, with the figures it would have given left out.

    python scripts/report.py                                # after `bash run.sh`
    python scripts/report.py --reports /tmp/r --PPO_DIR=/tmp/ppo_model
"""

import argparse
import datetime
import json
import math
import os

import config as C
from rlhf.common import run_stage
from rlhf.data import read_jsonl
from rlhf.handoff import STAGE_INFO_FILE, indist_answers_path, is_current, machine, read_stage_info
from rlhf.settings import apply_overrides, tool_help

STAGES = [("sft", "SFT_DIR"), ("rm", "RM_DIR"), ("ppo", "PPO_DIR"), ("dpo", "DPO_DIR")]
REQUIRED = {  # keys report.json always has (None when the stage did not record them)
    "sft": ("eval_perplexity", "eval_token_accuracy", "pass_at_1"),
    "rm": ("eval_accuracy", "eval_f1", "heldout_test_agreement"),
    "ppo": ("pass_at_1", "kl", "reward_mean"),
    "dpo": ("pass_at_1", "eval_reward_accuracy", "eval_reward_margin"),
}
LANGS = ("zh", "en")  # per-language pass@1 is shown when a stage recorded pass_at_1_<lang>
KEPT_DICTS = ("seed_prompt_passes", "round_history")  # small dicts and lists report.json keeps (not the logs)


def with_dpo():
    """Is DPO part of the report: asked for (PIPELINE_DPO), or its folder holds a finished model?"""
    return C.PIPELINE_DPO or read_stage_info(C.DPO_DIR) is not None


def scalars(metrics):
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict)) or k in KEPT_DICTS}


def ran_on(infos):
    """The machine the last stage recorded (rlhf_stage.json), else this one's (importing torch takes seconds)."""
    recorded = [info["machine"] for info in infos.values() if info and "machine" in info]
    return recorded[-1] if recorded else machine()


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------------------
# pass@1 with its uncertainty: one greedy answer per task, intervals by resampling the tasks
# ---------------------------------------------------------------------------------------------
BOOTSTRAP_SEED = 0  # fixed: the same answers always give the same report
BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95
HELD_OUT_ANSWERS = "eval_results.jsonl"  # in SFT_DIR and PPO_DIR: each held-out task's greedy answer and verdict
TASK_SETS = (("held_out", "held-out", "EVAL_TASKS_FILE"), ("in_distribution", "in-distribution", "INDIST_TASKS_FILE"))
GROUPS = (("", "all", None), ("_habit", "planted-habit families", True), ("_other", "other families", False))


def bootstrap_mean(values, seed=BOOTSTRAP_SEED, resamples=BOOTSTRAP_RESAMPLES, level=LEVEL, clusters=None):
    """(mean, low, high): the mean of `values` (one per task) and its percentile-bootstrap interval
    (Efron and Tibshirani 1993, ch. 13): the tasks are drawn with replacement `resamples` times and
    the interval holds the middle `level` of the resampled means. With `clusters` (one label per
    value: the task's variant) whole clusters are drawn instead, every task of a drawn cluster with
    it: tasks that rephrase one variant share its program and pass or fail together, so they are
    not independent draws, and the interval widens accordingly (cluster bootstrap, Davison and
    Hinkley 1997, section 3.8). For a paired comparison of two models pass each task's difference
    (after - before): resampling the differences resamples the same tasks for both models. None
    when there are no values."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    if clusters is None:
        picks = rng.integers(0, values.size, size=(resamples, values.size))  # (resamples, tasks)
        means = values[picks].mean(axis=1)
    else:
        _, index = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
        sums, sizes = np.bincount(index, weights=values), np.bincount(index).astype(float)  # per cluster
        picks = rng.integers(0, sizes.size, size=(resamples, sizes.size))  # (resamples, clusters)
        means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def variant_of(task_id):
    """The (family, variant) a task belongs to: the first two parts of our task ids
    ("quick_sort/3/quicksort/zh/t0w1", data/DATA_CARD.md); a task id of another shape is its own variant."""
    parts = str(task_id).split("/")
    return "/".join(parts[:2]) if len(parts) >= 3 else str(task_id)


def passes_by_task(rows):
    """{task_id: share of its answers that passed} of per-answer result rows (one greedy answer
    per task gives 0 or 1)."""
    answers = {}
    for row in rows:
        answers.setdefault(str(row["task_id"]), []).append(bool(row["passed"]))
    return {task: sum(v) / len(v) for task, v in answers.items()}


def figure(values, tasks):
    """A figure of report.json: the mean of values with its interval, and the tasks and variants behind it."""
    mean, low, high = bootstrap_mean(values, clusters=[variant_of(t) for t in tasks])
    return {"mean": mean, "low": low, "high": high, "tasks": len(tasks), "variants": len({variant_of(t) for t in tasks})}


def group_figures(sft, ppo, tasks, **others):
    """SFT and PPO pass@1 over the tasks of a group each model answered, and the PPO - SFT gain over
    the tasks both answered (paired); sft / ppo: {task_id: pass} or None when missing. `others`
    (dpo=...) adds that model's figure and its gain over SFT as "<name>_gain"."""
    out = {}
    for name, passes in (("sft", sft), ("ppo", ppo), *others.items()):
        mine = [t for t in tasks if passes is not None and t in passes]
        out[name] = figure([passes[t] for t in mine], mine) if mine else None
    for key, after in (("gain", ppo), *((f"{name}_gain", passes) for name, passes in others.items())):
        both = [t for t in tasks if sft is not None and after is not None and t in sft and t in after]
        out[key] = figure([after[t] - sft[t] for t in both], both) if both else None
    return out


def answer_files(reports):
    """Per task set, per model: (answers file, the files it must be newer than, what makes it). The
    held-out answers are saved with their model; the in-distribution ones are written after it."""
    files = {"held_out": {}, "in_distribution": {}}
    for stage, setting in (("sft", "SFT_DIR"), ("ppo", "PPO_DIR"), *((("dpo", "DPO_DIR"),) if with_dpo() else ())):
        folder = getattr(C, setting)
        files["held_out"][stage] = (os.path.join(folder, HELD_OUT_ANSWERS), (),
                                    f"train_{stage}.py saves it with its final evaluation")
        path = indist_answers_path(reports, stage)
        files["in_distribution"][stage] = (
            path, (os.path.join(folder, STAGE_INFO_FILE), C.INDIST_TASKS_FILE),
            f"run the pipeline (scripts/pipeline.py), or `python scripts/evaluate.py --model {folder} "
            f"--problems {C.INDIST_TASKS_FILE} --k 1 --out {path}`")
    return files


def read_answers(path, inputs, fix):
    """({task_id: pass} or None, a line saying why None): the answers in `path`, left out when the
    file is missing or older than one of `inputs` (the model, the task file)."""
    if not os.path.exists(path):
        return None, f"{path} does not exist ({fix})"
    newer = [i for i in inputs if not is_current(path, i)]
    if newer:
        return None, f"{path} is older than {' and '.join(newer)}: it answers for an earlier one ({fix})"
    return passes_by_task(read_jsonl(path)), None


def pass_at_1_with_intervals(reports):
    """report.json's "pass_at_1": the figures of every task set and group (TASK_SETS x GROUPS, each
    None when it has no task), the files they come from, and a line for each one left out."""
    out = {"level": LEVEL, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "groups": {}, "files": {}, "notes": []}
    for key, label, setting in TASK_SETS:
        task_file = getattr(C, setting)
        if not os.path.exists(task_file):
            out["notes"].append(f"no {label} figures: {setting} {task_file} does not exist")
            continue
        rows = {str(r["task_id"]): r for r in read_jsonl(task_file)}
        answers = {}
        for stage, (path, inputs, fix) in answer_files(reports)[key].items():
            answers[stage], why = read_answers(path, inputs, fix)
            if why:
                out["notes"].append(f"no {label} {stage.upper()} answers: {why}")
            elif not set(answers[stage]) & set(rows):
                out["notes"].append(f"no {label} {stage.upper()} answers: {path} answers none of the tasks of {task_file} "
                                    f"(pass --{setting}=<the file it answers>)")
                answers[stage] = None
            elif set(answers[stage]) - set(rows):
                out["notes"].append(f"{label} {stage.upper()}: {len(set(answers[stage]) - set(rows))} answers of {path} "
                                    f"are to tasks {task_file} no longer has, left out")
            out["files"].setdefault(key, {"tasks": task_file})[stage] = path
        others = {stage: passes for stage, passes in answers.items() if stage not in ("sft", "ppo")}  # dpo
        habits = {t: r["habit"] for t, r in rows.items() if isinstance(r.get("habit"), bool)}
        if not habits:
            out["notes"].append(f"no planted-habit split of the {label} tasks: {task_file} has no `habit` field")
        for suffix, group_label, habit in GROUPS:
            if habit is not None and not habits:
                continue
            tasks = [t for t in rows if habit is None or habits.get(t) is habit]
            out["groups"][key + suffix] = {"label": f"{label}: {group_label}", "file": task_file,
                                           **group_figures(answers["sft"], answers["ppo"], tasks, **others)}
    return out


def build_report(infos, timings, reports="reports"):
    report = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "machine": ran_on(infos),
              "versions": versions(), "seconds": {}, "settings": {}, "missing": []}
    for name, setting in STAGES:
        info = infos[name]
        if info is None and name == "dpo" and not C.PIPELINE_DPO:
            continue  # not asked for, not there: no column, not missing
        if info is None:
            report[name] = {"missing": True, "folder": getattr(C, setting)}
            report["missing"].append(name)
            report["seconds"][name] = None
            continue
        metrics = scalars(info.get("metrics", {}))
        report[name] = {k: metrics.get(k) for k in REQUIRED[name]} | metrics | {
            "folder": getattr(C, setting), "finished_at": info.get("finished_at")}
        report["settings"][name] = info.get("settings", {})
        timing = timings.get(name) or {}
        if timing.get("finished_at") not in (None, info.get("finished_at")):
            timing = {}  # timings.json is of an earlier model than this folder holds
        report["seconds"][name] = timing.get("seconds", metrics.get("train_seconds"))
    if infos["ppo"]:  # the PPO run's evaluation before its first update is the SFT model's
        history = infos["ppo"]["metrics"].get("history", [])
        before = next((h for h in history if h.get("step") == 0), {})
        first = next((h for h in history if "response_length" in h), {})
        report["ppo"]["sft_rm_score"] = before.get("eval_rm_score")
        report["ppo"]["sft_pass_at_1"] = before.get("eval_pass_at_1")
        report["ppo"]["first_step_response_length"] = first.get("response_length")
    report["pass_at_1"] = pass_at_1_with_intervals(reports)
    return report


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------

def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_seconds(value):
    if value is None:
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def fmt_figure(fig, signed=False, count=False):
    """'0.452 [0.386, 0.519]' (signed: '+0.110 [+0.062, +0.157]'), 'n/a' for None; count adds the tasks."""
    if fig is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f"{f.format(fig['mean'])} [{f.format(fig['low'])}, {f.format(fig['high'])}]"
    return f"{text} ({fig['tasks']} tasks)" if count else text


def interval_lines(intervals):
    """report.md's table of pass@1 with intervals, per task set and group, and the lines on what is left out."""
    keys = ("sft", "ppo", "gain", "dpo", "dpo_gain") if any("dpo" in g for g in intervals["groups"].values()) else \
        ("sft", "ppo", "gain")
    titles = {"sft": "SFT", "ppo": "PPO", "gain": "PPO - SFT (paired)", "dpo": "DPO", "dpo_gain": "DPO - SFT (paired)"}
    lines = [f"## Greedy pass@1 with {intervals['level']:.0%} intervals", "",
             f"| tasks | {' | '.join(titles[k] for k in keys)} | tasks, variants |", "|---" * (len(keys) + 2) + "|"]
    for group in intervals["groups"].values():
        figures = [group[k] for k in keys]
        sizes = {(f["tasks"], f["variants"]) for f in figures if f}
        mixed = len(sizes) > 1  # a model answered tasks the other did not: each cell says how many
        cells = [fmt_figure(f, signed=k.endswith("gain"), count=mixed) for f, k in zip(figures, keys)]
        size = "n/a" if not sizes else "see cells" if mixed else "{}, {}".format(*sizes.pop())
        lines.append(f"| {group['label']} | {' | '.join(cells)} | {size} |")
    files = "; ".join(f"{key.replace('_', '-')}: {', '.join(f'{k} {v}' for k, v in paths.items())}"
                      for key, paths in intervals["files"].items())
    lines += ["", f"One greedy answer per task ({files}). Intervals: percentile bootstrap over variants "
              "(the tasks of one variant, the same program asked in other words, are drawn together), "
              f"{intervals['resamples']:,} resamples, seed {intervals['seed']}; the gain's interval resamples the "
              "same tasks for both models. In-distribution tasks are reworded tasks of variants seen in training: "
              "they are never part of the held-out figures.", ""]
    if intervals["notes"]:
        lines += [f"- {note}" for note in intervals["notes"]] + [""]
    return lines


def markdown(report, plots):
    sft, rm, ppo = report["sft"], report["rm"], report["ppo"]
    lines = ["# Pipeline report", "", f"{report['created']} | {report['machine']['platform']} | "
             f"{report['machine']['cpus']} CPUs | GPUs: {', '.join(report['machine'].get('gpus', [])) or 'none'} | "
             + " ".join(f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    for name in report["missing"]:
        lines.append(f"**{name}: missing** ({report[name]['folder']} holds no finished model)  ")
    if report["missing"]:
        lines.append("")
    model = next((report["settings"][s].get("MODEL_NAME") for s in ("sft", "rm", "ppo") if s in report["settings"]), None)
    if model:
        lines += [f"Base model: `{model}`", ""]

    dpo = report.get("dpo")  # None: DPO is not part of this report (with_dpo)
    stages = [sft, dpo, ppo] if dpo is not None else [sft, ppo]

    def row(label, values):
        lines.append(f"| {label} | {' | '.join(values)} |")

    title = "SFT, DPO and PPO" if dpo is not None else "SFT versus PPO"
    lines += [f"## {title} (held-out code tasks)", "", "| metric | " + " | ".join(
        ["SFT", "DPO", "PPO"] if dpo is not None else ["SFT", "PPO"]) + " |", "|---" * (len(stages) + 1) + "|"]
    sft_pass = sft.get("pass_at_1") if not sft.get("missing") else ppo.get("sft_pass_at_1")
    row("pass@1 (greedy, sandboxed tests)", [fmt(sft_pass)] + [fmt(stage.get("pass_at_1")) for stage in stages[1:]])
    for key in sorted({k for stage in stages for k in stage if k.startswith("pass_at_") and k[8:].isdigit()} - {"pass_at_1"}):
        row(f"pass@{key[8:]} ({key[8:]} answers sampled at temperature 1)", [fmt(stage.get(key)) for stage in stages])
    for lang in LANGS:
        values = [stage.get(f"pass_at_1_{lang}") for stage in stages]
        if any(v is not None for v in values):
            row(f"pass@1 {lang}", [fmt(v) for v in values])
    # what only PPO measures: the SFT column's from PPO's evaluation before its first update, "-" for DPO
    only_ppo = lambda before, after, digits=3: [fmt(ppo.get(before), digits)] + ["-"] * (dpo is not None) + [  # noqa: E731
        fmt(ppo.get(after), digits)]
    row("RM score (normalised; 0 = boundary preferred/rejected)", only_ppo("sft_rm_score", "rm_score"))
    row("response length (tokens, sampled rollouts)", only_ppo("first_step_response_length", "response_length", 1))
    prompts = list(dict.fromkeys(p for stage in stages for p in stage.get("seed_prompt_passes") or {}))
    for prompt in prompts:  # the natural prompts, sampled as a user's generate call samples them
        row(f"\"{prompt}\": answers passing (temperature 0.7, top_p 0.95, top_k 50)",
            [f"{stage['seed_prompt_passes'][prompt]}/{stage['seed_prompt_samples']}"
             if prompt in (stage.get("seed_prompt_passes") or {}) else "-" for stage in stages])
    if dpo is not None:
        row("wall time of the stage", [fmt_seconds(report["seconds"].get(name)) for name in ("sft", "dpo", "ppo")])
    lines += ["", "SFT column: pass@1 from the SFT stage; RM score from PPO's evaluation before its first update "
              "(the SFT model); response length of PPO's first rollout batch. PPO column: final evaluation; "
              "response length averaged over the last 5 PPO steps." + (" DPO column: its stage's final evaluation, "
                                                                       "the same tasks and samples." if dpo else ""), ""]
    if not sft.get("missing"):
        lines += [f"SFT held-out: perplexity {fmt(sft.get('eval_perplexity'), 2)}, token accuracy "
                  f"{fmt(sft.get('eval_token_accuracy'))}, train tokens {fmt(sft.get('train_tokens'))}.", ""]
    if dpo and not dpo.get("missing"):
        rounds = dpo.get("rounds") or 0
        settings = report["settings"].get("dpo", {})
        lines += [f"DPO: {'offline (fixed pairs)' if not rounds else f'{rounds} online round(s)'}, loss "
                  f"{settings.get('DPO_LOSS_TYPE', 'n/a')}, beta {settings.get('DPO_BETA', 'n/a')}; held-out pairs: "
                  f"implicit reward accuracy {fmt(dpo.get('eval_reward_accuracy'))}, margin "
                  f"{fmt(dpo.get('eval_reward_margin'))}"
                  + "".join(f"; round {h['round']}: {h['pairs']} pairs ({h['online_pairs']} online, "
                            f"{fmt(h['online_passed'])} of the sampled answers passed)"
                            for h in dpo.get("round_history") or [] if rounds) + ".", ""]
    if not ppo.get("missing"):
        lines += [f"PPO: KL to the SFT model {fmt(ppo.get('kl'))} nats per response, total reward "
                  f"{fmt(ppo.get('reward_mean'))}, {fmt(ppo.get('episodes_per_second'), 2)} episodes/s, peak memory "
                  f"{fmt(ppo.get('peak_rss_mib'), 0)} MiB (last 5 steps for KL and reward).", ""]

    lines += interval_lines(report["pass_at_1"])
    lines += ["## Reward model (held-out preference pairs)", "", "| metric | value |", "|---|---|",
              f"| accuracy (chosen scored above rejected) | {fmt(rm.get('eval_accuracy'))} |"]
    for kind, label in (("buggy", "a correct and a buggy program"),
                        ("wrong_value", "two correct programs, only the prompt decides (`wrong_value`)")):
        if rm.get(f"eval_pairs_{kind}"):
            lines.append(f"| accuracy on pairs of {label} | {fmt(rm[f'eval_accuracy_{kind}'])} ({rm[f'eval_pairs_{kind}']} pairs) |")
        elif not rm.get("missing"):
            why = "none of the held-out pairs" if rm.get("eval_pairs_buggy") or rm.get("eval_pairs_wrong_value") else \
                "not recorded: RM_EVAL_FILE gives no `bug`"
            lines.append(f"| accuracy on pairs of {label} | n/a ({why}) |")
    for key, label in (("eval_f1", "F1 (one threshold)"),
                       ("eval_margin", "margin (chosen - rejected score)"), ("train_accuracy", "train accuracy"),
                       ("eval_pairs", "held-out pairs"),
                       ("heldout_test_agreement", "agrees with the tests: reference above the SFT model's failed "
                                                  "answer, held-out tasks"),
                       ("heldout_test_failures", "failed SFT answers checked"),
                       ("onpolicy_pairs", "on-policy training pairs (the SFT model's failing answers)")):
        lines.append(f"| {label} | {fmt(rm.get(key))} |")
    lines += ["", "## Time", "", "| stage | wall time |", "|---|---|"]
    for name in report["seconds"]:  # the stages of this report (DPO only when it is part of it)
        lines.append(f"| {name} | {fmt_seconds(report['seconds'][name])} |")
    known = [v for v in report["seconds"].values() if v is not None]
    lines += [f"| total | {fmt_seconds(sum(known)) if known else 'n/a'} |", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({os.path.basename(path)})" for title, path in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def series(history, key):
    """(steps, values) of the history rows that have `key` (and a finite value)."""
    rows = [(h["step"], h[key]) for h in history if h.get(key) is not None and "step" in h
            and not (isinstance(h[key], float) and math.isnan(h[key]))]
    return [s for s, _ in rows], [v for _, v in rows]


def smoothed(x, y, log=False):
    """The trend through the noise of single log steps (length-grouped SFT batches give a saw-tooth,
    PPO iterations are noisy): at each point, a straight line fitted by least squares to a window
    of about a tenth of the points, read at that point (a moving-window regression, Savitzky and
    Golay 1964, order 1). In the middle that is the centred mean; at the ends the window keeps its
    size inside the data, so the line neither lags (as an exponential average does) nor follows
    the last noisy point. log=True fits the logarithms (for a log axis)."""
    values = [math.log(v) for v in y] if log else [float(v) for v in y]
    n = len(values)
    width = min(n, 2 * max(2, n // 20) + 1)
    out = []
    for i in range(n):
        lo = min(max(0, i - width // 2), n - width)
        xs, vs = x[lo:lo + width], values[lo:lo + width]
        mx, mv = sum(xs) / width, sum(vs) / width
        sxx = sum((a - mx) ** 2 for a in xs)
        slope = sum((a - mx) * (b - mv) for a, b in zip(xs, vs)) / sxx if sxx else 0.0
        out.append(mv + slope * (x[i] - mx))
    return [math.exp(v) for v in out] if log else out


def plot_lines(ax, history, specs, title, ylabel, log_if_decades=False):
    """One line per (key, label, style) of `specs`. A curve ("-", ":") of 10 points or more is drawn
    raw, thin and faint, with its smoothed trend over it in the same colour; markers ("o") are drawn
    as they are. With log_if_decades, a y-axis whose values are positive and span 30x or more is
    logarithmic (a loss falling from 8 to 0.01 shows its late progress)."""
    lines = [(label, style, *series(history, key)) for key, label, style in specs]
    lines = [line for line in lines if line[2]]
    values = [v for *_, y in lines for v in y]
    log = log_if_decades and bool(values) and min(values) > 0 and max(values) / min(values) >= 30
    for label, style, x, y in lines:
        if style in ("-", ":", "--") and len(x) >= 10:  # a curve, not markers
            raw, = ax.plot(x, y, style, linewidth=0.8, alpha=0.35, label=f"{label} (raw)")
            ax.plot(x, smoothed(x, y, log), style, color=raw.get_color(), linewidth=2, label=f"{label} (smoothed)")
        else:
            ax.plot(x, y, style, label=label, markersize=5)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("optimizer step" if "ppo" not in title.lower() else "PPO iteration")
    ax.set_ylabel(f"{ylabel}, log scale" if log else ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both" if log else "major")
    if lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def make_plots(infos, out_dir):
    """PNG files in out_dir; returns [(title, path)]."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    plots = []

    def save(fig, name, title):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append((title, path))

    if infos["sft"]:
        history = infos["sft"]["metrics"].get("log_history", [])
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        plot_lines(a, history, [("loss", "train", "-"), ("eval_loss", "held-out", "o-")],
                   "SFT loss", "cross-entropy (nats/token)", log_if_decades=True)
        plot_lines(b, history, [("mean_token_accuracy", "train", "-"), ("eval_mean_token_accuracy", "held-out", "o-")],
                   "SFT next-token accuracy", "accuracy (share of answer tokens)")
        fig.suptitle("Stage 1: supervised fine-tuning")
        save(fig, "sft_loss.png", "SFT loss and token accuracy")
    if infos["rm"]:
        history = infos["rm"]["metrics"].get("log_history", [])
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        plot_lines(a, history, [("accuracy", "train batches", "-"), ("eval_accuracy", "held-out", "o-")],
                   "RM pairwise accuracy", "share of pairs with chosen > rejected")
        plot_lines(b, history, [("loss", "train", "-"), ("eval_loss", "held-out", "o-")],
                   "RM loss", "Bradley-Terry loss (nats/pair)", log_if_decades=True)
        fig.suptitle("Stage 2: reward model")
        save(fig, "rm_accuracy.png", "RM accuracy and loss")
    if infos["ppo"]:
        metrics = infos["ppo"]["metrics"]
        history = list(metrics.get("history", []))
        steps = [h["step"] for h in history if "kl" in h]
        if steps and metrics.get("pass_at_1") is not None:  # the final evaluation is kept outside the history
            history.append({"step": max(steps), "eval_pass_at_1": metrics["pass_at_1"], "eval_rm_score": metrics.get("rm_score")})
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        plot_lines(axes[0, 0], history, [("score", "score (RM + tests)", "-"), ("rm_score", "RM score (normalised)", "-"),
                                         ("eval_rm_score", "held-out RM score (greedy)", "o")],
                   "PPO reward per iteration", "reward (normalised units)")
        plot_lines(axes[0, 1], history, [("kl", "KL to SFT model", "-")], "PPO KL per iteration",
                   "KL (nats per response)")
        plot_lines(axes[1, 0], history, [("response_length", "mean response length", "-")],
                   "PPO response length per iteration", "tokens")
        plot_lines(axes[1, 1], history, [("sampled_pass_rate", "rollouts: all sampled answers", "-"),
                                         ("test_pass_rate", "rollouts: answers trained on", "-"),
                                         ("mixed_groups", "prompts with passing and failing answers", ":"),
                                         ("eval_pass_at_1", "held-out pass@1 (greedy)", "o")],
                   "PPO test pass rate per iteration", "share passed")
        axes[1, 1].set_ylim(-0.02, 1.02)
        fig.suptitle("Stage 3: PPO")
        save(fig, "ppo_training.png", "PPO training curves")
    return plots


def main(argv):
    ap = argparse.ArgumentParser(description="Write report.json, report.md and plots of the pipeline's stage outputs.",
                                 allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=tool_help(__file__, *(setting for _, setting in STAGES),
                                                  *(setting for _, _, setting in TASK_SETS), overrides=True))
    ap.add_argument("--reports", default="reports", metavar="DIR", help="output folder (and where timings.json is)")
    args, overrides = ap.parse_known_args(argv)
    apply_overrides(overrides, quiet=True)
    infos = {name: read_stage_info(getattr(C, setting)) for name, setting in STAGES}
    timings_path = os.path.join(args.reports, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path, encoding="utf-8") as f:
            timings = json.load(f)
    os.makedirs(args.reports, exist_ok=True)
    report = build_report(infos, timings, args.reports)
    plots = make_plots(infos, args.reports)
    with open(os.path.join(args.reports, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    with open(os.path.join(args.reports, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report, plots))
    missing = f" | missing: {', '.join(report['missing'])}" if report["missing"] else ""
    print(f"report: {os.path.join(args.reports, 'report.md')}, report.json and {len(plots)} plot(s){missing}")


if __name__ == "__main__":
    run_stage(main)
