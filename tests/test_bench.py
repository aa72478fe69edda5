"""bench/_common.py: the FLOP parameter count behind every MFU figure, the bench options parser
and the matmul peak. Loaded from its file (bench/ is a folder of scripts, not a package). And the
helpers of two bench scripts whose figures the docs quote: bench_mfu's matmul bound, bench_rm_designs'
deeper RM and mirrored pairs."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench", "_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_qwen2(tied):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


def bench_module(name):
    """A bench script, imported from bench/ (a folder of scripts, not a package)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


def test_flop_params_count_the_output_layer_not_the_input_lookup(common):
    tied, untied = tiny_qwen2(True), tiny_qwen2(False)
    embed = 64 * 16
    # tied: the one vocab x hidden matrix is used as the output matmul, so everything counts
    assert common.flop_params(tied) == sum(p.numel() for p in tied.parameters())
    # untied: the separate input table is a lookup and drops out; the output matrix stays
    assert common.flop_params(untied) == sum(p.numel() for p in untied.parameters()) - embed
    assert common.flop_params(untied) == common.flop_params(tied)


def test_own_options_split_bench_options_from_config_overrides(common):
    own, rest = common.own_options(["--steps=5", "--LR=1e-4", "--quick", "--only=sft"],
                                   {"steps": 20, "quick": False, "only": "all"})
    assert own == {"steps": 5, "quick": True, "only": "sft"}
    assert rest == ["--LR=1e-4"]


def test_matmul_peak_is_a_positive_rate_per_size(common):
    best, per_size = common.matmul_peak(sizes=(64, 128), repeats=2)
    assert set(per_size) == {64, 128}
    assert best == max(per_size.values()) > 0


def test_a_bench_script_imports_the_checkout_it_lives_in(tmp_path):
    """A bench run from a second checkout (a worktree of an older commit) must measure that
    checkout's config and rlhf, not the copy installed in the environment."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "bench").mkdir()
    shutil.copy(os.path.join(ROOT, "bench", "_common.py"), tmp_path / "bench" / "_common.py")
    (tmp_path / "config.py").write_text("WHERE = 'the other checkout'\n")
    (tmp_path / "bench" / "probe.py").write_text("import _common\nimport config\nprint(config.WHERE)\n")
    out = subprocess.run([sys.executable, str(tmp_path / "bench" / "probe.py")], capture_output=True, text=True,
                         cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the other checkout"


def test_sft_gemm_bound_times_every_weight_matrix_once_and_the_head_on_answers_only():
    """bench_mfu.gemm_ceiling (the bound on SFT's MFU): each linear layer's three products at the
    step's positions, the tied vocabulary head at the answer positions only."""
    model = tiny_qwen2(True)
    seconds, flops = bench_module("bench_mfu").gemm_ceiling(model, rows=10, answer_rows=4, repeats=2)
    head = 64 * 16
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2) - head  # tied: one vocab matrix
    assert flops == 6 * (10 * matrices + 4 * head)
    assert seconds > 0


def test_deepened_model_starts_as_the_model_it_extends(tmp_path):
    """bench_rm_designs.deepen: the new layers add nothing until trained, so the deeper RM starts
    where the shallow one does; the tokenizer files travel with it."""
    import torch
    from transformers import AutoModelForCausalLM

    bench_rm_designs = bench_module("bench_rm_designs")
    model = tiny_qwen2(True)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    bench_rm_designs.deepen(str(tmp_path / "src"), str(tmp_path / "dst"), 2)
    deeper = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert deeper.config.num_hidden_layers == 3 and (tmp_path / "dst" / "tokenizer.json").exists()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(deeper(ids).logits, model.eval()(ids).logits, atol=1e-6)
        deeper.model.layers[2].mlp.down_proj.weight.fill_(0.1)  # and a trained new layer does change them
        assert not torch.allclose(deeper(ids).logits, model(ids).logits, atol=1e-3)


