"""Several processes: every stage under `accelerate launch` with 2 CPU processes (gloo,
accelerate_configs/cpu.yaml), 2-process SFT losses against 1 process with the same global batch,
no rank left waiting when the ranks' data differ, PPO under FSDP2 (fully_shard on CPU) against
DDP, the accelerate configs, the DeepSpeed config of the frozen models, and QLoRA's message on a
machine without a GPU. DeepSpeed itself, bf16 and QLoRA need GPUs: not run here. The launch
helpers and the two_process_runs fixture are in conftest.py (tests/test_multinode.py uses them)."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, expected_last_lrs, launch, ppo_history, sft_losses

FSDP_CONFIG = os.path.join(ROOT, "accelerate_configs", "fsdp.yaml")
ZERO3_CONFIG = os.path.join(ROOT, "accelerate_configs", "deepspeed_zero3.yaml")
# deepspeed is an extra (pip install -e ".[deepspeed]"), not in CI: it skips these; run them where it is installed
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

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


def test_ppo_learning_rate_decays_over_the_whole_run_on_two_processes(two_process_runs):
    """Linear decay to 0 over the run's updates, as on one process (test_ppo.py): accelerate steps
    a prepared scheduler once per process each time unless told otherwise, and the rate was 0 from
    halfway through on 2 processes (from a quarter on 4)."""
    import config as C

    history = json.load(open(two_process_runs["two"] / "ppo" / "rlhf_stage.json"))["metrics"]["history"]
    updates_per_step = C.PPO_EPOCHS * 4 // 2  # PPO_BATCH_SIZE=4, PPO_MINI_BATCH_SIZE=2 (two_process_runs)
    assert [h["lr"] for h in history if "kl" in h] == pytest.approx(expected_last_lrs(C.PPO_LR, 2, updates_per_step))


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
    from rlhf.settings import UserError, check_values

    monkeypatch.setattr(C, "QLORA", True)  # the settings check_values checks
    monkeypatch.setattr(C, "USE_LORA", False)
    with pytest.raises(UserError, match="add --USE_LORA=true"):
        check_values()
    assert qlora_load_kwargs(False) == {}


def test_merge_lora_weights_matches_merging_in_place(tiny_base):
    """The merge used for QLoRA and for sharded PPO weights gives the in-place merge's model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import config as C
    from rlhf.common import lora_config, merge_lora_weights

    torch.manual_seed(0)
    lora = lora_config("CAUSAL_LM", C)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # lora_B starts at 0: a trained adapter is not
    merged = merge_lora_weights(tiny_base, peft_model.state_dict(), lora, torch.float32)
    expected = peft_model.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).state_dict()
    assert merged.state_dict().keys() == expected.keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the adapter was merged in
    with pytest.raises(RuntimeError, match="LoRA weights missing"):
        merge_lora_weights(tiny_base, {}, lora, torch.float32)


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


def assert_ppo_matches_ddp(two_process_runs, ppo_dir):
    """The PPO run in ppo_dir logged the figures and saved the weights of two_process_runs' DDP run
    (same settings), within the tolerances measured in test_ppo_under_fsdp2_on_cpu_matches_ddp."""
    from transformers import AutoModelForCausalLM

    two = two_process_runs["two"]
    ddp, sharded = ppo_history(two / "ppo"), ppo_history(ppo_dir)
    assert [h["step"] for h in sharded if "kl" in h] == [1, 2]
    for key in ("policy_loss", "value_loss", "kl", "score", "entropy", "approx_kl"):
        # atol: the policy loss is a mean of terms of both signs, the KL a difference of sums
        torch.testing.assert_close(torch.tensor([h[key] for h in sharded if key in h]),
                                   torch.tensor([h[key] for h in ddp if key in h]), rtol=1e-5,
                                   atol=1e-5 if key == "kl" else 1e-7, msg=key)
    assert "pass_at_1" in json.load(open(ppo_dir / "eval_results.json"))
    sft = AutoModelForCausalLM.from_pretrained(two / "sft").state_dict()
    want = AutoModelForCausalLM.from_pretrained(two / "ppo").state_dict()
    got = AutoModelForCausalLM.from_pretrained(ppo_dir).state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert not torch.equal(got[name], sft[name]), f"{name} was not trained"
        torch.testing.assert_close(got[name], want[name], rtol=0.0, atol=1e-7, msg=name)


