"""scripts/report.py: its plots (a smoothed trend over the raw curve, a log axis where the loss spans
decades), and greedy pass@1 with bootstrap intervals per task set and planted-habit group."""

import pytest

from scripts import report


@pytest.fixture
def axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_smoothing_removes_a_saw_tooth_and_keeps_the_trend():
    steps = list(range(60))
    saw = [10.0 - 0.1 * i + (1.0 if i % 2 else -1.0) for i in steps]  # falling trend, +-1 teeth
    smooth = report.smoothed(steps, saw)
    assert len(smooth) == len(saw)
    assert max(abs(s - (10.0 - 0.1 * i)) for i, s in zip(steps, smooth)) < 0.5  # on the trend, ends included
    assert max(abs(b - a) for a, b in zip(smooth, smooth[1:])) < 0.5  # the teeth (2.0 apart) are gone


def test_smoothing_follows_a_straight_line_exactly_and_fits_logs_on_a_log_axis():
    steps = list(range(1, 40))
    assert report.smoothed(steps, [3.0 - 0.05 * s for s in steps]) == pytest.approx([3.0 - 0.05 * s for s in steps])
    decay = [8.0 * 0.8 ** s for s in steps]  # a straight line in log space
    assert report.smoothed(steps, decay, log=True) == pytest.approx(decay)


def test_loss_spanning_decades_gets_a_log_axis_and_a_smoothed_line(axes):
    history = [{"step": s, "loss": 8.0 * 0.9 ** s} for s in range(1, 60)]  # 7.2 -> 0.01
    report.plot_lines(axes, history, [("loss", "train", "-")], "SFT loss", "nats", log_if_decades=True)
    assert axes.get_yscale() == "log"
    assert [line.get_label() for line in axes.get_lines()] == ["train (raw)", "train (smoothed)"]


def test_a_narrow_range_or_few_points_stay_as_they_are(axes):
    history = [{"step": s, "loss": 1.0 + 0.01 * s, "eval_loss": 2.0} for s in range(1, 6)]
    report.plot_lines(axes, history, [("loss", "train", "-"), ("eval_loss", "held-out", "o-")], "SFT loss", "nats",
                      log_if_decades=True)
    assert axes.get_yscale() == "linear"
    assert [line.get_label() for line in axes.get_lines()] == ["train", "held-out"]  # 5 points: nothing to smooth


# ---------------------------------------------------------------------------------------------
# pass@1 with intervals: the bootstrap, and the figures per task set and group
# ---------------------------------------------------------------------------------------------

def test_bootstrap_is_deterministic_with_a_seed_and_contains_the_estimate():
    values = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0]
    first = report.bootstrap_mean(values, seed=3)
    assert first == report.bootstrap_mean(values, seed=3)  # the report is the same every time
    mean, low, high = first
    assert mean == pytest.approx(0.5) and low < mean < high
    shares = [(7 * i % 11) / 10 for i in range(23)]  # pass shares of several answers per task: no ties in the quantiles
    assert report.bootstrap_mean(shares, seed=4) == report.bootstrap_mean(shares, seed=4)
    assert report.bootstrap_mean(shares, seed=4) != report.bootstrap_mean(shares, seed=5)  # the seed is what fixes it
    # about +-1.96 standard errors of a share (sqrt(0.25 / 20) = 0.112): the interval is a 95% one
    assert high - low == pytest.approx(2 * 1.96 * 0.112, rel=0.15)
    assert report.bootstrap_mean([]) is None


def test_bootstrap_interval_narrows_with_more_tasks():
    few = report.bootstrap_mean([1, 0, 1, 0] * 10)  # 40 tasks, pass@1 0.5
    many = report.bootstrap_mean([1, 0, 1, 0] * 100)  # 400 tasks, same pass@1
    assert few[0] == many[0] == 0.5
    assert (many[2] - many[1]) < 0.5 * (few[2] - few[1])  # 10x the tasks: about sqrt(10) = 3.2x narrower


def test_cluster_bootstrap_widens_the_interval_when_tasks_of_a_variant_agree():
    """Four rephrasings of each of 20 variants, passing or failing together: 80 tasks carry the
    information of 20, and drawing whole variants gives the interval of 20 tasks."""
    variants = [i % 2 for i in range(20)]
    values = [v for v in variants for _ in range(4)]
    clusters = [i for i in range(20) for _ in range(4)]
    tasks = report.bootstrap_mean(values)
    by_variant = report.bootstrap_mean(values, clusters=clusters)
    twenty = report.bootstrap_mean(variants)
    assert tasks[0] == by_variant[0] == 0.5
    assert (by_variant[2] - by_variant[1]) > 1.7 * (tasks[2] - tasks[1])  # about sqrt(4) = 2x wider
    assert by_variant[2] - by_variant[1] == pytest.approx(twenty[2] - twenty[1], rel=0.15)
    # every task its own cluster: the task-level interval
    assert report.bootstrap_mean(values, clusters=range(80)) == pytest.approx(tasks, abs=0.02)


