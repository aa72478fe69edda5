"""Issue #9: interruptions, bad input and overwrites lose nothing, and every user mistake ends in
one `error:` line. Stage-level cases run the stage's main() in this process (cheap); the kills run
the stage as a user does, in a subprocess."""

import errno
import glob
import json
import os
import re
import sys

import pytest

import config as C
from conftest import ROOT, kill_after_first_checkpoint, ppo_args, toy_conversations, toy_preference_pairs, write_jsonl
from rlhf.checkpoints import CHECKPOINT_MARKER, resume_from
from rlhf.common import run_stage
from rlhf.data import drop_too_long
from rlhf.handoff import disk_full_is_an_error, is_disk_full, save_stage_output
from rlhf.settings import UserError, scalar_settings, settings

STAGES = ("sft", "rm", "ppo")
PPO_QUICK = ["--PPO_BATCH_SIZE=4", "--PPO_MINI_BATCH_SIZE=4", "--PPO_SAMPLES_PER_PROMPT=2", "--PPO_EPOCHS=1",
             "--PPO_EXEC_WEIGHT=0"]  # the smallest PPO step: no unit tests run


@pytest.fixture
def stage_main(monkeypatch):
    """main() of a stage script, run in this process; every setting it overrides is restored after."""
    import importlib

    for name, value in settings().items():
        monkeypatch.setattr(C, name, value)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")
    return lambda stage: importlib.import_module(f"train_{stage}").main


def stage_args(stage, out, tiny_base, toy_data, toy_pairs, inputs, data=None):
    """Overrides that run `stage` on tiny inputs with every output under `out`; `data` replaces
    the stage's main data file."""
    common = [f"--RUNS_DIR={out}/runs", "--REPORT_TO=none", "--SFT_EVAL_PASS_AT_1=false"]
    if stage == "sft":
        return common + [f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={out}/sft_model", "--BATCH_SIZE=8",
                         f"--SFT_TRAIN_FILE={data or toy_data['sft_train']}", f"--SFT_EVAL_FILE={toy_data['sft_eval']}"]
    if stage == "rm":
        return common + [f"--SFT_DIR={inputs['sft']}", f"--RM_DIR={out}/rm_model", "--RM_BATCH_SIZE=8",
                         f"--RM_TRAIN_FILE={data or toy_pairs['rm_train']}", f"--RM_EVAL_FILE={toy_pairs['rm_eval']}",
                         "--RM_ONPOLICY_SAMPLES=0"]
    return ppo_args(inputs, out, "--PPO_EVAL_EVERY=0") + ([f"--PPO_PROMPTS_FILE={data}"] if data else [])


def good_row(stage):
    if stage == "sft":
        return toy_conversations(1)[0]
    if stage == "rm":
        return toy_preference_pairs(1)[0]
    return {"prompt": [{"role": "user", "content": "Write add_1(x)."}]}


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming file and line, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------

