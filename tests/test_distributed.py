"""Several processes: every stage under `accelerate launch` with 2 CPU processes (gloo,
accelerate_configs/cpu.yaml), 2-process SFT losses against 1 process with the same global batch,
no rank left waiting when the ranks' data differ, the accelerate configs, and QLoRA's message
on a machine without a GPU. DeepSpeed, FSDP, bf16 and QLoRA itself need GPUs: not run here."""

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script, toy_conversations, toy_preference_pairs, write_jsonl

CPU_CONFIG = os.path.join(ROOT, "accelerate_configs", "cpu.yaml")
LAUNCH_TIMEOUT = 300  # seconds; a rank waiting forever for another fails the test here


def launch(script, *args, processes=2, timeout=LAUNCH_TIMEOUT):
    """`accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes N script args`,
    in its own process group so that a hung run is killed whole (torchrun and its workers)."""
    with socket.socket() as s:  # a free port: other runs on this machine may hold 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_CONFIG,
           "--num_processes", str(processes), "--main_process_port", str(port), os.path.join(ROOT, script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} on {processes} processes did not finish in {timeout} s (a rank waiting for another?)\n"
                    + err[-3000:])
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return out + err


def sft_losses(folder):
    history = json.load(open(os.path.join(folder, "rlhf_stage.json")))["metrics"]["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def same_length_conversations(model_dir, n):
    """n toy conversations that all have the same number of tokens. SFT batches group examples
    by length (transformers' LengthGroupedSampler), and its groups depend on the per-device batch
    size, so 1 x 4 and 2 x 2 put different examples together; at equal lengths both keep the
    sampler's random order and the global batches hold the same examples."""
    from rlhf.common import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = toy_conversations(20 * n, seed=11)
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    rows = [r for r, length in zip(rows, lengths) if length == common]
    assert len(rows) >= n, f"only {len(rows)} toy conversations of {common} tokens"
    return rows[:n]


@pytest.fixture(scope="module")
def two_process_runs(tiny_base, tmp_path_factory):
    """SFT on 1 process (batch 4) and on 2 (batch 2 each), then RM and PPO on 2 processes from
    the 2-process outputs. 22 SFT examples and 21 RM pairs do not divide into the global batch
    of 4: the last batch of a rank would be missing or short (with the step counts uneven, one
    rank would wait forever for the others), and PPO's prompts differ in length across ranks."""
    folder = tmp_path_factory.mktemp("dist")
    sft_train = write_jsonl(folder / "sft_train.jsonl", same_length_conversations(tiny_base, 22))
    sft_eval = write_jsonl(folder / "sft_eval.jsonl", toy_conversations(5, seed=12))
    common = [f"--MODEL_NAME={tiny_base}", f"--SFT_TRAIN_FILE={sft_train}", f"--SFT_EVAL_FILE={sft_eval}",
              "--EPOCHS=1", "--LOG_EVERY=1", "--LR=1e-3", "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none"]
    one = folder / "one"
    proc = run_script("train_sft.py", *common, "--BATCH_SIZE=4", f"--SFT_DIR={one}/sft", f"--RUNS_DIR={one}/runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = folder / "two"
    logs = {"sft": launch("train_sft.py", *common, "--BATCH_SIZE=2", f"--SFT_DIR={two}/sft", f"--RUNS_DIR={two}/runs")}

    rm_train = write_jsonl(folder / "rm_train.jsonl", toy_preference_pairs(21, seed=13))
    rm_eval = write_jsonl(folder / "rm_eval.jsonl", toy_preference_pairs(7, seed=14))
    logs["rm"] = launch("train_rm.py", f"--SFT_DIR={two}/sft", f"--RM_DIR={two}/rm", f"--RUNS_DIR={two}/runs",
                        f"--RM_TRAIN_FILE={rm_train}", f"--RM_EVAL_FILE={rm_eval}", "--RM_BATCH_SIZE=2",
                        "--RM_EPOCHS=1", "--LOG_EVERY=5", "--REPORT_TO=none")

    rng = random.Random(15)  # prompts of 1 to 12 sentences: each rank's batch has its own padded length
    prompts = [{"task_id": f"t{k}", "entry_point": f"add_{k}", "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}],
                "prompt": [{"role": "user", "content": " ".join([f"Write add_{k}(x) returning x plus {k}."] * rng.randint(1, 12))}]}
               for k in range(1, 25)]
    prompts_file = write_jsonl(folder / "ppo.jsonl", prompts)
    tasks = write_jsonl(folder / "tasks.jsonl", [dict(r, prompt=r["prompt"][0]["content"]) for r in prompts[:3]])
    logs["ppo"] = launch("train_ppo.py", f"--SFT_DIR={two}/sft", f"--RM_DIR={two}/rm", f"--PPO_DIR={two}/ppo",
                         f"--RUNS_DIR={two}/runs", f"--PPO_PROMPTS_FILE={prompts_file}", f"--EVAL_TASKS_FILE={tasks}",
                         "--MAX_LEN=256", "--PPO_STEPS=2", "--PPO_BATCH_SIZE=4", "--PPO_MINI_BATCH_SIZE=2",
                         "--PPO_SAMPLES_PER_PROMPT=1", "--PPO_RESPONSE_LEN=16", "--GEN_MAX_NEW_TOKENS=8",
                         "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0", "--REPORT_TO=none")  # evaluated once, at the end
    return {"one": one, "two": two, "logs": logs}


def test_every_stage_runs_on_two_processes(two_process_runs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    two, logs = two_process_runs["two"], two_process_runs["logs"]
    for stage in ("sft", "rm", "ppo"):
        assert f"== {stage} | 2 process(es) on cpu" in logs[stage], logs[stage][-2000:]  # really 2 ranks
        assert os.path.exists(two / stage / "rlhf_stage.json")
    for stage in ("sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(two / stage)
        assert model.config.model_type == "qwen2" and not any("lora" in n for n, _ in model.named_parameters())
    rm = AutoModelForSequenceClassification.from_pretrained(two / "rm")
    assert rm.config.num_labels == 1
    results = json.load(open(two / "ppo" / "eval_results.json"))
    assert 0.0 <= results["pass_at_1"] <= 1.0 and "kl" in results
    history = json.load(open(two / "ppo" / "rlhf_stage.json"))["metrics"]["history"]
    assert [h["step"] for h in history if "kl" in h] == [1, 2]
    # the saved policy is what was trained: it moved away from the SFT weights
    sft, ppo = AutoModelForCausalLM.from_pretrained(two / "sft"), AutoModelForCausalLM.from_pretrained(two / "ppo")
    assert not torch.equal(sft.model.layers[0].mlp.up_proj.weight, ppo.model.layers[0].mlp.up_proj.weight)


def test_two_processes_match_one_with_the_same_global_batch(two_process_runs):
    """SFT, 1 process x batch 4 vs 2 processes x batch 2, same seed, no dropout: the same
    examples in each global batch (same_length_conversations), so the same gradients up to the
    order of float additions. Compared: the logged training loss of every step but the last (that
    one is short, 22 = 5 x 4 + 2, and accelerate fills the 2-process one up by repeating
    examples so both ranks take the same number of steps). Measured here: at most 8e-8
    relative (1.7e-7 over 11 steps with 46 examples): fp32 sums in another order. Tolerance 1e-5 relative leaves room for other CPUs
    and thread counts; a wrong split is far outside it (batches grouped by length with the
    per-device batch, i.e. different examples per step, were 4e-3 off; gradients not averaged
    across ranks change the updates, hence the losses from the second step on). The examples
    have equal lengths, so this does not check how a loss is averaged over uneven token counts."""
    one, two = sft_losses(two_process_runs["one"] / "sft"), sft_losses(two_process_runs["two"] / "sft")
    assert len(one) == len(two) == 6
    torch.testing.assert_close(torch.tensor(two[:-1]), torch.tensor(one[:-1]), rtol=1e-5, atol=0.0)


def test_accelerate_configs_load_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    launch_options = {action.dest for action in launch_command_parser()._actions}
    configs = {os.path.basename(f): load_config_from_file(f) for f in glob.glob(os.path.join(ROOT, "accelerate_configs", "*.yaml"))}
    assert set(configs) == {"cpu.yaml", "ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"}
    for name, cfg in configs.items():
        # nested engine settings become `accelerate launch` options: a misspelt key would be ignored
        unknown = set(cfg.deepspeed_config) | set(cfg.fsdp_config)
        assert unknown <= launch_options, (name, unknown - launch_options)
    assert configs["cpu.yaml"].num_processes == 2 and not configs["cpu.yaml"].use_cpu
    assert configs["deepspeed_zero2.yaml"].deepspeed_config["zero_stage"] == 2
    assert configs["deepspeed_zero3.yaml"].deepspeed_config["zero_stage"] == 3
    assert configs["deepspeed_zero3.yaml"].deepspeed_config["zero3_save_16bit_model"] is True
    assert configs["fsdp.yaml"].distributed_type == DistributedType.FSDP
    assert configs["ddp.yaml"].distributed_type == DistributedType.MULTI_GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
def test_qlora_without_a_gpu_stops_at_the_start(monkeypatch):
    """Checked in start_stage, before data and models load; run_stage prints it as one line."""
    import config as C
    from rlhf.common import start_stage
    from rlhf.settings import UserError

    monkeypatch.setattr(C, "QLORA", True)
    monkeypatch.setattr(C, "USE_LORA", True)
    for stage in ("sft", "ppo"):
        with pytest.raises(UserError) as error:
            start_stage(stage, [])
        assert str(error.value) == ("QLORA=True needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none; "
                                    "use --QLORA=false (--USE_LORA=true alone trains LoRA without quantisation)")


def test_qlora_needs_lora(monkeypatch):
    import config as C
    from rlhf.common import qlora_load_kwargs
    from rlhf.settings import UserError

    monkeypatch.setattr(C, "QLORA", True)
    monkeypatch.setattr(C, "USE_LORA", False)
    with pytest.raises(UserError, match="add --USE_LORA=true"):
        qlora_load_kwargs()
    monkeypatch.setattr(C, "QLORA", False)
    assert qlora_load_kwargs() == {}


def test_merge_lora_weights_matches_merging_in_place(tiny_base):
    """The merge used for QLoRA and for sharded PPO weights gives the in-place merge's model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.common import lora_config, merge_lora_weights

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), lora_config("CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # lora_B starts at 0: a trained adapter is not
    merged = merge_lora_weights(tiny_base, peft_model.state_dict(), dtype=torch.float32)
    expected = peft_model.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).state_dict()
    assert merged.state_dict().keys() == expected.keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the adapter was merged in
    with pytest.raises(RuntimeError, match="LoRA weights missing"):
        merge_lora_weights(tiny_base, {}, dtype=torch.float32)


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true"},
                                 {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_sft_and_rm_refuse_sharded_weights_before_training(monkeypatch, env):
    """SFT and RM evaluate and save on the main process: with ZeRO-3/FSDP shards they would save
    a broken model after the whole run, so they stop at the start instead (PPO gathers)."""
    from rlhf.common import start_stage
    from rlhf.settings import UserError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for stage in ("sft", "rm"):
        with pytest.raises(UserError, match="ddp.yaml or deepspeed_zero2.yaml"):
            start_stage(stage, [])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    start_stage("sft", [])  # ZeRO-2 keeps whole weights on every process


def test_generation_context_unshards_the_fsdp2_root_and_syncs_generate():
    """The FSDP2 branch of full_weights_for_generation on a stand-in for the prepared module (no
    FSDP on a CPU here): the root is unsharded around the generation, resharded after, even when
    generation fails, and transformers' generate sees an FSDP-managed policy (synced_gpus)."""
    from accelerate.utils import DistributedType
    from transformers.distributed.fsdp import is_fsdp_managed_module

    from rlhf.engines import full_weights_for_generation

    calls = []

    class Root(torch.nn.Module):  # what fully_shard leaves: the module, with unshard/reshard added
        def __init__(self):
            super().__init__()
            self.policy, self.critic = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)

        def unshard(self):
            calls.append("unshard")

        def reshard(self):
            calls.append("reshard")

    class Accelerator:
        def __init__(self, kind):
            self.distributed_type = kind

        def unwrap_model(self, model):
            return model

    root = Root()
    with full_weights_for_generation(Accelerator(DistributedType.FSDP), root) as policy:
        calls.append("generate")
        assert policy is root.policy and is_fsdp_managed_module(policy)
    with pytest.raises(RuntimeError), full_weights_for_generation(Accelerator(DistributedType.FSDP), root):
        raise RuntimeError("generation failed")
    assert calls == ["unshard", "generate", "reshard", "unshard", "reshard"]
    plain = Root()
    with full_weights_for_generation(Accelerator(DistributedType.MULTI_CPU), plain) as policy:
        assert policy is plain.policy and not is_fsdp_managed_module(policy)
    assert calls[5:] == []