def test_paired_gain_of_identical_answers_is_exactly_zero():
    passes = {f"f/{i}/x/en/t0": float(i % 3 == 0) for i in range(30)}
    gain = report.group_figures(passes, dict(passes), list(passes))["gain"]
    assert (gain["mean"], gain["low"], gain["high"]) == (0.0, 0.0, 0.0)
    # unpaired, the same two models would look uncertain: pairing is what removes the task-to-task spread
    sft = report.group_figures(passes, passes, list(passes))["sft"]
    assert sft["low"] < sft["mean"] < sft["high"]


def test_paired_gain_interval_is_narrower_than_the_models_own():
    """PPO passes what SFT passed plus a few more: the per-task differences vary far less than the
    pass/fail of the tasks themselves, so the paired interval is much narrower."""
    sft = {f"t{i}": float(i < 40) for i in range(100)}
    ppo = {t: float(v or i < 50) for i, (t, v) in enumerate(sft.items())}
    figures = report.group_figures(sft, ppo, list(sft))
    assert figures["gain"]["mean"] == pytest.approx(0.1)
    assert figures["gain"]["low"] > 0  # every change is a gain: the interval excludes 0
    assert figures["gain"]["high"] - figures["gain"]["low"] < 0.6 * (figures["ppo"]["high"] - figures["ppo"]["low"])


def test_variant_is_family_and_variant_of_the_task_id():
    assert report.variant_of("quick_sort/3/quicksort/zh/t0w1") == "quick_sort/3"
    assert report.variant_of("HumanEval/12") == "HumanEval/12"  # another shape: its own variant


def answers(path, tasks, passing):
    """An eval_results.jsonl as the stages write it: one greedy answer per task."""
    from conftest import write_jsonl

    write_jsonl(path, [{"task_id": t, "completion": "", "passed": t in passing, "status": "ok" if t in passing else "fail",
                        "detail": "", "pass_fraction": float(t in passing)} for t in tasks])


@pytest.fixture
def run_folders(tmp_path, monkeypatch):
    """Task files with `habit`, the stages' held-out answers and the pipeline's in-distribution ones."""
    import config as C
    from conftest import write_jsonl
    from rlhf.handoff import indist_answers_path

    def task(family, variant, k, habit):
        return {"task_id": f"{family}/{variant}/fn/en/t{k}", "family": family, "heldout_params": True, "habit": habit,
                "prompt": "p", "entry_point": "fn", "tests": [{"call": "fn()", "expected": "1"}]}

    held = [task("fizzbuzz", v, k, True) for v in (3, 4) for k in range(5)] + \
           [task("gcd_lcm", v, k, False) for v in (0, 1, 2) for k in range(10)]
    indist = [task("fizzbuzz", 0, k, True) for k in range(6)] + [task("gcd_lcm", 5, k, False) for k in range(6)]
    write_jsonl(tmp_path / "eval.jsonl", held)
    write_jsonl(tmp_path / "indist.jsonl", indist)
    for name, value in (("EVAL_TASKS_FILE", "eval.jsonl"), ("INDIST_TASKS_FILE", "indist.jsonl"), ("SFT_DIR", "sft"),
                        ("PPO_DIR", "ppo")):
        monkeypatch.setattr(C, name, str(tmp_path / value))
    ids = [t["task_id"] for t in held]
    habit, other = ids[:10], ids[10:]
    for stage, passing in (("sft", other[:15]), ("ppo", habit[:6] + other[:15])):  # PPO gains on habit tasks only
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "rlhf_stage.json").write_text("{}")
        answers(tmp_path / stage / "eval_results.jsonl", ids, set(passing))
    reports = tmp_path / "reports"
    reports.mkdir()
    indist_ids = [t["task_id"] for t in indist]
    answers(indist_answers_path(str(reports), "sft"), indist_ids, set(indist_ids[:9]))
    answers(indist_answers_path(str(reports), "ppo"), indist_ids, set(indist_ids[:10]))
    return tmp_path, str(reports)


def test_figures_per_task_set_and_planted_habit_group(run_folders):
    _, reports = run_folders
    out = report.pass_at_1_with_intervals(reports)
    groups = out["groups"]
    assert list(groups) == ["held_out", "held_out_habit", "held_out_other", "in_distribution", "in_distribution_habit",
                            "in_distribution_other"]
    assert out["notes"] == []
    held, habit, other = groups["held_out"], groups["held_out_habit"], groups["held_out_other"]
    assert (held["sft"]["mean"], held["ppo"]["mean"]) == (pytest.approx(15 / 40), pytest.approx(21 / 40))
    assert (held["sft"]["tasks"], held["sft"]["variants"]) == (40, 5)
    assert (habit["gain"]["tasks"], habit["gain"]["variants"], other["gain"]["variants"]) == (10, 2, 3)
    assert habit["gain"]["mean"] == pytest.approx(0.6) and habit["gain"]["low"] > 0
    assert (other["gain"]["mean"], other["gain"]["low"], other["gain"]["high"]) == (0.0, 0.0, 0.0)  # no change there
    ind = groups["in_distribution"]
    assert (ind["sft"]["mean"], ind["gain"]["mean"], ind["gain"]["tasks"]) == (0.75, pytest.approx(1 / 12), 12)
    assert groups["in_distribution_habit"]["sft"]["mean"] == 1.0  # the first 6 are the habit family's
    # the held-out figure holds no in-distribution task
    assert held["sft"]["tasks"] + ind["sft"]["tasks"] == 52


