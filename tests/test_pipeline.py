"""scripts/pipeline.py end to end on tiny models (one short run of each stage), its reuse and
--redo logic, a failing stage; scripts/generate.py on the tiny model."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script, write_jsonl


@pytest.fixture(scope="module")
def pipeline_args(tiny_base, toy_data, toy_pairs, tmp_path_factory):
    """Overrides that point every stage at tiny inputs and every output at a temporary folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    rows = [{"task_id": f"t{k}", "lang": "en", "prompt": [{"role": "user", "content": f"Write add_{k}(x) returning x plus {k}."}],
             "entry_point": f"add_{k}", "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}],
             "solution": f"def add_{k}(x):\n    return x + {k}"} for k in range(1, 9)]
    prompts = write_jsonl(folder / "ppo.jsonl", rows)
    tasks = [dict(r, prompt=r["prompt"][0]["content"], habit=k % 2 == 0) for k, r in enumerate(rows)]
    indist = write_jsonl(folder / "indist.jsonl", tasks[3:6])  # in-distribution: tasks PPO was prompted with
    tasks = write_jsonl(folder / "tasks.jsonl", tasks[:3])
    args = [f"--reports={folder / 'reports'}", f"--MODEL_NAME={tiny_base}", f"--RUNS_DIR={folder / 'runs'}",
            f"--SFT_DIR={folder / 'sft_model'}", f"--RM_DIR={folder / 'rm_model'}", f"--PPO_DIR={folder / 'ppo_model'}",
            f"--SFT_TRAIN_FILE={toy_data['sft_train']}", f"--SFT_EVAL_FILE={toy_data['sft_eval']}",
            f"--RM_TRAIN_FILE={toy_pairs['rm_train']}", f"--RM_EVAL_FILE={toy_pairs['rm_eval']}",
            f"--PPO_PROMPTS_FILE={prompts}", f"--EVAL_TASKS_FILE={tasks}", f"--RM_ONPOLICY_PROMPTS_FILE={tasks}",
            f"--INDIST_TASKS_FILE={indist}",
            "--RM_ONPOLICY_SAMPLES=1",
            "--EPOCHS=1", "--BATCH_SIZE=8", "--LOG_EVERY=2", "--MAX_LEN=128", "--RM_MAX_LEN=128", "--RM_BATCH_SIZE=8",
            "--PPO_STEPS=2", "--PPO_BATCH_SIZE=4", "--PPO_MINI_BATCH_SIZE=2", "--PPO_EPOCHS=1", "--PPO_RESPONSE_LEN=8",
            "--GEN_MAX_NEW_TOKENS=8", "--PPO_EVAL_EVERY=1", "--PPO_SAVE_EVERY=0", "--REPORT_TO=none"]
    return folder, args


