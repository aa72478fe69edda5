"""The report of a pipeline run: reads the three stage folders (their rlhf_stage.json) and
<reports>/timings.json, writes <reports>/report.json (metrics, timings, settings, machine),
<reports>/report.md (SFT versus PPO, the reward model, timings) and PNG plots of training.
A stage that has not run is reported as missing.

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
from rlhf.handoff import machine, read_stage_info
from rlhf.settings import apply_overrides, tool_help

STAGES = [("sft", "SFT_DIR"), ("rm", "RM_DIR"), ("ppo", "PPO_DIR")]
REQUIRED = {  # keys report.json always has (None when the stage did not record them)
    "sft": ("eval_perplexity", "eval_token_accuracy", "pass_at_1"),
    "rm": ("eval_accuracy", "eval_f1", "heldout_test_agreement"),
    "ppo": ("pass_at_1", "kl", "reward_mean"),
}
LANGS = ("zh", "en")  # per-language pass@1 is shown when a stage recorded pass_at_1_<lang>
KEPT_DICTS = ("seed_prompt_passes",)  # small dicts report.json keeps (histories and logs stay out)


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


def build_report(infos, timings):
    report = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "machine": ran_on(infos),
              "versions": versions(), "seconds": {}, "settings": {}, "missing": []}
    for name, setting in STAGES:
        info = infos[name]
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

    lines += ["## SFT versus PPO (held-out code tasks)", "", "| metric | SFT | PPO |", "|---|---|---|"]
    sft_pass = sft.get("pass_at_1") if not sft.get("missing") else ppo.get("sft_pass_at_1")
    lines.append(f"| pass@1 (greedy, sandboxed tests) | {fmt(sft_pass)} | {fmt(ppo.get('pass_at_1'))} |")
    for key in sorted({k for stage in (sft, ppo) for k in stage if k.startswith("pass_at_") and k[8:].isdigit()} - {"pass_at_1"}):
        lines.append(f"| pass@{key[8:]} ({key[8:]} answers sampled at temperature 1) | {fmt(sft.get(key))} | {fmt(ppo.get(key))} |")
    for lang in LANGS:
        a, b = sft.get(f"pass_at_1_{lang}"), ppo.get(f"pass_at_1_{lang}")
        if a is not None or b is not None:
            lines.append(f"| pass@1 {lang} | {fmt(a)} | {fmt(b)} |")
    lines.append(f"| RM score (normalised; 0 = boundary preferred/rejected) | {fmt(ppo.get('sft_rm_score'))} | "
                 f"{fmt(ppo.get('rm_score'))} |")
    lines.append(f"| response length (tokens, sampled rollouts) | {fmt(ppo.get('first_step_response_length'), 1)} | "
                 f"{fmt(ppo.get('response_length'), 1)} |")
    prompts = list(dict.fromkeys(p for stage in (sft, ppo) for p in stage.get("seed_prompt_passes") or {}))
    for prompt in prompts:  # the natural prompts, sampled as a user's generate call samples them
        counts = [f"{stage['seed_prompt_passes'][prompt]}/{stage['seed_prompt_samples']}"
                  if prompt in (stage.get("seed_prompt_passes") or {}) else "-" for stage in (sft, ppo)]
        lines.append(f"| \"{prompt}\": answers passing (temperature 0.7, top_p 0.95, top_k 50) | {counts[0]} | {counts[1]} |")
    lines += ["", "SFT column: pass@1 from the SFT stage; RM score from PPO's evaluation before its first update "
              "(the SFT model); response length of PPO's first rollout batch. PPO column: final evaluation; "
              "response length averaged over the last 5 PPO steps.", ""]
    if not sft.get("missing"):
        lines += [f"SFT held-out: perplexity {fmt(sft.get('eval_perplexity'), 2)}, token accuracy "
                  f"{fmt(sft.get('eval_token_accuracy'))}, train tokens {fmt(sft.get('train_tokens'))}.", ""]
    if not ppo.get("missing"):
        lines += [f"PPO: KL to the SFT model {fmt(ppo.get('kl'))} nats per response, total reward "
                  f"{fmt(ppo.get('reward_mean'))}, {fmt(ppo.get('episodes_per_second'), 2)} episodes/s, peak memory "
                  f"{fmt(ppo.get('peak_rss_mib'), 0)} MiB (last 5 steps for KL and reward).", ""]

    lines += ["## Reward model (held-out preference pairs)", "", "| metric | value |", "|---|---|"]
    for key, label in (("eval_accuracy", "accuracy (chosen scored above rejected)"), ("eval_f1", "F1 (one threshold)"),
                       ("eval_margin", "margin (chosen - rejected score)"), ("train_accuracy", "train accuracy"),
                       ("eval_pairs", "held-out pairs"),
                       ("heldout_test_agreement", "agrees with the tests: reference above the SFT model's failed "
                                                  "answer, held-out tasks"),
                       ("heldout_test_failures", "failed SFT answers checked"),
                       ("onpolicy_pairs", "on-policy training pairs (the SFT model's failing answers)")):
        lines.append(f"| {label} | {fmt(rm.get(key))} |")
    lines += ["", "## Time", "", "| stage | wall time |", "|---|---|"]
    for name, _ in STAGES:
        lines.append(f"| {name} | {fmt_seconds(report['seconds'].get(name))} |")
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
                                 epilog=tool_help(__file__, *(setting for _, setting in STAGES), overrides=True))
    ap.add_argument("--reports", default="reports", metavar="DIR", help="output folder (and where timings.json is)")
    args, overrides = ap.parse_known_args(argv)
    apply_overrides(overrides, quiet=True)
    infos = {name: read_stage_info(getattr(C, setting)) for name, setting in STAGES}
    timings_path = os.path.join(args.reports, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    os.makedirs(args.reports, exist_ok=True)
    report = build_report(infos, timings)
    plots = make_plots(infos, args.reports)
    with open(os.path.join(args.reports, "report.json"), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    with open(os.path.join(args.reports, "report.md"), "w") as f:
        f.write(markdown(report, plots))
    missing = f" | missing: {', '.join(report['missing'])}" if report["missing"] else ""
    print(f"report: {os.path.join(args.reports, 'report.md')}, report.json and {len(plots)} plot(s){missing}")


if __name__ == "__main__":
    run_stage(main)