ROBOT = {"role": "robot", "content": "beep"}
BAD_DATA = {  # case -> (file content after one good row, expected message)
    "malformed": (b"{not json\n", r"bad.jsonl:2: malformed JSON"),
    "unknown role": (json.dumps({"messages": [ROBOT, {"role": "assistant", "content": "x"}], "prompt": [ROBOT],
                                 "chosen": "x", "rejected": "y"}).encode() + b"\n",
                     r"bad.jsonl:2: unknown role 'robot' in `(messages|prompt)`; use system, user, assistant, tool"),
    "missing field": (b'{"oops": 1}\n', r"bad.jsonl:2: missing field"),
    "non-utf8": (b'{"prompt": "\xff\xfe"}\n', r"bad.jsonl:2: not UTF-8"),
    "empty": (None, r"bad.jsonl is empty"),
    "missing": (None, r"bad.jsonl not found"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
@pytest.mark.parametrize("stage", STAGES)
def test_bad_data_is_one_line_and_writes_nothing(stage, case, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs,
                                                 stage_main, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    tail, message = BAD_DATA[case]
    if case == "empty":
        bad.write_bytes(b"")
    elif case != "missing":
        bad.write_bytes(json.dumps(good_row(stage), ensure_ascii=False).encode() + b"\n" + tail)
    args = stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, data=bad)
    monkeypatch.setattr(sys, "argv", [f"train_{stage}.py", *args])
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage_main(stage))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert sorted(os.listdir(tmp_path)) == (["bad.jsonl"] if bad.exists() else [])  # no output, no runs/


def test_json_files_name_the_line_or_byte(tmp_path):
    from rlhf.data import load_rows

    (tmp_path / "d.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(UserError, match=r"d.json:3: malformed JSON \(Expecting value\)"):
        load_rows(str(tmp_path / "d.json"))
    (tmp_path / "d.json").write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(UserError, match=r"d.json: not UTF-8 text \(byte 13\)"):
        load_rows(str(tmp_path / "d.json"))


@pytest.mark.parametrize("stage", STAGES)
def test_all_examples_too_long_is_an_error(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main):
    limit = {"sft": ["--MAX_LEN=5"], "rm": ["--RM_MAX_LEN=5"], "ppo": ["--MAX_LEN=16", "--PPO_RESPONSE_LEN=12"]}[stage]
    message = {"sft": "longer than MAX_LEN=5 tokens; raise MAX_LEN", "rm": "longer than RM_MAX_LEN=5 tokens; raise RM_MAX_LEN",
               "ppo": "every prompt is longer than MAX_LEN - PPO_RESPONSE_LEN = 4 tokens"}[stage]
    with pytest.raises(UserError, match=message):
        stage_main(stage)(stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs) + limit)
    assert os.listdir(tmp_path) == []


def test_some_examples_too_long_are_dropped_with_a_count(tiny_base, tmp_path, capsys):
    from rlhf.common import load_tokenizer
    from rlhf.ppo_setup import load_prompts

    assert drop_too_long(["a", "b", "c"], [3, 9, 4], 5, "x.jsonl") == ["a", "c"]
    assert "dropped 1 of 3 examples of x.jsonl longer than MAX_LEN=5 tokens" in capsys.readouterr().out
    rows = [{"prompt": "Write add_1(x)."}, {"prompt": "Write add_1(x). " * 40}]
    kept = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), load_tokenizer(tiny_base), 64 - 16)  # MAX_LEN - PPO_RESPONSE_LEN
    assert len(kept) == 1 and "dropped 1 of 2 prompts longer than 48 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("arg, message", [
    ("--BATCHSIZE=4", "unknown setting --BATCHSIZE; did you mean BATCH_SIZE"),
    ("--RM_LR=fast", "--RM_LR expects a number, got 'fast'"),
    ("--PPO_KL_ESTIMATOR=k4", "PPO_KL_ESTIMATOR must be one of k1, k2, k3, not 'k4'"),
    ("--BATCH_SIZE=0", "BATCH_SIZE must be above 0"),
    ("--LR", "settings are given as --NAME=value"),
    ("--WARMUP_RATIO=2", "WARMUP_RATIO must be in [0, 1), not 2.0"),  # transformers would read it as 2 steps
    ("--RM_WARMUP_RATIO=1", "RM_WARMUP_RATIO must be in [0, 1), not 1.0"),
    ("--LORA_DROPOUT=-0.1", "LORA_DROPOUT must be in [0, 1), not -0.1"),
    ("--PPO_LAM=1.5", "PPO_LAM must be in [0, 1], not 1.5"),
    ("--PPO_KL_COEF=-1", "PPO_KL_COEF must be 0 or more, not -1.0"),
    (f"--EVAL_TASKS_FILE={ROOT}/data", f"EVAL_TASKS_FILE='{ROOT}/data' is a folder; give a data file"),
])
def test_unknown_or_mistyped_settings(stage, arg, message, stage_main, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even under the default folders
    monkeypatch.setattr(sys, "argv", [f"train_{stage}.py", arg])
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage_main(stage))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == [f"error: {err[0][len('error: '):]}"] and message in err[0], err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage, missing, command", [
    ("rm", "sft", "python train_sft.py"), ("ppo", "sft", "python train_sft.py"), ("ppo", "rm", "python train_rm.py"),
])
def test_stage_out_of_order_names_the_command(stage, missing, command, tmp_path, ppo_inputs, stage_main):
    args = [f"--SFT_DIR={ppo_inputs['sft']}", f"--RM_DIR={ppo_inputs['rm']}", f"--RM_DIR={tmp_path}/rm_model"
            if stage == "rm" else f"--PPO_DIR={tmp_path}/ppo_model", f"--RUNS_DIR={tmp_path}/runs"]
    os.makedirs(tmp_path / f"{missing}_model")  # a folder left by an interrupted run: not a finished model
    args.append(f"--{missing.upper()}_DIR={tmp_path}/{missing}_model")
    with pytest.raises(UserError, match=f"no finished {missing.upper()} model .*run `{command}` again"):
        stage_main(stage)(args)
    assert os.listdir(tmp_path) == [f"{missing}_model"]