@pytest.fixture(scope="module")
def rm_designs():
    """bench_rm_designs, the bundled RM pairs and the data split behind them."""
    from rlhf.data import read_jsonl

    module = bench_module("bench_rm_designs")
    bundled = read_jsonl(os.path.join(ROOT, "data", "rm_train.jsonl"))
    families, parts = module.training_split(0)
    assert {p["task_id"] for p in bundled} == {t["task_id"] for t in parts["rm_train"]}  # the split behind the file
    return module, bundled, families, parts


def program(pair, side):
    """A pair's program with its function name replaced: two prompts may name it differently."""
    return pair[side][-1]["content"].replace(pair["task_id"].split("/")[2], "NAME")


def test_mirrored_pairs_swap_the_two_programs_between_two_training_prompts(rm_designs):
    """bench_rm_designs' `mirrored` pairs: for each bundled `wrong_value` pair (prompt of variant a,
    program a over program b) a training prompt of variant b with program b over program a."""
    module, bundled, families, parts = rm_designs
    mirrors = module.extra_pairs("mirrored", bundled, families, parts)
    originals = [p for p in bundled if p["bug"] == "wrong_value"]
    assert len(mirrors) > 0.9 * len(originals)
    sft_ids = {t["task_id"] for t in parts["sft_train"]}
    swapped = {(program(p, "rejected"), program(p, "chosen")) for p in originals}
    for m in mirrors:
        assert m["task_id"] in sft_ids and m["bug"] == "wrong_value"
        assert (program(m, "chosen"), program(m, "rejected")) in swapped


def test_prompt_swap_pairs_differ_in_the_prompt_alone(rm_designs):
    """bench_rm_designs' `prompt_swap` pairs: a bundled `wrong_value` pair's chosen program under its
    own prompt (chosen) and under a training prompt of the variant whose program it rejected."""
    from scripts import build_data

    module, bundled, families, parts = rm_designs
    originals = {p["task_id"]: p for p in bundled if p["bug"] == "wrong_value"}
    prompts = {t["prompt"]: t for t in parts["sft_train"]}
    swaps = module.extra_pairs("prompt_swap", bundled, families, parts)
    assert len(swaps) > 0.5 * len(originals)
    for s in swaps:
        (asked, answer), (other, same) = s["chosen"], s["rejected"]
        original = originals[s["task_id"]]
        assert answer == same == original["chosen"][0] and asked == original["prompt"][0]
        swapped_in = prompts[other["content"]]  # a training prompt, same family and function name
        assert (swapped_in["family"], swapped_in["entry_point"]) == (s["family"], s["task_id"].split("/")[2])
        assert program(original, "rejected") == build_data.fenced(swapped_in["solution"]).replace(
            swapped_in["entry_point"], "NAME")  # of the variant whose program the original pair rejected


# ---------------------------------------------------------------------------------------------
# bench_seeds: SFT seeds x PPO seeds, the stages run once each, the mean and spread of the figures
# ---------------------------------------------------------------------------------------------

def fake_figures(sft_seed, ppo_seed):
    """The figures a run's report.json gives in the fake below: SFT pass@1 0.3 + 0.01 x SFT seed,
    PPO + 0.02 x PPO seed on top."""
    sft = 0.3 + 0.01 * sft_seed
    return sft, sft + 0.02 * ppo_seed