def test_missing_or_stale_answers_and_no_habit_field_are_said(run_folders):
    import json
    import os
    import time

    import config as C

    tmp_path, reports = run_folders
    os.remove(tmp_path / "ppo" / "eval_results.jsonl")
    rows = [json.loads(line) for line in open(C.EVAL_TASKS_FILE)]
    with open(C.EVAL_TASKS_FILE, "w") as f:  # a task file of the old schema: no `habit`
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "habit"}) + "\n" for r in rows)
    later = time.time() + 10  # the SFT model was trained again after its in-distribution answers
    os.utime(tmp_path / "sft" / "rlhf_stage.json", (later, later))
    out = report.pass_at_1_with_intervals(reports)
    assert list(out["groups"]) == ["held_out", "in_distribution", "in_distribution_habit", "in_distribution_other"]
    held = out["groups"]["held_out"]
    assert held["sft"]["tasks"] == 40 and held["ppo"] is None and held["gain"] is None
    assert out["groups"]["in_distribution"]["sft"] is None and out["groups"]["in_distribution"]["ppo"]["tasks"] == 12
    notes = "\n".join(out["notes"])
    assert f"no held-out PPO answers: {tmp_path / 'ppo' / 'eval_results.jsonl'} does not exist" in notes
    assert f"no planted-habit split of the held-out tasks: {C.EVAL_TASKS_FILE} has no `habit` field" in notes
    assert "indist_sft.jsonl is older than" in notes and "scripts/evaluate.py --model" in notes
    lines = report.interval_lines(out)
    assert "| held-out: all | 0.375 [" in "\n".join(lines) and "| n/a | n/a | 40, 5 |" in "\n".join(lines)
    assert any(line.startswith("- no held-out PPO answers") for line in lines)


def test_no_in_distribution_file_is_said_and_leaves_the_held_out_figures(run_folders, monkeypatch):
    import config as C

    tmp_path, reports = run_folders
    monkeypatch.setattr(C, "INDIST_TASKS_FILE", str(tmp_path / "none.jsonl"))
    out = report.pass_at_1_with_intervals(reports)
    assert [k for k in out["groups"] if k.startswith("in_distribution")] == []
    assert out["notes"] == [f"no in-distribution figures: INDIST_TASKS_FILE {tmp_path / 'none.jsonl'} does not exist"]
    assert out["groups"]["held_out"]["gain"]["tasks"] == 40


def test_answers_to_another_task_file_give_no_figure(run_folders, monkeypatch):
    import config as C
    from conftest import write_jsonl

    tmp_path, reports = run_folders
    write_jsonl(tmp_path / "val.jsonl", [{"task_id": "other/0/fn/en/t0", "prompt": "p", "entry_point": "fn", "tests": []}])
    monkeypatch.setattr(C, "EVAL_TASKS_FILE", str(tmp_path / "val.jsonl"))
    out = report.pass_at_1_with_intervals(reports)
    assert out["groups"]["held_out"]["sft"] is None
    assert any("answers none of the tasks of" in n and "--EVAL_TASKS_FILE=" in n for n in out["notes"])


def test_answers_to_tasks_the_file_no_longer_has_are_left_out_and_said(run_folders):
    import config as C
    from conftest import write_jsonl
    from rlhf.data import read_jsonl

    _, reports = run_folders
    rows = read_jsonl(C.EVAL_TASKS_FILE)[:30]
    write_jsonl(C.EVAL_TASKS_FILE, [{k: v for k, v in r.items() if k != "_line"} for r in rows])  # data rebuilt smaller
    out = report.pass_at_1_with_intervals(reports)
    assert out["groups"]["held_out"]["gain"]["tasks"] == 30
    assert any(n.startswith("held-out SFT: 10 answers of") and "left out" in n for n in out["notes"])


def test_report_md_gives_the_rm_accuracy_by_pair_kind():
    intervals = {"level": 0.95, "resamples": 10, "seed": 0, "groups": {}, "files": {}, "notes": []}
    base = {"created": "now", "machine": {"platform": "linux", "cpus": 2}, "versions": {}, "missing": [], "settings": {},
            "sft": {}, "ppo": {}, "seconds": {}, "pass_at_1": intervals}
    rm = {"eval_accuracy": 0.8, "eval_accuracy_buggy": 0.9, "eval_pairs_buggy": 215}
    md = report.markdown(dict(base, rm=rm), [])
    assert "| accuracy on pairs of a correct and a buggy program | 0.900 (215 pairs) |" in md
    assert "only the prompt decides (`wrong_value`) | n/a (none of the held-out pairs) |" in md
    md = report.markdown(dict(base, rm={"eval_accuracy": 0.8}), [])  # an eval file without `bug`
    assert md.count("| n/a (not recorded: RM_EVAL_FILE gives no `bug`) |") == 2