@pytest.mark.parametrize("stage", STAGES)
def test_data_file_that_is_a_folder(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main, monkeypatch,
                                    capsys):
    os.makedirs(tmp_path / "train.jsonl")  # a folder named like a file: IsADirectoryError before
    args = stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, data=tmp_path / "train.jsonl")
    monkeypatch.setattr(sys, "argv", [f"train_{stage}.py", *args])
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage_main(stage))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and re.match(r"error: \w+_FILE='.*train.jsonl' is a folder", err[0]), err
    assert os.listdir(tmp_path) == ["train.jsonl"]


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_lora_target_the_model_lacks(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main):
    args = stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs)
    with pytest.raises(UserError, match=r"LORA_TARGET_MODULES: the model has no layer named nope_proj; its linear "
                                        r"layers are .*q_proj.* \(or use all-linear\)"):
        stage_main(stage)(args + ["--USE_LORA=true", "--LORA_TARGET_MODULES=q_proj,nope_proj"])
    assert os.listdir(tmp_path) == []


BAD_TESTS = {  # case -> (the `tests` of a task row, expected message)
    "tests as a string": ("add_1(1) == 2", r"`tests` must be a list of \{\"call\", \"expected\"\} objects, not str"),
    "expected not a literal": ([{"call": "add_1(1)", "expected": "two"}], r"expected 'two' is not a Python literal"),
    "test without call": ([{"expected": "2"}], r"each test needs a string `call` and `expected`"),
}


@pytest.mark.parametrize("case", list(BAD_TESTS))
def test_eval_task_rows_with_unrunnable_tests(case, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main):
    """SFT reads EVAL_TASKS_FILE before training (pass@1 at its end): a row whose tests cannot run
    stops it at once, naming file and line, not after hours of training."""
    tests, message = BAD_TESTS[case]
    good = {"task_id": "t1", "prompt": "Write add_1(x).", "entry_point": "add_1",
            "tests": [{"call": "add_1(1)", "expected": "2"}]}
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [good, dict(good, task_id="t2", tests=tests)])
    args = stage_args("sft", tmp_path / "out", tiny_base, toy_data, toy_pairs, ppo_inputs)
    with pytest.raises(UserError, match=rf"tasks.jsonl:2: {message}"):
        stage_main("sft")(args + [f"--EVAL_TASKS_FILE={tasks}", "--SFT_EVAL_PASS_AT_1=true"])
    assert os.listdir(tmp_path) == ["tasks.jsonl"]


