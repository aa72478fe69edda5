"""train_ppo.py as a user runs it, on tiny models: a toy reward goes up with the KL bounded,
a killed run resumes to the same result, missing inputs give one clear line."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, expected_last_lrs, ppo_args, run_script, toy_tasks, write_jsonl


@pytest.mark.slow  # 16 iterations of 32 answers: the fast lane's longest test (tests/test_ppo_wiring.py: the wiring)
@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_toy_reward_rises_with_bounded_kl(ppo_inputs, tmp_path, advantage, run_in_process):
    """Reward for the letter 'a' in the response (tests/ppo_toy_reward.py), nothing else; with a
    critic (gae) and without (grpo, the default). 32 responses a step: with 16, grpo's rise over
    the 16 steps depended on the sampling stream (+0.03 to +0.27 over four seeds), with 32 it was
    +0.10 to +0.40 over the same seeds."""
    proc = run_in_process("train_ppo.py", *ppo_args(
        ppo_inputs, tmp_path, "--PPO_STEPS=16", "--PPO_BATCH_SIZE=32", "--PPO_MINI_BATCH_SIZE=8", "--PPO_RESPONSE_LEN=16",
        "--PPO_RM_WEIGHT=0", "--PPO_EXEC_WEIGHT=0", "--PPO_REWARD_FN=tests.ppo_toy_reward:reward",
        "--PPO_PENALIZE_MISSING_EOS=false", "--PPO_LR=1e-2", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0",
        f"--PPO_ADVANTAGE={advantage}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"]
    scores = [h["score"] for h in history]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.05, scores
    # the KL penalty holds the policy near the reference: under 1 nat per token of these 16-token answers;
    # and the policy has moved: k1 on the policy's own samples estimates KL(policy || reference) >= 0
    # (with the logprobs swapped it is as far below 0)
    assert max(h["kl"] for h in history) < 16.0 and sum(h["kl"] for h in history[-4:]) / 4 > 0.05, history
    assert "ppo step 16/16 | score" in proc.stderr + proc.stdout
    # a critic is trained with gae only: no value model is built for the critic-free estimators
    assert all(("value_loss" in h) == (advantage == "gae") for h in history)


@pytest.mark.slow  # trains in this process
@pytest.mark.parametrize("precision,lora", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_first_update_sees_the_rollout_it_sampled(ppo_inputs, tmp_path, run_in_process, precision, lora):
    """The rollout's forwards run on rows sorted by length and put their results back in rollout
    order: with a learning rate of ~0, every mini-batch of the update finds its old logprobs equal
    to its own (ratio 1, no clipping) and the KL to the reference, which the policy still is, ~0.
    Under bf16 autocast (PRECISION=bf16, what `auto` picks on GPUs; on this CPU with a tiny model)
    too: the reference (a full copy, or the policy with its LoRA adapter off) runs in the policy's
    precision, so the KL at step 0 is 0 exactly, not bf16 rounding."""
    proc = run_in_process("train_ppo.py", *ppo_args(
        ppo_inputs, tmp_path, "--PPO_STEPS=1", "--PPO_EPOCHS=2", "--PPO_BATCH_SIZE=16", "--PPO_MINI_BATCH_SIZE=4",
        "--PPO_LR=1e-30", "--PPO_CRITIC_LR=1e-30", "--PPO_ADVANTAGE=gae", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0",
        f"--PRECISION={precision}", f"--USE_LORA={lora}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"precision {precision}" in proc.stdout
    (h,) = [h for h in json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]
    assert h["approx_kl"] < 1e-6 and h["clipfrac"] == 0.0, h
    assert abs(h["ratio_mean"] - 1.0) < 1e-4, h
    assert abs(h["kl"]) < (1e-3 if precision == "fp32" else 1e-12), h  # fp32: the sampler's logprobs vs a forward


@pytest.mark.slow  # trains in this process
def test_learning_rate_decays_linearly_over_the_whole_run(ppo_inputs, tmp_path, run_in_process):
    """Linear decay to 0 over every update of the run: the rate logged for an iteration is the one
    its last update used (test_distributed.py checks the same with 2 processes)."""
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_STEPS=3", "--PPO_EPOCHS=2",
                                                "--PPO_LR=1e-3", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [h for h in json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]
    assert [h["lr"] for h in history] == pytest.approx(expected_last_lrs(1e-3, steps=3, updates_per_step=2 * 8 // 4))
    assert re.search(r"ppo step 3/3 \|.*\| lr 8.3e-05 \|", proc.stderr + proc.stdout)


@pytest.mark.slow  # trains in this process
def test_one_answer_per_prompt_trains_every_answer(ppo_inputs, tmp_path, run_in_process):
    """PPO_SAMPLES_PER_PROMPT=1 with a critic: no group whose test results could differ, so every
    answer trains the policy (before, none did: no group was ever mixed); oversampling and
    self-imitation, which compare the answers to one prompt, are off with one line."""
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_STEPS=1", "--PPO_SAMPLES_PER_PROMPT=1",
                                                "--PPO_ADVANTAGE=gae", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (h,) = [h for h in json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]
    assert h["trained_share"] == 1.0 and h["sil_loss"] == 0.0, h
    assert "PPO_SAMPLES_PER_PROMPT=1: every answer trains the policy against the critic" in proc.stdout


@pytest.mark.slow  # trains in this process
def test_ppo_saves_a_plain_causal_lm_with_metrics(ppo_inputs, tmp_path, run_in_process):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_STEPS=2", "--PPO_EVAL_EVERY=1",
                                                "--PPO_OVERSAMPLE=2", "--PPO_ADVANTAGE=rloo", "--PPO_KL_LOSS=true",
                                                "--PPO_KL_ESTIMATOR=k3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "ppo_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and model.config.model_type == "qwen2"
    assert tok.padding_side == "right"  # generating for the evaluation must not change the saved tokenizer
    results = json.load(open(folder / "eval_results.json"))
    for key in ("pass_at_1", "rm_score", "kl", "reward_mean", "response_length", "episodes_per_second", "peak_rss_mib"):
        assert key in results, key
    history = json.load(open(folder / "rlhf_stage.json"))["metrics"]["history"]
    assert history[0]["step"] == 0 and "eval_pass_at_1" in history[0]  # evaluated before training
    trained = [h for h in history if "kl" in h]
    assert len(trained) == 2 and all(0.0 <= h["test_pass_rate"] <= 1.0 for h in trained)
    assert all("kl_loss" in h and 0.0 <= h["trained_share"] <= 1.0 for h in trained)  # PPO_KL_LOSS: the KL is a loss term
    # PPO_OVERSAMPLE=2: twice the prompts sampled, the batch filled with those whose tests disagree first
    assert all(0.0 <= h["mixed_groups"] <= 1.0 and 0.0 <= h["sampled_pass_rate"] <= 1.0 for h in trained)
    assert not os.path.exists(tmp_path / "runs" / "ppo" / "checkpoints")


def test_killed_run_resumes_to_the_same_model(ppo_inputs, tmp_path, run_in_process):
    """The run to kill is a process of its own; the straight run and the resumed one run in this
    process (no interpreter start-up)."""
    from safetensors.torch import load_file

    extra = ("--PPO_STEPS=4", "--PPO_SAVE_EVERY=2", "--PPO_EVAL_EVERY=0")
    straight = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path / "a", *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_ppo.py"), *ppo_args(ppo_inputs, out, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "runs" / "ppo" / "checkpoints" / "step_2" / "ppo_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / "ppo_model").exists()  # killed after step 2, before the end

    resumed = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, out, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout
    a = load_file(tmp_path / "a" / "ppo_model" / "model.safetensors")
    b = load_file(out / "ppo_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_missing_inputs_name_the_command(tmp_path, ppo_inputs, run_in_process):
    proc = run_in_process("train_ppo.py", f"--SFT_DIR={tmp_path}/none", f"--RM_DIR={ppo_inputs['rm']}")
    assert proc.returncode == 2 and "run `python train_sft.py` first" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_in_process("train_ppo.py", f"--SFT_DIR={ppo_inputs['sft']}", f"--RM_DIR={tmp_path}/none")
    assert proc.returncode == 2 and "run `python train_rm.py` first" in proc.stderr
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_BATCH_SIZE=6"))
    assert proc.returncode == 2 and "multiple of PPO_MINI_BATCH_SIZE" in proc.stderr
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_SAMPLES_PER_PROMPT=1", "--PPO_ADVANTAGE=rloo"))
    assert proc.returncode == 2 and "PPO_SAMPLES_PER_PROMPT >= 2" in proc.stderr
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_KL_LOSS=true", "--PPO_KL_ESTIMATOR=k1"))
    assert proc.returncode == 2 and "k1 as a loss term" in proc.stderr
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, f"--PPO_PROMPTS_FILE={tmp_path}/x.jsonl"))
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.slow  # trains in this process
def test_lora_run_uses_disabled_adapters_and_saves_a_merged_model(ppo_inputs, tmp_path, run_in_process):
    """With LoRA the reference is the policy with its adapter off and the RM the critic with its
    adapter off; the saved model is merged (no adapter files) and loads as a plain causal LM."""
    from transformers import AutoModelForCausalLM

    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--USE_LORA=true", "--PPO_STEPS=2",
                                                "--PPO_EVAL_EVERY=0", "--PPO_LR=1e-3", "--PPO_ADVANTAGE=gae"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "ppo_model"
    assert not (folder / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(folder)
    history = json.load(open(folder / "rlhf_stage.json"))["metrics"]["history"]
    # first rollout: policy == reference (LoRA B starts at zero); the old logprobs are the sampler's
    # (cached decoding), the reference's a whole forward: equal to float rounding
    assert abs(history[0]["kl"]) < 1e-4


def test_rm_vs_tests_script_compares_failed_answers_with_references(ppo_inputs, tmp_path):
    tasks = [dict(t, heldout_params=k > 2, family="low" if k < 3 else "high") for k, t in enumerate(toy_tasks(4), 1)]
    results = [{"task_id": t["task_id"], "passed": k == 0, "raw": f"```python\n{t['solution'].replace('+', '-')}\n```"}
               for k, t in enumerate(tasks)]
    problems, answers = write_jsonl(tmp_path / "tasks.jsonl", tasks), write_jsonl(tmp_path / "results.jsonl", results)
    proc = run_script("scripts/rm_vs_tests.py", f"--results={answers}", f"--problems={problems}", f"--rm={ppo_inputs['rm']}",
                      "--by-family")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 3 failed answers of 4" in proc.stdout  # the passing answer is left out
    assert "held-out parameter values  n=   2" in proc.stdout and "seen parameter values      n=   1" in proc.stdout
    low = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["low"])  # t1 passed: only t2 counts
    high = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["high"])
    assert "all failures" not in low and re.search(r"all [01]/1 \| seen [01]/1$", low), low
    assert re.search(r"all [0-2]/2 \| held-out [0-2]/2$", high), high
    proc = run_script("scripts/rm_vs_tests.py", f"--results={tmp_path}/none.jsonl", f"--rm={ppo_inputs['rm']}")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_bench_advantages_compares_estimators(ppo_inputs, tmp_path):
    """bench/bench_advantages.py runs each estimator and prints one row per estimator (tiny settings),
    with each final model's pass@1 on a second task file when --heldout names one."""
    args = [a for a in ppo_args(ppo_inputs, tmp_path) if not a.startswith(("--PPO_DIR", "--RUNS_DIR", "--EVAL_TASKS_FILE"))]
    proc = run_script("bench/bench_advantages.py", "--estimators=gae,rloo", "--seeds=3", f"--tasks={ppo_inputs['tasks']}",
                      f"--heldout={ppo_inputs['tasks']}", "--PPO_STEPS=1", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| gae", "| rloo", "| SFT"))]
    assert len(rows) == 3, proc.stdout[-2000:]
    assert "held-out pass@1 (mean)" in proc.stdout and all(len(row.split("|")) == 10 for row in rows), proc.stdout[-2000:]
