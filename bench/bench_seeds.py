"""How much of the pass@1 figures is the seed's: the stages for each SFT seed x each PPO seed, and
the mean and spread over the runs of SFT pass@1, PPO pass@1 and the PPO - SFT gain, overall and per
group of the report (held-out and in-distribution tasks, planted-habit families and the rest), with
pass@EVAL_SAMPLES where the stages recorded it.

For each SFT seed s, with SEED=s: the embedded base model built and initialised (its own
BASE_MODEL_DIR; with a MODEL_NAME of your own the seed varies the data order only), train_sft.py,
then train_rm.py once on that SFT model. For each PPO seed p: scripts/pipeline.py with SEED=p, which
reuses that SFT and RM model (`--reuse sft,rm`: its notes that they were trained with another SEED
are expected), trains PPO, answers the in-distribution tasks and writes the run's report.json, whose
"pass_at_1" figures this bench gathers. Under --out:

    sft_seed<s>/base_model, sft_model, rm_model, runs/, logs/
    sft_seed<s>/ppo_seed<p>/ppo_model, runs/, reports/ (report.json, report.md, logs/)

A finished model is reused and a run whose report.json is newer than its PPO model is skipped, so
an interrupted bench picks up where it stopped (an interrupted stage resumes from its checkpoint).
The table is printed and, with the runs, the machine and the date, written to <out>/bench_seeds.json
and bench/results/bench_seeds.json. Any --NAME=value goes to every stage.

    python bench/bench_seeds.py                                          # 3 x 3 runs, stage defaults
    python bench/bench_seeds.py --out=/tmp/seeds --sft_seeds=42,1 --ppo_seeds=42 --PPO_STEPS=10
    python bench/bench_seeds.py --out=/tmp/seeds --EPOCHS=1 --PPO_STEPS=2    # a quick check that it all runs
"""

import json
import os
import statistics
import sys

import _common
import config as C
from rlhf.handoff import STAGE_INFO_FILE, is_current
from rlhf.settings import UserError, apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"out": "runs/bench_seeds", "sft_seeds": "42,1,2", "ppo_seeds": "42,1,2"}
SET_HERE = ("SEED", "BASE_MODEL_DIR", "SFT_DIR", "RM_DIR", "PPO_DIR", "RUNS_DIR")  # per run, by this bench
FIGURES = ("sft", "ppo", "gain")


def run(cmd, log):
    """Run a stage or the pipeline as a user does, its output to the terminal and to `log`; a failure stops the bench."""
    from scripts.pipeline import run_logged

    code, error = run_logged(cmd, log)
    if code != 0:
        raise UserError(f"`{' '.join(cmd[1:])}` failed (exit {code}{': ' + error if error else ''}); its output: {log}. "
                        "Rerun the bench to go on from there")


def finished(folder):
    return os.path.exists(os.path.join(folder, STAGE_INFO_FILE))


def train_sft_and_rm(folder, seed, overrides):
    """The SFT model of `seed` and its RM under `folder` (each skipped when finished); returns the
    settings that point a stage at them."""
    base = os.path.join(folder, "base_model")
    embedded = os.path.normpath(C.MODEL_NAME) == os.path.normpath(C.BASE_MODEL_DIR)  # built here, initialised by SEED
    models = ([f"--BASE_MODEL_DIR={base}", f"--MODEL_NAME={base}"] if embedded else []) + [
        f"--SFT_DIR={folder}/sft_model", f"--RM_DIR={folder}/rm_model"]
    for stage in ("sft", "rm"):
        if finished(os.path.join(folder, f"{stage}_model")):
            print(f"bench_seeds: {folder}/{stage}_model is finished, reusing it", flush=True)
            continue
        cmd = [sys.executable, os.path.join(ROOT, f"train_{stage}.py"), *overrides, f"--SEED={seed}", *models,
               f"--RUNS_DIR={folder}/runs"]
        print(f"bench_seeds: {' '.join(cmd[1:])}", flush=True)
        run(cmd, os.path.join(folder, "logs", f"{stage}.log"))
    return models