@pytest.mark.parametrize("case", list(BAD_TESTS))
def test_ppo_prompt_rows_with_unrunnable_tests(case, tmp_path, ppo_inputs, stage_main):
    tests, message = BAD_TESTS[case]
    rows = [dict(json.loads(open(ppo_inputs["prompts"]).readline()), tests=tests)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(UserError, match=rf"prompts.jsonl:1: {message}"):
        stage_main("ppo")(ppo_args(ppo_inputs, tmp_path / "out", f"--PPO_PROMPTS_FILE={prompts}", "--PPO_STEPS=1",
                                   "--PPO_EVAL_EVERY=0", *PPO_QUICK))
    assert os.listdir(tmp_path) == ["prompts.jsonl"]


@pytest.mark.parametrize("stage, setting, on", [
    ("sft", "EVAL_TASKS_FILE", "--SFT_EVAL_PASS_AT_1=true"), ("sft", "SEED_PROMPTS_FILE", "--SFT_EVAL_PASS_AT_1=true"),
    ("rm", "RM_ONPOLICY_PROMPTS_FILE", "--RM_ONPOLICY_SAMPLES=1"),
    ("ppo", "EVAL_TASKS_FILE", "--PPO_STEPS=1"), ("ppo", "PPO_PROMPTS_FILE", "--PPO_STEPS=1"),
])
def test_a_hub_id_that_cannot_be_reached_stops_the_stage_in_one_line(stage, setting, on, tmp_path, tiny_base, toy_data,
                                                                      toy_pairs, ppo_inputs, stage_main, monkeypatch, capsys):
    """Offline, a task file given as a hub id is one error line before anything trains; it used to
    be skipped without a word (SFT's pass@1, PPO's evaluation, the RM's on-policy pairs)."""
    args = stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs)
    if stage == "sft":
        args.append(f"--EVAL_TASKS_FILE={ppo_inputs['tasks']}")
    if stage == "ppo":
        args += PPO_QUICK
    monkeypatch.setattr(sys, "argv", [f"train_{stage}.py", *args, on, f"--{setting}=mbpp:sanitized:test",
                                      "--SEED_PROMPT_SAMPLES=1"])
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage_main(stage))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: cannot load dataset 'mbpp:sanitized:test' from the hub (ConnectionError"), err
    assert os.listdir(tmp_path) == []


def test_model_path_that_does_not_exist(tmp_path, stage_main):
    with pytest.raises(UserError, match="is not a model folder"):
        stage_main("sft")([f"--MODEL_NAME={tmp_path}/no_model", f"--SFT_DIR={tmp_path}/o", f"--RUNS_DIR={tmp_path}/runs",
                           f"--SFT_TRAIN_FILE={ROOT}/data/sft_eval.jsonl", f"--SFT_EVAL_FILE={ROOT}/data/sft_eval.jsonl"])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Overwrites
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_finished_output_is_not_overwritten(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main):
    out = tmp_path / f"{stage}_model"
    save_stage_output(str(out), stage, lambda tmp: open(os.path.join(tmp, "weights"), "w").write("mine"),
                      {}, scalar_settings())
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match=f"{out} already holds a finished model; .*--OVERWRITE=true"):
        stage_main(stage)(stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs))
    assert sorted(os.listdir(out)) == before and open(out / "weights").read() == "mine"