@pytest.fixture
def seeds_bench(monkeypatch, tmp_path):
    """bench_seeds with its stage runs faked: each writes what the real one leaves (a finished model
    folder; for the pipeline, the PPO model and a report.json); returns (module, the commands run)."""
    import json

    import config as C
    from rlhf.settings import settings

    for name, value in settings().items():  # main() applies its overrides to config: undone after the test
        monkeypatch.setattr(C, name, value)
    module = bench_module("bench_seeds")
    monkeypatch.setattr(module._common, "RESULTS_DIR", str(tmp_path / "results"))
    commands = []

    def run(cmd, log):
        commands.append(cmd)
        args = dict(a[2:].split("=", 1) for a in cmd[2:] if a.startswith("--") and "=" in a)
        script = os.path.basename(cmd[1])
        folder = {"train_sft.py": args["SFT_DIR"], "train_rm.py": args["RM_DIR"], "pipeline.py": args.get("PPO_DIR")}[script]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "rlhf_stage.json"), "w") as f:
            f.write("{}")
        if script == "pipeline.py":
            sft_seed = int(args["SFT_DIR"].split("sft_seed")[1].split(os.sep)[0])
            sft, ppo = fake_figures(sft_seed, int(args["SEED"]))

            def fig(mean):
                return {"mean": mean, "low": mean - 0.1, "high": mean + 0.1, "tasks": 40, "variants": 12}

            groups = {"held_out": {"label": "held-out: all", "sft": fig(sft), "ppo": fig(ppo), "gain": fig(ppo - sft)},
                      "held_out_habit": {"label": "held-out: planted-habit families", "sft": fig(sft), "ppo": None,
                                         "gain": None}}
            os.makedirs(args["reports"], exist_ok=True)
            with open(os.path.join(args["reports"], "report.json"), "w") as f:
                json.dump({"pass_at_1": {"groups": groups, "notes": [f"a note on {args['PPO_DIR']}"]},
                           "sft": {"pass_at_1": sft, "pass_at_8": sft + 0.2}, "ppo": {"pass_at_1": ppo, "pass_at_8": ppo + 0.1},
                           "machine": {"cpus": 2}, "created": "now", "seconds": {"ppo": 1.0}}, f)

    monkeypatch.setattr(module, "run", run)
    return module, commands


def test_bench_seeds_trains_each_sft_seed_once_and_ppo_per_seed_pair(seeds_bench, tmp_path):
    import json

    module, commands = seeds_bench
    out = tmp_path / "out"
    result = module.main([f"--out={out}", "--sft_seeds=1,2", "--ppo_seeds=3,4", "--PPO_STEPS=5"])
    scripts = [(os.path.basename(c[1]), next(a for a in c if a.startswith("--SEED="))) for c in commands]
    assert scripts == [("train_sft.py", "--SEED=1"), ("train_rm.py", "--SEED=1"), ("pipeline.py", "--SEED=3"),
                       ("pipeline.py", "--SEED=4"), ("train_sft.py", "--SEED=2"), ("train_rm.py", "--SEED=2"),
                       ("pipeline.py", "--SEED=3"), ("pipeline.py", "--SEED=4")]
    assert all("--PPO_STEPS=5" in c for c in commands)  # stage overrides reach every run
    sft = commands[0]  # the embedded base model: one per SFT seed, so the seed sets its initialisation
    assert f"--BASE_MODEL_DIR={out}/sft_seed1/base_model" in sft and f"--MODEL_NAME={out}/sft_seed1/base_model" in sft
    assert f"--SFT_DIR={out}/sft_seed2/sft_model" in commands[7] and f"--PPO_DIR={out}/sft_seed2/ppo_seed4/ppo_model" in commands[7]
    summary = result["summary"]
    values = {(s, p): fake_figures(s, p) for s in (1, 2) for p in (3, 4)}
    # SFT figures count once per SFT model, PPO figures and the gain once per run
    assert summary["held_out/sft"]["runs"] == 2 and summary["held_out/sft"]["mean"] == pytest.approx(0.315)
    assert summary["held_out/ppo"]["runs"] == 4
    assert summary["held_out/ppo"]["mean"] == pytest.approx(sum(v[1] for v in values.values()) / 4)
    assert (summary["held_out/ppo"]["min"], summary["held_out/ppo"]["max"]) == (pytest.approx(0.37), pytest.approx(0.40))
    gain = summary["held_out/gain"]
    assert gain["mean"] == pytest.approx(0.07) and gain["std"] == pytest.approx(0.011547, abs=1e-6)  # 0.06, 0.08 twice
    assert gain["between_sft_seeds_std"] == pytest.approx(0.0) and gain["within_sft_seed_std"] == pytest.approx(0.014142, abs=1e-6)
    assert summary["held_out_habit/ppo"] is None and summary["held_out_habit/sft"]["runs"] == 2
    assert summary["sampled/sft_pass_at_8"]["runs"] == 2 and summary["sampled/ppo_pass_at_8"]["runs"] == 4
    with open(out / "bench_seeds.json") as f:  # with the machine and date of the bench and of each run
        saved = json.load(f)
    assert saved["date"] and saved["machine"] and saved["runs"][0]["machine"] == {"cpus": 2}
    assert saved["summary"]["held_out/gain"]["mean"] == pytest.approx(0.07)
    assert (tmp_path / "results" / "bench_seeds.json").exists()