@pytest.fixture(scope="module")
def first_run(pipeline_args):
    folder, args = pipeline_args
    proc = run_script("scripts/pipeline.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder, args, proc


def finished_at(folder, stage):
    return json.load(open(folder / f"{stage}_model" / "rlhf_stage.json"))["finished_at"]


def test_pipeline_runs_every_stage_and_reports(first_run):
    folder, _, proc = first_run
    reports = folder / "reports"
    report = json.load(open(reports / "report.json"))
    for stage, keys in {"sft": ("eval_perplexity", "eval_token_accuracy", "pass_at_1"), "rm": ("eval_accuracy", "eval_f1"),
                        "ppo": ("pass_at_1", "kl", "reward_mean")}.items():
        for key in keys:
            assert isinstance(report[stage][key], float), (stage, key, report[stage].get(key))
        assert report["seconds"][stage] > 0
        assert report["settings"][stage]["PPO_STEPS"] == 2  # the settings the stage ran with
    assert report["missing"] == [] and report["versions"]["torch"]
    # the RM checked against the tests where the SFT model failed (its answers: sft_model/eval_results.jsonl)
    answers = [json.loads(line) for line in open(folder / "sft_model" / "eval_results.jsonl")]
    assert len(answers) == 3 and all({"task_id", "passed", "raw"} <= set(a) for a in answers)
    assert report["rm"]["heldout_test_failures"] == sum(not a["passed"] for a in answers) >= 1
    assert 0.0 <= report["rm"]["heldout_test_agreement"] <= 1.0
    assert "agrees with the tests" in (reports / "report.md").read_text()
    # pass@8 of 8 answers sampled per task (EVAL_SAMPLES), after SFT and after PPO
    assert all(0.0 <= report[stage]["pass_at_8"] <= 1.0 for stage in ("sft", "ppo"))
    assert "| pass@8 (8 answers sampled at temperature 1) |" in (reports / "report.md").read_text()
    assert "## SFT versus PPO" in (reports / "report.md").read_text()
    # the seed's natural prompts (data/seed_prompts.jsonl), 10 answers each at temperature 0.7
    for stage in ("sft", "ppo"):
        passes = report[stage]["seed_prompt_passes"]
        assert set(passes) >= {"用Python实现快速排序算法", "用Python实现二叉树遍历"}, passes
        assert report[stage]["seed_prompt_samples"] == 10 and all(0 <= n <= 10 for n in passes.values())
    assert "| \"用Python实现快速排序算法\": answers passing" in (reports / "report.md").read_text()
    for png in ("sft_loss.png", "rm_accuracy.png", "ppo_training.png"):
        assert (reports / png).stat().st_size > 10_000, png  # an empty figure is a few kB
    # greedy pass@1 with intervals: held-out from the SFT stage's answers, in-distribution from the
    # pipeline's own evaluation of both models (one answer per task), each split by planted habit
    groups = report["pass_at_1"]["groups"]
    sft_answers = {a["task_id"]: a["passed"] for a in answers}
    assert groups["held_out"]["sft"]["mean"] == pytest.approx(sum(sft_answers.values()) / 3) == report["sft"]["pass_at_1"]
    assert groups["held_out_habit"]["sft"]["tasks"] == 2 and groups["held_out_other"]["sft"]["tasks"] == 1  # t1, t3 | t2
    for stage in ("sft", "ppo"):
        indist = [json.loads(line) for line in open(reports / f"indist_{stage}.jsonl")]
        assert sorted(a["task_id"] for a in indist) == ["t4", "t5", "t6"]
        assert groups["in_distribution"][stage]["mean"] == pytest.approx(sum(a["passed"] for a in indist) / 3)
        assert groups["in_distribution"][stage]["tasks"] == 3
    assert groups["in_distribution"]["gain"]["tasks"] == 3
    assert "| in-distribution: planted-habit families |" in (reports / "report.md").read_text()
    assert "pipeline: sft in-distribution: " in proc.stdout and (reports / "logs" / "indist_ppo.log").exists()
    timings = json.load(open(reports / "timings.json"))
    assert set(timings) == {"sft", "rm", "ppo"} and all(t["source"] == "pipeline" for t in timings.values())
    for stage in ("sft", "rm", "ppo"):  # the log file holds the stage's own output
        assert f"{stage} done" in (reports / "logs" / f"{stage}.log").read_text()
    assert "ppo step 2/2" in proc.stdout  # streamed to the terminal too


def test_second_run_reuses_every_stage(first_run):
    folder, args, _ = first_run
    before = {s: finished_at(folder, s) for s in ("sft", "rm", "ppo")}
    seconds = json.load(open(folder / "reports" / "timings.json"))
    proc = run_script("scripts/pipeline.py", *args, "--PPO_KL_COEF=0.1", "--reuse", "ppo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppo: note: " in proc.stdout and "PPO_KL_COEF=0.05, not 0.1; reused as --reuse asks" in proc.stdout
    assert "sft: note" not in proc.stdout and "rm: note" not in proc.stdout  # a PPO setting concerns PPO only
    for stage in ("sft", "rm", "ppo"):
        assert f"{stage}: {folder / (stage + '_model')} is finished, reusing it (--redo {stage} to train again)" in proc.stdout
        assert finished_at(folder, stage) == before[stage]
    for stage in ("sft", "ppo"):  # and their in-distribution answers
        assert f"{stage}: {folder / 'reports' / f'indist_{stage}.jsonl'} answers " in proc.stdout
    assert "in-distribution: " not in proc.stdout
    assert json.load(open(folder / "reports" / "timings.json")) == seconds  # earlier times kept


def test_redo_ppo_retrains_only_ppo(first_run):
    folder, args, _ = first_run
    before = {s: finished_at(folder, s) for s in ("sft", "rm", "ppo")}
    time.sleep(1.1)  # finished_at has a resolution of one second
    proc = run_script("scripts/pipeline.py", *args, "--redo", "ppo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft: " in proc.stdout and "rm: " in proc.stdout and "ppo step 2/2" in proc.stdout
    assert "reusing it (--redo sft" in proc.stdout and "reusing it (--redo rm" in proc.stdout
    assert "reusing it (--redo ppo" not in proc.stdout
    assert finished_at(folder, "sft") == before["sft"] and finished_at(folder, "rm") == before["rm"]
    assert finished_at(folder, "ppo") != before["ppo"]
    # the new PPO model answers the in-distribution tasks again, the SFT model's answers are kept
    assert "pipeline: ppo in-distribution: " in proc.stdout and "pipeline: sft in-distribution" not in proc.stdout
    assert json.load(open(folder / "reports" / "report.json"))["ppo"]["finished_at"] == finished_at(folder, "ppo")


def test_pipeline_dpo_runs_after_the_others_and_is_reported_beside_sft_and_ppo(first_run):
    """--PIPELINE_DPO=true: SFT, RM and PPO are reused, DPO trains from the SFT model, answers the
    in-distribution tasks, and the report puts it beside SFT and PPO (pass@1 with its interval,
    pass@8, seed prompts, minutes); without the setting it is neither run nor asked for."""
    folder, args, _ = first_run
    dpo = [f"--DPO_DIR={folder / 'dpo_model'}", "--DPO_BATCH_SIZE=8"]
    proc = run_script("scripts/pipeline.py", *args, "--redo", "dpo")
    assert proc.returncode == 2 and "DPO is not part of this run; add --PIPELINE_DPO=true" in proc.stderr
    proc = run_script("scripts/pipeline.py", *args, *dpo, "--PIPELINE_DPO=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert f"{stage}: {folder / (stage + '_model')} is finished, reusing it" in proc.stdout
    assert "pipeline: dpo: python train_dpo.py" in proc.stdout and "dpo done" in proc.stdout
    reports = folder / "reports"
    report = json.load(open(reports / "report.json"))
    assert report["dpo"]["pass_at_1"] is not None and 0.0 <= report["dpo"]["pass_at_8"] <= 1.0
    assert report["dpo"]["seed_prompt_samples"] == 10 and report["seconds"]["dpo"] > 0 and report["missing"] == []
    groups = report["pass_at_1"]["groups"]
    answers = [json.loads(line) for line in open(folder / "dpo_model" / "eval_results.jsonl")]
    assert groups["held_out"]["dpo"]["mean"] == pytest.approx(sum(a["passed"] for a in answers) / 3)
    assert groups["held_out"]["dpo_gain"]["tasks"] == 3 and groups["in_distribution"]["dpo"]["tasks"] == 3
    assert sorted(json.loads(line)["task_id"] for line in open(reports / "indist_dpo.jsonl")) == ["t4", "t5", "t6"]
    md = (reports / "report.md").read_text()
    assert "## SFT, DPO and PPO (held-out code tasks)" in md and "| metric | SFT | DPO | PPO |" in md
    assert "| tasks | SFT | PPO | PPO - SFT (paired) | DPO | DPO - SFT (paired) | tasks, variants |" in md
    assert "| wall time of the stage |" in md and "| dpo |" in md and "DPO: offline (fixed pairs), loss sigmoid" in md
    # the next run without the setting: DPO is not reported, not missing
    proc = run_script("scripts/pipeline.py", *args, f"--DPO_DIR={folder / 'no_dpo'}")
    assert proc.returncode == 0 and "train_dpo.py" not in proc.stdout
    report = json.load(open(reports / "report.json"))
    assert "dpo" not in report and report["missing"] == [] and "## SFT versus PPO" in (reports / "report.md").read_text()


def test_failing_stage_stops_the_pipeline_with_its_error(first_run, tmp_path):
    folder, args, _ = first_run
    # SFT is reused; RM fails on a missing data file; PPO must not start
    args = [a for a in args if not a.startswith(("--RM_DIR=", "--PPO_DIR=", "--RM_TRAIN_FILE=", "--reports="))]
    proc = run_script("scripts/pipeline.py", *args, f"--RM_DIR={tmp_path / 'rm'}", f"--PPO_DIR={tmp_path / 'ppo'}",
                      f"--RM_TRAIN_FILE={tmp_path / 'missing.jsonl'}", f"--reports={tmp_path / 'reports'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data file") and "missing.jsonl not found" in last
    assert "stopped at rm" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert "missing.jsonl not found" in (tmp_path / "reports" / "logs" / "rm.log").read_text()
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "reports" / "logs" / "ppo.log").exists()


def test_report_alone_marks_missing_stages(tmp_path):
    proc = run_script("scripts/report.py", f"--reports={tmp_path}", f"--SFT_DIR={tmp_path / 'a'}",
                      f"--RM_DIR={tmp_path / 'b'}", f"--PPO_DIR={tmp_path / 'c'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["missing"] == ["sft", "rm", "ppo"] and report["sft"]["missing"] is True
    assert "**ppo: missing**" in (tmp_path / "report.md").read_text()


def test_generate_prints_an_answer(tiny_base):
    proc = run_script("scripts/generate.py", "--model", tiny_base, "--max-new-tokens=8", "用Python实现快速排序算法")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()  # the untrained tiny model says something, never nothing
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), "--model", tiny_base,
                           "--max-new-tokens=8", "--interactive"], input="first\nsecond\nexit\nnever read\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()  # answers to the prompts before `exit`


def test_generate_missing_model_is_one_line(tmp_path):
    proc = run_script("scripts/generate.py", "--model", str(tmp_path / "ppo_model"), "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is not a model folder" in proc.stderr


def test_pipeline_refuses_a_value_out_of_range_before_any_work(tmp_path):
    proc = run_script("scripts/pipeline.py", f"--reports={tmp_path / 'reports'}", "--WARMUP_RATIO=2")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: WARMUP_RATIO must be in [0, 1), not 2.0 (config.py or --WARMUP_RATIO=...)"
    assert os.listdir(tmp_path) == []  # no reports folder, no data built, nothing trained


# ---------------------------------------------------------------------------------------------
# What a run after a finished one does: reuse, or one line naming --redo / --reuse (no training:
# the stages are rlhf_stage.json files written here, the pipeline runs with --dry-run or stops)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def finished_stages(tmp_path):
    """Three finished stage folders made with config.py's settings from MODEL_NAME `made_from`, the
    RM on that SFT model; returns (overrides that point the pipeline at them, folders)."""
    from rlhf.settings import scalar_settings

    def make(made_from="./base_model", sft_finished="T1"):
        folders = {s: str(tmp_path / f"{s}_model") for s in ("sft", "rm", "ppo")}
        for stage, folder in folders.items():
            os.makedirs(folder, exist_ok=True)
            inputs = {"sft": {"path": folders["sft"], "finished_at": "T1"}} if stage != "sft" else {}
            info = {"stage": stage, "finished_at": sft_finished if stage == "sft" else "T1", "base_model": made_from,
                    "metrics": {}, "settings": dict(scalar_settings(), MODEL_NAME=made_from), "inputs": inputs}
            with open(os.path.join(folder, "rlhf_stage.json"), "w") as f:
                json.dump(info, f)
        args = [f"--SFT_DIR={folders['sft']}", f"--RM_DIR={folders['rm']}", f"--PPO_DIR={folders['ppo']}",
                f"--reports={tmp_path / 'reports'}"]
        return args, folders

    return make


def test_a_setting_that_changes_a_finished_stage_stops_the_run_naming_redo_and_reuse(finished_stages, run_in_process):
    args, folders = finished_stages()
    proc = run_in_process("scripts/pipeline.py", *args, "--PPO_STEPS=5", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: ppo: {folders['ppo']} was made with PPO_STEPS=30, this run gives PPO_STEPS=5: add --redo ppo to train "
        "it (and the stages after it) again, or --reuse ppo to keep it as it is")
    proc = run_in_process("scripts/pipeline.py", *args, "--PPO_STEPS=5", "--redo", "ppo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"sft: {folders['sft']} is finished, reusing it" in proc.stdout and "rm: " in proc.stdout
    assert f"ppo: would train {folders['ppo']}: python train_ppo.py " in proc.stdout
    proc = run_in_process("scripts/pipeline.py", *args, "--PPO_STEPS=5", "--reuse", "ppo", "--dry-run")
    assert proc.returncode == 0 and "would train" not in proc.stdout
    assert f"ppo: note: {folders['ppo']} was made with PPO_STEPS=30, not 5; reused as --reuse asks" in proc.stdout
    # a setting of SFT's is reported at SFT, whose redo redoes the rest; memory and logging settings change nothing
    proc = run_in_process("scripts/pipeline.py", *args, "--LR=1e-4", "--dry-run")
    assert proc.returncode == 2 and f"error: sft: {folders['sft']} was made with LR=0.001" in proc.stderr
    assert "add --redo sft" in proc.stderr
    proc = run_in_process("scripts/pipeline.py", *args, "--GEN_BATCH_SIZE=8", "--REPORT_TO=none", "--dry-run")
    assert proc.returncode == 0 and "would train" not in proc.stdout, proc.stderr


def test_a_finished_stage_of_another_model_or_recipe_is_never_reused(finished_stages, run_in_process, tmp_path):
    args, folders = finished_stages()
    proc = run_in_process("scripts/pipeline.py", *args, "--MODEL_NAME=Qwen/Qwen2.5-Coder-1.5B-Instruct", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: sft: {folders['sft']} was trained from MODEL_NAME='./base_model', this run gives "
        "'Qwen/Qwen2.5-Coder-1.5B-Instruct': add --redo sft to train it (and the stages after it) again, or give this "
        "run its own SFT_DIR, RM_DIR, PPO_DIR")
    proc = run_in_process("scripts/pipeline.py", *args, "--MODEL_NAME=Qwen/Qwen2.5-Coder-1.5B-Instruct", "--reuse", "all",
                          "--dry-run")
    assert proc.returncode == 2  # --reuse keeps settings, never another model
    proc = run_in_process("scripts/pipeline.py", *args, "--MODEL_NAME=Qwen/Qwen2.5-Coder-1.5B-Instruct", "--redo", "all",
                          "--dry-run")
    assert proc.returncode == 0 and proc.stdout.count("would train") == 3
    # the embedded model's learning rates would reach the pretrained model: said for each stage
    assert "sft: note: LR=0.001 is the embedded model's learning rate (config.py), not one for Qwen/" in proc.stdout
    assert "rm: note: RM_LR=0.001" in proc.stdout and "ppo: note: PPO_LR=5e-05" in proc.stdout
    recipe = tmp_path / "r.py"
    recipe.write_text("PPO_STEPS = 30\n")
    proc = run_in_process("scripts/pipeline.py", *args, f"--RECIPE={recipe}", "--dry-run")
    assert proc.returncode == 2 and f"sft: {folders['sft']} was made with RECIPE='', this run gives '{recipe}'" in proc.stderr


def test_without_model_name_the_run_builds_on_the_finished_sft_model(finished_stages, run_in_process):
    args, folders = finished_stages(made_from="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    proc = run_in_process("scripts/pipeline.py", *args, "--redo", "ppo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "ppo: note: PPO_LR=5e-05 is the embedded model's learning rate (config.py), not one for Qwen/" in proc.stdout
    assert "sft: note" not in proc.stdout  # SFT is reused, not trained


def test_an_rm_trained_on_an_earlier_sft_model_is_not_reused(finished_stages, run_in_process):
    args, folders = finished_stages(sft_finished="T2")  # SFT trained again (by hand) after the RM
    proc = run_in_process("scripts/pipeline.py", *args, "--dry-run")
    assert proc.returncode == 2
    assert f"rm: {folders['rm']} was trained on an SFT model finished at T1, {folders['sft']} was finished at T2: " \
           "add --redo rm" in proc.stderr


def test_dpo_is_trained_again_with_the_sft_model_it_builds_on_not_with_ppo(finished_stages, run_in_process, tmp_path):
    """DPO builds on SFT alone: --redo ppo keeps a finished DPO, --redo sft trains it again (after
    RM and PPO, which build on SFT too); without PIPELINE_DPO it is not planned at all."""
    args, folders = finished_stages()
    dpo = tmp_path / "dpo_model"
    dpo.mkdir()
    with open(folders["ppo"] + "/rlhf_stage.json") as f:
        info = dict(json.load(f), stage="dpo")
    with open(dpo / "rlhf_stage.json", "w") as f:
        json.dump(info, f)
    args += [f"--DPO_DIR={dpo}", "--PIPELINE_DPO=true", "--dry-run"]
    proc = run_in_process("scripts/pipeline.py", *args, "--redo", "ppo")
    assert proc.returncode == 0, proc.stderr
    assert f"dpo: {dpo} is finished, reusing it" in proc.stdout and "ppo: would train" in proc.stdout
    assert "dpo: would train" not in proc.stdout
    proc = run_in_process("scripts/pipeline.py", *args, "--redo", "sft")
    assert proc.returncode == 0, proc.stderr
    assert "dpo: sft is trained again, so dpo is trained again too" in proc.stdout
    assert "dpo: would train" in proc.stdout and "python train_dpo.py" in proc.stdout
    proc = run_in_process("scripts/pipeline.py", *args[:-3], "--dry-run")
    assert proc.returncode == 0 and "dpo:" not in proc.stdout and "train_dpo.py" not in proc.stdout


def test_dry_run_prints_the_recipe_settings_and_accelerate_commands_and_writes_nothing(tmp_path):
    out = tmp_path / "reports"
    proc = run_script("scripts/pipeline.py", "--RECIPE=recipes/qwen2.5-coder-7b-zero3.py", "--dry-run", f"--reports={out}",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "pipeline: dry run: nothing is built, trained or written"
    assert "  MODEL_NAME = 'Qwen/Qwen2.5-Coder-7B-Instruct'  (recipes/qwen2.5-coder-7b-zero3.py)" in lines
    assert "  PPO_RESPONSE_LEN = 512  (recipes/qwen2.5-coder-7b-zero3.py)" in lines
    recipe = "--RECIPE=recipes/qwen2.5-coder-7b-zero3.py"
    assert (f"sft: would train ./qwen7b_sft: accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml "
            f"--num_processes 8 train_sft.py {recipe}") in lines
    assert (f"ppo: would train ./qwen7b_ppo: accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml "
            f"--num_processes 8 train_ppo.py {recipe}") in lines
    assert f"report: python scripts/report.py --reports={out} {recipe}" in lines
    assert "note: LR" not in proc.stdout  # the recipe sets every learning rate
    assert os.listdir(tmp_path) == []
    # SFT and RM refuse sharded weights: a config that shards them is one line before any work
    proc = run_script("scripts/pipeline.py", "--accelerate-config", "accelerate_configs/deepspeed_zero3.yaml", "--dry-run",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "shards the weights (DEEPSPEED), which train_sft.py refuses" in proc.stderr