def test_ppo_under_fsdp2_on_cpu_matches_ddp(two_process_runs, tmp_path):
    """train_ppo.py under FSDP2 (accelerate_configs/fsdp.yaml, fully_shard over gloo on 2 CPU
    processes; tests/sharded_on_cpu.py says why it needs a wrapper) against the same run under DDP
    (two_process_runs). Exercised for real: generation from the sharded policy
    (full_weights_for_generation: the root's hooks, unshard/reshard, synced generate), the
    gradient clipping on the prepared (sharded) parameters, the final evaluation on all ranks and
    the gathered save (plain_policy). accelerate's transformer-based wrap must make every decoder
    block a shard unit of its own (from PolicyAndCritic._no_split_modules), not one unit for all.

    Same seeds, same rollouts, same updates: only the order of float sums differs (reduce-scatter
    of shards vs all-reduce). Measured: saved weights within 4e-9 of DDP's (the policy moved
    6e-5 or more in every tensor), losses within 3e-6 relative, the KL of step 2 within 2e-7
    (a sum over 16 tokens of differences of log-probabilities near -6: fp32 rounding, hence its
    absolute tolerance of 1e-5). What this catches, measured on the same toy: a clipping that does
    nothing (the norm of parameters the optimizer does not hold) moves the value loss by 1e-4
    relative and the weights by 1.3e-6; parameters left out of training (the tied embeddings under
    fsdp_cpu_ram_efficient_loading: true, accelerate 1.15) keep their SFT values exactly."""
    out = tmp_path / "fsdp2"
    log = launch("tests/sharded_on_cpu.py", os.path.join(ROOT, "train_ppo.py"), *two_process_runs["ppo_args"],
                 f"--PPO_DIR={out}/ppo", f"--RUNS_DIR={out}/runs", config=FSDP_CONFIG, log_dir=tmp_path,
                 launch_options=["--mixed_precision", "no"])
    assert "== ppo | 2 process(es) on cpu" in log, log[-3000:]
    units = re.search(r"fsdp2 units: (.*)", log).group(1).split(", ")
    assert units[0] == "<root>" and "policy.model.layers.1" in units and "critic.model.layers.1" in units, units

    assert_ppo_matches_ddp(two_process_runs, out / "ppo")


def test_frozen_model_deepspeed_config():
    """PPO_SHARD_FROZEN_MODELS: the config of the inference-only engine for the reference and
    reward model (deepspeed itself is not needed to build it; not installed here)."""
    from rlhf.engines import frozen_model_deepspeed_config

    train = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}},
             "scheduler": {"type": "WarmupLR"},
             "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                                   "stage3_gather_16bit_weights_on_model_save": True}}
    frozen = frozen_model_deepspeed_config(train, hidden_size=1536)  # Qwen2.5-Coder-1.5B
    assert frozen["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"},
                                           "stage3_gather_16bit_weights_on_model_save": True,
                                           "reduce_bucket_size": 1536 ** 2, "stage3_prefetch_bucket_size": int(0.9 * 1536 ** 2),
                                           "stage3_param_persistence_threshold": 15360}
    assert "optimizer" not in frozen and "scheduler" not in frozen
    assert frozen["bf16"] == {"enabled": True} and frozen["train_micro_batch_size_per_gpu"] == 8
    assert train["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and "optimizer" in train  # not changed
    # before accelerator.prepare the plugin's config still says "auto" for what only training uses
    unfilled = dict(train, train_batch_size="auto", gradient_accumulation_steps="auto", gradient_clipping="auto",
                    train_micro_batch_size_per_gpu="auto")
    frozen = frozen_model_deepspeed_config(unfilled, hidden_size=1536)
    assert "auto" not in json.dumps(frozen) and frozen["train_micro_batch_size_per_gpu"] == 1
    for stage in (0, 1, 2):  # whole weights on every GPU: a frozen model has no optimizer state or gradient to shard
        zero2 = dict(train, zero_optimization={"stage": stage, "offload_optimizer": {"device": "cpu"}})
        assert frozen_model_deepspeed_config(zero2, hidden_size=64)["zero_optimization"] == {"stage": 0}


def test_shard_frozen_model_leaves_models_alone_without_deepspeed():
    from types import SimpleNamespace

    from rlhf.engines import shard_frozen_model

    model = torch.nn.Linear(2, 2)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))  # DDP, FSDP, one process
    assert shard_frozen_model(accelerator, model) is model