# ---------------------------------------------------------------------------------------------
# Interruptions: SIGKILL, half-written checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["writing", "between the renames"])
def test_kill_while_saving_the_output_loses_and_leaks_nothing(moment, tmp_path, capsys):
    """save_stage_output writes <out>.tmp-PID, renames <out> to <out>.old-PID, then the temporary
    folder to <out>. What each kill leaves is cleaned or finished by the next run of the stage."""
    from rlhf.handoff import check_output_dir

    out = tmp_path / "sft_model"
    save_stage_output(str(out), "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v1"),
                      {}, scalar_settings())
    if moment == "writing":  # a half-written new model next to the finished one
        os.makedirs(tmp_path / "sft_model.tmp-4242")
        (tmp_path / "sft_model.tmp-4242" / "weights").write_text("half")
    else:  # the new model is complete, the old one moved aside, the new one not yet in place
        save_stage_output(str(tmp_path / "sft_model.tmp-4242"), "sft",
                          lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v2"), {}, scalar_settings())
        os.rename(out, tmp_path / "sft_model.old-4242")
    with pytest.raises(UserError, match="already holds a finished model"):
        check_output_dir(str(out), overwrite=False)
    assert os.listdir(tmp_path) == ["sft_model"]
    assert open(out / "weights").read() == ("v1" if moment == "writing" else "v2")
    said = capsys.readouterr().out
    assert ("an incomplete save of" in said) if moment == "writing" else ("finishing a save that was interrupted" in said)


def test_a_half_written_first_save_is_removed_never_moved_into_place(tmp_path, capsys):
    """Killed while writing a stage's first output: no earlier model, and a <out>.tmp-PID without
    its metadata file. The next run removes it; moving it into place would hand the next stage a
    half-written model as a finished one."""
    from rlhf.handoff import recover_interrupted_save, require_stage_output

    os.makedirs(tmp_path / "sft_model.tmp-4242")
    (tmp_path / "sft_model.tmp-4242" / "weights").write_text("half")
    recover_interrupted_save(str(tmp_path / "sft_model"))  # what check_output_dir runs first
    assert os.listdir(tmp_path) == []
    assert "an incomplete save of" in capsys.readouterr().out
    with pytest.raises(UserError, match="run `python train_sft.py` first"):
        require_stage_output(str(tmp_path / "sft_model"), "sft")


def test_half_written_checkpoints_are_never_resumed(tmp_path, capsys):
    trainer, ppo = tmp_path / "sft", tmp_path / "ppo"
    for folder, marker in ((trainer / "checkpoint-2", CHECKPOINT_MARKER), (ppo / "step_2", "ppo_state.json"),
                           (ppo / "step_4.tmp", "ppo_state.json")):  # killed between the marker and the rename
        os.makedirs(folder)
        (folder / marker).write_text(json.dumps({"settings": {"LR": C.LR * 10, "EPOCHS": C.EPOCHS}}))
    for partial in (trainer / "checkpoint-4", trainer / ".saving" / "checkpoint-6", ppo / "step_6"):
        os.makedirs(partial)
        (partial / "model.safetensors").write_bytes(b"half")
    run = {"RESUME": True, "LR": C.LR, "EPOCHS": C.EPOCHS}
    assert resume_from(str(trainer), run) == str(trainer / "checkpoint-2")
    assert resume_from(str(ppo), run, marker="ppo_state.json", prefix="step_") == str(ppo / "step_2")
    out = capsys.readouterr().out
    for removed in ("sft/.saving", "sft/checkpoint-4", "ppo/step_4.tmp", "ppo/step_6"):
        assert f"{removed}: an incomplete checkpoint" in out, removed
    assert os.listdir(trainer) == ["checkpoint-2"] and os.listdir(ppo) == ["step_2"]
    assert "resuming from" in out and out.count("(step 2)") == 2
    assert out.count(f"note: the checkpoint was made with LR={C.LR * 10!r} (now {C.LR!r}); its optimizer") == 2
    assert resume_from(str(trainer), {**run, "RESUME": False}) is None and "RESUME is false: starting over" in capsys.readouterr().out


@pytest.mark.slow  # trains in this process
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_killed_stage_resumes_and_finishes(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs, stage_main,
                                           capsys):
    """Killed in a subprocess, rerun in this process (one interpreter start less). PPO:
    tests/test_ppo.py::test_killed_run_resumes_to_the_same_model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # 3 steps an epoch, 2 epochs, a checkpoint every 2 steps
    size = ["--BATCH_SIZE=16", "--EPOCHS=2"] if stage == "sft" else ["--RM_BATCH_SIZE=16", "--RM_EPOCHS=2"]
    args = stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs) + size + ["--EVAL_EVERY=2"]
    folder = tmp_path / "runs" / stage / "checkpoints"
    checkpoint = kill_after_first_checkpoint(f"train_{stage}.py", args, folder)
    assert not (tmp_path / f"{stage}_model").exists()  # killed before the end
    os.makedirs(folder / "checkpoint-999")  # what a kill mid-save of a later step would leave: no marker
    (folder / "checkpoint-999" / "model.safetensors").write_bytes(b"half")
    step = int(checkpoint.rsplit("-", 1)[1])

    stage_main(stage)(args)
    out = capsys.readouterr().out
    assert f"removing {folder / 'checkpoint-999'}: an incomplete checkpoint" in out
    resumed = re.search(rf"resuming from {folder}/checkpoint-(\d+) \(step (\d+)\)", out)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) >= step >= 2, out[-2000:]
    cls = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    cls.from_pretrained(tmp_path / f"{stage}_model")
    assert not folder.exists()  # finished: checkpoints removed


# ---------------------------------------------------------------------------------------------
# Non-finite loss: stop with the step and the last good checkpoint
# ---------------------------------------------------------------------------------------------

REWARD_CALLS = []


def reward_nan_from_step_2(prompts, texts):
    """A user's PPO_REWARD_FN with a bug: from its second call (PPO step 2) it returns NaN."""
    REWARD_CALLS.append(len(texts))
    return [float("nan") if len(REWARD_CALLS) >= 2 else 0.0] * len(texts)


@pytest.mark.slow  # trains in this process
@pytest.mark.parametrize("stage, trigger", [
    ("sft", ["--LR=1e30", "--EVAL_EVERY=1"]),  # an absurd learning rate: the weights overflow
    ("rm", ["--RM_LR=1e30", "--EVAL_EVERY=1"]),
    ("ppo", [f"--PPO_REWARD_FN={__name__}:reward_nan_from_step_2", "--PPO_SAVE_EVERY=1", "--PPO_STEPS=4", *PPO_QUICK]),
])
def test_non_finite_loss_names_step_and_last_good_checkpoint(stage, trigger, tmp_path, tiny_base, toy_data, toy_pairs,
                                                             ppo_inputs, stage_main):
    from safetensors.torch import load_file

    REWARD_CALLS.clear()
    with pytest.raises(UserError) as e:
        stage_main(stage)(stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs) + trigger)
    found = re.fullmatch(rf"{stage}: training diverged at step (\d+) \(.+\); last good checkpoint: "
                         r"(\S+)\. Lower .+ and start over with --RESUME=false .+", str(e.value))
    assert found, str(e.value)
    step, checkpoint = int(found.group(1)), found.group(2)
    saved_step = int(checkpoint.replace("_", "-").rsplit("-", 1)[1])
    assert 1 <= saved_step < step and os.path.dirname(checkpoint) == str(tmp_path / "runs" / stage / "checkpoints")
    weights = glob.glob(f"{checkpoint}/**/*.safetensors", recursive=True)
    assert weights and all(t.isfinite().all() for w in weights for t in load_file(w).values())  # good indeed
    assert not (tmp_path / f"{stage}_model").exists()