def test_bench_seeds_resumes_skipping_the_runs_whose_output_exists(seeds_bench, tmp_path):
    module, commands = seeds_bench
    argv = [f"--out={tmp_path / 'out'}", "--sft_seeds=1,2", "--ppo_seeds=3"]
    first = module.main(argv)
    commands.clear()
    assert module.main(argv)["summary"] == first["summary"] and commands == []  # nothing to run again
    os.remove(tmp_path / "out" / "sft_seed2" / "ppo_seed3" / "reports" / "report.json")  # a run that stopped
    module.main(argv)
    assert [os.path.basename(c[1]) for c in commands] == ["pipeline.py"] and "--SEED=3" in commands[0]


def test_bench_seeds_refuses_a_seed_or_folder_setting_it_sets_itself(seeds_bench, tmp_path):
    from rlhf.settings import UserError

    module, commands = seeds_bench
    with pytest.raises(UserError, match="--SEED is set by the bench for each run"):
        module.main([f"--out={tmp_path}", "--SEED=7"])
    with pytest.raises(UserError, match="comma lists of integers"):
        module.main([f"--out={tmp_path}", "--sft_seeds=1,x"])
    assert commands == []


# ---------------------------------------------------------------------------------------------
# bench_vs_trl_grpo: our grpo against TRL's GRPOTrainer, each in its own process
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_vs_trl_grpo_runs_both_sides_end_to_end(ppo_inputs, monkeypatch, tmp_path):
    """One iteration a side on the tiny models: both train the same iterations, split their time into
    generation, tests, update and the rest, and their final policies are evaluated alike."""
    import json

    import config as C
    from rlhf.settings import settings

    for name, value in settings().items():  # main() applies its overrides to config: undone after the test
        monkeypatch.setattr(C, name, value)
    module = bench_module("bench_vs_trl_grpo")
    monkeypatch.setattr(module._common, "RESULTS_DIR", str(tmp_path))
    inp = ppo_inputs
    result = module.main(["--seeds=3", "--steps=1", f"--tasks={inp['tasks']}", f"--SFT_DIR={inp['sft']}",
                          f"--RM_DIR={inp['rm']}", f"--PPO_PROMPTS_FILE={inp['prompts']}", "--MAX_LEN=128",
                          "--PPO_BATCH_SIZE=8", "--PPO_MINI_BATCH_SIZE=4", "--PPO_EPOCHS=2", "--PPO_RESPONSE_LEN=12",
                          "--GEN_MAX_NEW_TOKENS=12", "--REPORT_TO=none"])
    from rlhf.common import load_tokenizer
    from rlhf.ppo_setup import load_prompts, step_prompts

    prompts = load_prompts(inp["prompts"], load_tokenizer(inp["sft"]), 128 - 12)
    numbered = [dict(p, row=i) for i, p in enumerate(prompts)]
    # TRL answered the prompts train_ppo draws in its first iteration (2 prompts x 4 answers), in its order
    assert result["theirs"][0]["prompts_scored"] == [p["row"] for p in step_prompts(numbered, 1, 0, 2, seed=3,
                                                                                     samples_per_prompt=4)]
    for side in ("ours", "theirs"):
        (run,) = result[side]
        assert run["seed"] == 3 and len(run["iterations"]) == 1  # TRL: max_steps = 1 iteration's optimizer steps
        split = run["seconds_per_iteration"]
        assert all(split[k] > 0 for k in ("seconds", "generate", "reward", "update"))
        assert split["other"] >= 0 and run["episodes_per_second"] == pytest.approx(8 / split["seconds"])
        assert 0 <= run["pass_at_1"] <= 1 and run["peak_rss_mib"] > 100
    ours, theirs = (result[side][0]["episodes_per_second"] for side in ("ours", "theirs"))
    assert result["ratio"] == pytest.approx(ours / theirs)
    with open(tmp_path / "vs_trl_grpo.json") as f:
        assert json.load(f)["overrides"][:2] == ["--PPO_ADVANTAGE=grpo", "--PPO_OVERSAMPLE=1"]