def run_ppo(folder, seed, models, overrides):
    """scripts/pipeline.py with SEED=`seed` on the finished SFT and RM `models`: PPO, the
    in-distribution answers, the report; skipped when its report.json is newer than its PPO model.
    Returns the report."""
    reports, ppo = os.path.join(folder, "reports"), os.path.join(folder, "ppo_model")
    path = os.path.join(reports, "report.json")
    if finished(ppo) and is_current(path, os.path.join(ppo, STAGE_INFO_FILE)):
        print(f"bench_seeds: {path} is done, reusing it", flush=True)
    else:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "pipeline.py"), f"--reports={reports}", "--reuse=sft,rm", *overrides,
               f"--SEED={seed}", *models, f"--PPO_DIR={ppo}", f"--RUNS_DIR={folder}/runs"]
        print(f"bench_seeds: {' '.join(cmd[1:])}", flush=True)
        run(cmd, os.path.join(folder, "pipeline.log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_figures(report):
    """What a run's report.json gives the bench: {group: {"sft", "ppo", "gain"}} (means, None where
    missing), the groups' labels and sizes, and pass@k of sampled answers ({"sft_pass_at_8": ...})."""
    groups = report["pass_at_1"]["groups"]
    figures = {g: {k: (v[k] or {}).get("mean") for k in FIGURES} for g, v in groups.items()}
    sizes = {g: {"label": v["label"], **{k: {"tasks": v[k]["tasks"], "variants": v[k]["variants"]}
                                         for k in FIGURES if v[k]}} for g, v in groups.items()}
    sampled = {f"{stage}_{k}": v for stage in ("sft", "ppo") for k, v in report[stage].items()
               if k.startswith("pass_at_") and k[8:].isdigit() and k != "pass_at_1" and isinstance(v, float)}
    return figures, sizes, sampled


def spread(values):
    """{"runs", "mean", "std", "min", "max"} of the values that are not None (std: sample standard
    deviation, None for one value); None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"runs": len(values), "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarize(runs):
    """Mean and spread over the runs, per group and figure: SFT figures once per SFT seed (every PPO
    run of one SFT model shares them), PPO figures and the gain once per run; and for the gain, the
    spread between SFT seeds (std of their means over PPO seeds) beside the one within an SFT model
    (mean std over its PPO seeds). Returns {"<group>/<figure>": spread}."""
    first = {}  # the first run of each SFT seed: its SFT figures
    for r in runs:
        first.setdefault(r["sft_seed"], r)
    keys = list(dict.fromkeys(g for r in runs for g in r["figures"]))
    out = {}
    for group in keys:
        out[f"{group}/sft"] = spread([r["figures"].get(group, {}).get("sft") for r in first.values()])
        for figure in ("ppo", "gain"):
            out[f"{group}/{figure}"] = spread([r["figures"].get(group, {}).get(figure) for r in runs])
        by_seed = [spread([r["figures"].get(group, {}).get("gain") for r in runs if r["sft_seed"] == s]) for s in first]
        by_seed = [s for s in by_seed if s]
        if len(by_seed) > 1:
            out[f"{group}/gain"]["between_sft_seeds_std"] = statistics.stdev(s["mean"] for s in by_seed)
        if by_seed and all(s["std"] is not None for s in by_seed):
            out[f"{group}/gain"]["within_sft_seed_std"] = statistics.mean(s["std"] for s in by_seed)
    for key in dict.fromkeys(k for r in runs for k in r["sampled"]):
        chosen = first.values() if key.startswith("sft_") else runs
        out[f"sampled/{key}"] = spread([r["sampled"].get(key) for r in chosen])
    return out


def table_rows(summary, sizes):
    rows = []
    for key, s in summary.items():
        if s is None:
            continue
        group, figure = key.split("/")
        if group == "sampled":
            stage, k = figure.split("_pass_at_")
            label, what = "held-out", f"{stage.upper()} pass@{k} (sampled)"
        else:
            label = sizes.get(group, {}).get("label", group)
            size = sizes.get(group, {}).get(figure)
            label += f" ({size['tasks']} tasks, {size['variants']} variants)" if size else ""
            what = {"sft": "SFT pass@1", "ppo": "PPO pass@1", "gain": "PPO - SFT"}[figure]
        sign = "+" if figure == "gain" else ""
        std = "-" if s["std"] is None else f"{s['std']:.3f}"
        rows.append([label, what, s["runs"], f"{s['mean']:{sign}.3f}", std, f"{s['min']:{sign}.3f}",
                     f"{s['max']:{sign}.3f}"])
    return rows


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return None
    own, overrides = _common.own_options(argv, DEFAULTS)
    given = {o[2:].split("=", 1)[0].upper().replace("-", "_") for o in overrides if o.startswith("--")}
    if given & set(SET_HERE):
        raise UserError(f"--{sorted(given & set(SET_HERE))[0]} is set by the bench for each run: give the seeds as "
                        "--sft_seeds=42,1,2 --ppo_seeds=42,1,2 and the folder as --out=DIR")
    apply_overrides(overrides, quiet=True)  # a typo fails here, before hours of training
    try:
        sft_seeds, ppo_seeds = ([int(s) for s in own[k].split(",")] for k in ("sft_seeds", "ppo_seeds"))
    except ValueError:
        raise UserError(f"--sft_seeds and --ppo_seeds are comma lists of integers, not {own['sft_seeds']!r} / "
                        f"{own['ppo_seeds']!r}") from None
    out = os.path.abspath(own["out"])
    result = _common.header("python bench/bench_seeds.py " + " ".join(argv))
    result.update(out=out, sft_seeds=sft_seeds, ppo_seeds=ppo_seeds, overrides=overrides, runs=[])
    sizes = {}
    for sft_seed in sft_seeds:
        folder = os.path.join(out, f"sft_seed{sft_seed}")
        models = train_sft_and_rm(folder, sft_seed, overrides)
        for ppo_seed in ppo_seeds:
            run_folder = os.path.join(folder, f"ppo_seed{ppo_seed}")
            report = run_ppo(run_folder, ppo_seed, models, overrides)
            figures, run_sizes, sampled = run_figures(report)
            for group, size in run_sizes.items():
                sizes.setdefault(group, size)
            result["runs"].append({"sft_seed": sft_seed, "ppo_seed": ppo_seed, "folder": run_folder, "figures": figures,
                                   "sampled": sampled, "notes": report["pass_at_1"]["notes"], "machine": report["machine"],
                                   "created": report["created"], "seconds": report["seconds"]})
    result["summary"] = summarize(result["runs"])
    result["sizes"] = sizes
    result["load_average_1min_after"] = os.getloadavg()[0]
    rows = table_rows(result["summary"], sizes)
    print(f"\n{len(sft_seeds)} SFT seeds ({', '.join(map(str, sft_seeds))}) x {len(ppo_seeds)} PPO seeds "
          f"({', '.join(map(str, ppo_seeds))}) | {result['date']} | {result['machine']} | {result['versions']}")
    print("\n".join(_common.table(["tasks", "figure", "runs", "mean", "std", "min", "max"], rows)))
    for key, s in result["summary"].items():
        if s and "between_sft_seeds_std" in s and "within_sft_seed_std" in s:
            print(f"{key.split('/')[0]}: std of the gain between SFT seeds {s['between_sft_seeds_std']:.3f}, "
                  f"within an SFT model {s['within_sft_seed_std']:.3f}")
    notes = [n.replace(r["folder"], "<run>").replace(os.path.dirname(r["folder"]), "<sft seed>")
             for r in result["runs"] for n in r["notes"]]  # the same note of every run, once
    for note in dict.fromkeys(notes):
        print(f"note ({notes.count(note)} of {len(result['runs'])} runs): {note}")
    with open(os.path.join(out, "bench_seeds.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    _common.save_results("bench_seeds", result)
    return result


if __name__ == "__main__":
    from rlhf.common import run_stage

    run_stage(main)