@NEEDS_DEEPSPEED
def test_shard_frozen_model_under_zero3_on_cpu(tiny_base, tmp_path):
    """shard_frozen_model for real, where deepspeed is installed (an extra, `.[deepspeed]`,
    so CI skips this): 2 CPU processes over gloo, ZeRO-3. Each holds half of the frozen model's
    weights (ZeRO-3 pads each tensor to a multiple of the processes), and its forward gives the
    plain model's logits."""
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "zero3_frozen_on_cpu.py"), tiny_base]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = re.findall(r"rank (\d): holds (\d+) of (\d+) weights, max \|logits - plain\| (\S+)", proc.stdout)
    assert sorted(r[0] for r in ranks) == ["0", "1"], proc.stdout[-2000:]
    for _, held, total, diff in ranks:
        assert int(total) / 2 <= int(held) <= int(total) / 2 + 1000  # half, plus padding
        assert float(diff) < 1e-5


@NEEDS_DEEPSPEED
def test_ppo_under_zero3_on_cpu_matches_ddp(two_process_runs, tmp_path):
    """train_ppo.py under DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml) with
    PPO_SHARD_FROZEN_MODELS=true, on 2 CPU processes (tests/sharded_on_cpu.py), against DDP.
    Exercised: the policy gathered once for generation with ZeRO-3's hooks off
    (full_weights_for_generation), DeepSpeed's own gradient clipping, the reference and reward
    model as inference-only ZeRO-3 engines (shard_frozen_model), the gathered save (plain_policy,
    whole_models_loaded). Measured: saved weights within 4e-9 of DDP's, as under FSDP2."""
    out = tmp_path / "zero3"
    log = launch("tests/sharded_on_cpu.py", os.path.join(ROOT, "train_ppo.py"), *two_process_runs["ppo_args"],
                 "--PPO_SHARD_FROZEN_MODELS=true", f"--PPO_DIR={out}/ppo", f"--RUNS_DIR={out}/runs",
                 config=ZERO3_CONFIG, log_dir=tmp_path, launch_options=["--mixed_precision", "no"])
    assert "deepspeed engine: zero stage 3" in log, log[-3000:]
    assert_ppo_matches_ddp(two_process_runs, out / "ppo")


def test_whole_models_loaded_unregisters_the_zero3_config_meanwhile():
    """While accelerate's ZeRO-3 config is registered with transformers, from_pretrained
    partitions what it loads (deepspeed.zero.Init); whole_models_loaded lifts that and restores
    it, also when the loading fails."""
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    from rlhf.engines import whole_models_loaded

    class Registered:  # accelerate's HfDeepSpeedConfig, reduced to what transformers asks of it
        def is_zero3(self):
            return True

    registered = Registered()
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(dschf=registered)))
    set_hf_deepspeed_config(registered)
    try:
        assert is_deepspeed_zero3_enabled()
        with whole_models_loaded(accelerator):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(OSError), whole_models_loaded(accelerator):
            raise OSError("no model there")
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
    with whole_models_loaded(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))):  # DDP, FSDP
        assert not is_deepspeed_zero3_enabled()