# ---------------------------------------------------------------------------------------------
# A full disk while saving
# ---------------------------------------------------------------------------------------------

def test_disk_full_keeps_the_previous_output(tmp_path):
    out = str(tmp_path / "sft_model")
    save_stage_output(out, "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v1"),
                      {}, scalar_settings())

    def full(tmp):
        open(os.path.join(tmp, "weights"), "w").write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=rf"disk full while saving {out} .*free space and rerun; {out} is unchanged"):
        save_stage_output(out, "sft", full, {}, scalar_settings())
    assert open(os.path.join(out, "weights")).read() == "v1" and os.listdir(tmp_path) == ["sft_model"]


def test_disk_full_seen_by_torch_save_is_recognised(tmp_path, monkeypatch):
    """torch.save reports a full disk as `unexpected pos` only: the free space decides."""
    import shutil
    import types

    tmp = tmp_path / "x.tmp"
    full = 16 * 2**20  # less than this free: the disk was full
    for free, expected in ((0, UserError), (full - 1, UserError), (full, RuntimeError), (10**12, RuntimeError)):
        # the disk asked about is the one of the save's folder, not of the working directory
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: types.SimpleNamespace(
            free=free if path == str(tmp) else 10**12))
        with pytest.raises(expected):
            with disk_full_is_an_error("x", str(tmp), "kept"):
                os.makedirs(tmp)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        assert not tmp.exists()
    # an error that says so is a full disk whatever the free space (safetensors wraps the OSError)
    assert is_disk_full(RuntimeError("Error while serializing: No space left on device (os error 28)"), str(tmp))


@pytest.mark.slow  # trains in this process
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(stage, tmp_path, tiny_base, toy_data, toy_pairs,
                                                                 ppo_inputs, stage_main, monkeypatch):
    """The second checkpoint save of the run hits a full disk half-way (SFT and RM share the Trainer path)."""
    import accelerate
    import transformers

    owner, method = (transformers.Trainer, "_save_optimizer_and_scheduler") if stage == "sft" else \
        (accelerate.Accelerator, "save_state")
    original, calls = getattr(owner, method), []

    def save(self, output_dir, *args, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "optimizer.pt"), "wb").write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(owner, method, save)
    extra = ["--BATCH_SIZE=16", "--EPOCHS=1", "--EVAL_EVERY=1"] if stage == "sft" else \
        ["--PPO_SAVE_EVERY=1", "--PPO_STEPS=3", *PPO_QUICK]
    with pytest.raises(UserError, match=r"disk full while saving .*: free space and rerun; the (last complete|previous) "
                                        r"checkpoint is kept and a rerun resumes from it"):
        stage_main(stage)(stage_args(stage, tmp_path, tiny_base, toy_data, toy_pairs, ppo_inputs) + extra)
    folder = tmp_path / "runs" / stage / "checkpoints"
    assert sorted(os.listdir(folder)) == (["checkpoint-1"] if stage == "sft" else ["step_1"])  # temp folder removed
    assert not (tmp_path / f"{stage}_model").exists()