def test_trl_side_refuses_a_setting_grpo_trainer_has_no_counterpart_for(monkeypatch):
    import config as C
    from rlhf.settings import UserError

    trl_side = bench_module("_trl_grpo")
    monkeypatch.setattr(C, "PPO_KL_LOSS", True)
    monkeypatch.setattr(C, "PPO_KL_ESTIMATOR", "k3")
    monkeypatch.setattr(C, "PPO_OVERSAMPLE", 1)
    monkeypatch.setattr(C, "PPO_SIL_COEF", 0.0)
    monkeypatch.setattr(C, "PPO_PENALIZE_MISSING_EOS", False)
    config = trl_side.grpo_config("/tmp/out", 3)
    assert config["max_steps"] == 3 * C.PPO_EPOCHS * C.PPO_BATCH_SIZE // C.PPO_MINI_BATCH_SIZE
    assert (config["loss_type"], config["scale_rewards"], config["beta"]) == ("dapo", "group", C.PPO_KL_COEF)
    monkeypatch.setattr(C, "PPO_PENALIZE_MISSING_EOS", True)
    with pytest.raises(UserError, match="PPO_PENALIZE_MISSING_EOS"):
        trl_side.grpo_config("/tmp/out", 3)


def test_grpo_bench_pairs_each_iteration_with_its_sampled_pass_rate(monkeypatch, tmp_path):
    """bench_vs_trl_grpo: TRL's side logs one reward mean an iteration (and a last log without one),
    ours records test_pass_rate in its history (an evaluation row has no timings); each side's
    sampled pass rate is the mean over its iterations, and a count that does not match is an error."""
    import json

    import config as C

    module = bench_module("bench_vs_trl_grpo")
    monkeypatch.setattr(C, "PPO_BATCH_SIZE", 32)
    timing = {"iterations": [{"seconds": 8.0, "generate": 2.0, "reward": 1.0, "rollout": 4.0},
                             {"seconds": 6.0, "generate": 1.0, "reward": 0.5, "rollout": 3.0}],
              "logs": [{"rewards/unit_tests/mean": 0.25, "loss": 0.1}, {"rewards/unit_tests/mean": 0.75},
                       {"train_runtime": 14.0}], "prompts_scored": [0, 1], "peak_rss_mib": 900.0}
    (tmp_path / "trl_timing.json").write_text(json.dumps(timing))
    monkeypatch.setattr(module.subprocess, "run", lambda *a, **kw: None)
    theirs = module.run_theirs(str(tmp_path), 2, [])
    assert theirs["train_pass_rate"] == pytest.approx(0.5)
    assert theirs["episodes_per_second"] == pytest.approx(32 / 6.0)  # the first iteration is the warm-up
    assert theirs["seconds_per_iteration"]["update"] == pytest.approx(3.0)  # the iteration less the rollout
    timing["logs"] = timing["logs"][1:]  # a reward missing: which iteration it belongs to is unknown
    (tmp_path / "trl_timing.json").write_text(json.dumps(timing))
    with pytest.raises(ValueError):
        module.run_theirs(str(tmp_path), 2, [])

    history = [{"step": 0, "eval_pass_at_1": 0.3},
               {"seconds": 3.0, "generate_seconds": 1.0, "reward_seconds": 0.5, "update_seconds": 1.0, "test_pass_rate": 0.5},
               {"seconds": 2.0, "generate_seconds": 0.5, "reward_seconds": 0.5, "update_seconds": 0.5, "test_pass_rate": 0.7}]
    monkeypatch.setattr(module._common, "run_train_ppo", lambda out, steps, overrides: history)
    (tmp_path / "ppo_model").mkdir()
    (tmp_path / "ppo_model" / "rlhf_stage.json").write_text(json.dumps({"metrics": {"peak_rss_mib": 700.0}}))
    ours = module.run_ours(str(tmp_path), 2, [])
    assert ours["train_pass_rate"] == pytest.approx(0.6) and len(ours["iterations"]) == 2
    assert ours["seconds_per_iteration"]["other"] == pytest.approx(0.5)  # 2.0 - 0.5 - 0.5 - 0.5
