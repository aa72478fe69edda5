"""train_dpo.py as a user runs it on a tiny model: the hand-off (a folder transformers loads, with
the SFT tokenizer and chat template, the stage info and card), learning (the implicit reward
separates held-out pairs), resume after a kill, the one-line errors, an online round whose pairs
are the model's own answers as the tests label them, and the loss names checked against TRL's.
DPO on each model family: tests/test_model_families.py::test_every_stage_runs_on_the_family."""

import json
import os
import re

import pytest

from conftest import kill_after_first_checkpoint, launch, run_script, toy_tasks, write_jsonl


def dpo_args(sft, pairs, out, *extra):
    return [f"--SFT_DIR={sft}", f"--DPO_DIR={out / 'dpo_model'}", f"--RUNS_DIR={out / 'runs'}",
            f"--RM_TRAIN_FILE={pairs['rm_train']}", f"--RM_EVAL_FILE={pairs['rm_eval']}", f"--EVAL_TASKS_FILE={pairs['tasks']}",
            "--SEED_PROMPT_SAMPLES=0", "--EVAL_SAMPLES=2", "--GEN_MAX_NEW_TOKENS=8", "--DPO_BATCH_SIZE=8", "--LOG_EVERY=2",
            "--REPORT_TO=none", *extra]


def sequence_logps(model, tok, pairs, side):
    """Summed log-probabilities of each pair's `side` answer given its prompt (what DPO's log-ratios add up)."""
    import torch

    out = []
    for p in pairs:
        prompt = tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
        full = tok.apply_chat_template(p["prompt"] + p[side], tokenize=True)["input_ids"]
        with torch.no_grad():
            logps = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(full[1:])
        out.append(logps.gather(-1, targets[:, None])[len(prompt) - 1:].sum().item())
    return torch.tensor(out)


@pytest.fixture(scope="module")
def dpo_run(tiny_sft, toy_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    proc = run_script("train_dpo.py", *dpo_args(tiny_sft, toy_pairs, out, "--DPO_EPOCHS=3", "--DPO_LR=5e-3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_dpo_hands_off_a_model_transformers_loads(dpo_run, tiny_sft, toy_pairs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf.common import end_of_turn_ids

    out, proc = dpo_run
    folder = out / "dpo_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok, sft_tok = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_sft)
    assert tok.chat_template and tok.chat_template == sft_tok.chat_template and len(tok) == len(sft_tok)
    assert model.config.vocab_size >= len(tok)
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    assert set(end_of_turn_ids(tok)) <= set(stops if isinstance(stops, list) else [stops])
    info = json.load(open(folder / "rlhf_stage.json"))
    assert info["stage"] == "dpo" and info["inputs"]["sft"]["path"] == tiny_sft and info["sft_model"] == tiny_sft
    assert info["inputs"]["sft"]["finished_at"] == json.load(open(os.path.join(tiny_sft, "rlhf_stage.json")))["finished_at"]
    assert info["settings"]["DPO_LOSS_TYPE"] == "sigmoid" and info["settings"]["DPO_EPOCHS"] == 3
    metrics = json.load(open(folder / "eval_results.json"))
    assert metrics["rounds"] == 0 and metrics["pairs"] == 48 and metrics["online_pairs"] == 0
    assert 0.0 <= metrics["pass_at_1"] <= 1.0 and 0.0 <= metrics["pass_at_2"] <= 1.0 and metrics["eval_tasks"] == 3
    answers = [json.loads(line) for line in open(folder / "eval_results.jsonl")]  # what the report reads
    assert sorted(a["task_id"] for a in answers) == ["t1", "t2", "t3"] and all("passed" in a for a in answers)
    card = (folder / "README.md").read_text()
    assert "direct preference optimisation (DPO)" in card and "train_dpo.py" in card and "`DPO_BETA`" in card
    assert not (out / "runs" / "dpo" / "checkpoints").exists()  # finished: checkpoints removed
    assert re.search(r"dpo round 1 step \d+/18 \| loss ", proc.stdout)


def test_dpo_makes_the_chosen_answers_likelier_than_the_rejected_on_held_out_pairs(dpo_run, tiny_sft, toy_pairs):
    """The implicit reward beta * log(pi / ref) of the chosen answer rises above the rejected one's on
    pairs it never trained on: computed here from the two saved models, and as the stage logged it."""
    from transformers import AutoModelForCausalLM

    from rlhf.common import load_tokenizer
    from rlhf.data import load_preference_pairs

    out, _ = dpo_run
    tok = load_tokenizer(tiny_sft)
    pairs = load_preference_pairs(toy_pairs["rm_eval"])
    dpo, sft = (AutoModelForCausalLM.from_pretrained(f).eval() for f in (out / "dpo_model", tiny_sft))
    margin = ((sequence_logps(dpo, tok, pairs, "chosen") - sequence_logps(sft, tok, pairs, "chosen"))
              - (sequence_logps(dpo, tok, pairs, "rejected") - sequence_logps(sft, tok, pairs, "rejected")))
    assert (margin > 0).float().mean() >= 0.9, margin
    metrics = json.load(open(out / "dpo_model" / "eval_results.json"))
    assert metrics["eval_reward_accuracy"] >= 0.9 and metrics["eval_reward_margin"] > 0
    assert metrics["eval_reward_margin"] == pytest.approx(0.1 * margin.mean().item(), rel=0.05)  # beta 0.1


def test_interrupted_dpo_resumes_from_its_checkpoint(tiny_sft, toy_pairs, tmp_path):
    """Killed once a complete checkpoint exists, the same command resumes from it and finishes."""
    from transformers import AutoModelForCausalLM

    args = dpo_args(tiny_sft, toy_pairs, tmp_path, "--DPO_EPOCHS=4", "--EVAL_EVERY=2", "--EVAL_SAMPLES=0")
    folder = tmp_path / "runs" / "dpo" / "checkpoints" / "round_1" / "checkpoints"
    checkpoint = kill_after_first_checkpoint("train_dpo.py", args, folder)
    assert not (tmp_path / "dpo_model").exists()  # killed before the end
    step = int(checkpoint.rsplit("-", 1)[1])

    proc = run_script("train_dpo.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = re.search(rf"resuming from {folder}/checkpoint-(\d+) \(step (\d+)\)", proc.stdout)
    assert resumed and int(resumed.group(2)) >= step >= 2, proc.stdout[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo_model")
    logged = [int(n) for n in re.findall(r"dpo round 1 step (\d+)/", proc.stdout)]
    assert logged and min(logged) > step  # this run trained only the steps after the checkpoint
    assert not (tmp_path / "runs" / "dpo" / "checkpoints").exists()


def test_user_errors_are_one_line_before_anything_is_written(tiny_sft, toy_pairs, tmp_path, run_in_process):
    from rlhf.handoff import save_stage_output
    from rlhf.settings import scalar_settings

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Write add_1(x).", "chosen": "x + 1"}])  # no `rejected`
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Write add_1(x)."}])  # prompts without tests
    finished = tmp_path / "finished"
    save_stage_output(str(finished), "dpo", lambda tmp: None, {}, scalar_settings())
    for extra, message in (
            ([f"--SFT_DIR={tmp_path / 'nowhere'}"], f"{tmp_path / 'nowhere'} does not exist: run `python train_sft.py` first"),
            ([f"--DPO_TRAIN_FILE={bad}"], f"{bad}:1: missing field `rejected`"),
            ([f"--DPO_EVAL_FILE={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
            (["--DPO_LOSS_TYPE=sigmoidd"], "DPO_LOSS_TYPE: unknown loss 'sigmoidd'; TRL's DPOConfig has sigmoid, "),
            (["--DPO_LOSS_TYPE=exo_pair"], "exo_pair needs --DPO_LABEL_SMOOTHING above 0"),
            ([f"--DPO_DIR={finished}"], f"{finished} already holds a finished model; move it away or pass --OVERWRITE=true"),
            (["--DPO_ROUNDS=1", f"--PPO_PROMPTS_FILE={plain}"], "DPO_ROUNDS=1 needs tasks with unit tests"),
    ):
        proc = run_in_process("train_dpo.py", *dpo_args(tiny_sft, toy_pairs, tmp_path), *extra)
        assert proc.returncode == 2, (extra, proc.stdout[-2000:], proc.stderr[-2000:])
        assert proc.stderr.startswith("error: ") and message in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / "dpo_model").exists() and not (tmp_path / "runs" / "dpo").exists(), extra


def test_loss_types_are_trls():
    """DPO_LOSS_TYPE is checked against the losses DPOConfig documents; several are summed."""
    from rlhf.settings import UserError, dpo_loss_types

    for value, expected in (("sigmoid", ["sigmoid"]), ("IPO", ["ipo"]), ("sigmoid, sft", ["sigmoid", "sft"]),
                            ("hinge", ["hinge"]), ("robust", ["robust"]), ("apo_zero", ["apo_zero"])):
        assert dpo_loss_types(value, 0.0) == expected
    for value, message in (("sigmoid,kto", "unknown loss 'kto'"), ("", "unknown loss ''"),
                           ("exo_pair", "exo_pair needs --DPO_LABEL_SMOOTHING above 0")):
        with pytest.raises(UserError, match=message):
            dpo_loss_types(value, 0.0)
    assert dpo_loss_types("exo_pair", 1e-3) == ["exo_pair"]


@pytest.fixture(scope="module")
def answering_sft(tiny_base, toy_data, tmp_path_factory):
    """A tiny SFT model trained long enough on the add_k conversations that, sampled at temperature 1,
    some of its answers to add_k tasks pass their test and some fail: what online pairs are made of."""
    out = tmp_path_factory.mktemp("answering_sft")
    proc = run_script("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={out / 'sft_model'}",
                      f"--RUNS_DIR={out / 'runs'}", f"--SFT_TRAIN_FILE={toy_data['sft_train']}",
                      f"--SFT_EVAL_FILE={toy_data['sft_eval']}", "--EPOCHS=40", "--LR=1e-2", "--BATCH_SIZE=8",
                      "--SFT_EARLY_STOP_PATIENCE=0", "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tasks = [dict(t, prompt=f"Write a function add_{k}(x) that returns x plus {k}.")  # the SFT data's wording
             for k, t in zip(range(1, 13), toy_tasks(12))]
    return str(out / "sft_model"), write_jsonl(out / "tasks.jsonl", tasks)


def test_an_online_round_trains_on_the_models_own_answers_labelled_by_the_tests(answering_sft, toy_pairs, tmp_path):
    import config as C
    from rlhf.codeeval import completion_for, load_problems, sandbox_limits, score_samples

    sft, tasks = answering_sft
    proc = run_script("train_dpo.py", *dpo_args(sft, toy_pairs, tmp_path, "--DPO_ROUNDS=1", "--DPO_ONLINE_SAMPLES=4",
                                                 f"--PPO_PROMPTS_FILE={tasks}", "--GEN_MAX_NEW_TOKENS=48",
                                                 "--DPO_LR=1e-3", "--EVAL_SAMPLES=0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "dpo_model"
    pairs = [json.loads(line) for line in open(folder / "online_pairs.jsonl")]
    assert pairs, proc.stdout[-3000:]
    metrics = json.load(open(folder / "eval_results.json"))
    (round_1,) = metrics["round_history"]
    assert metrics["rounds"] == 1 and round_1["start"] == sft
    assert round_1["online_pairs"] == len(pairs) and round_1["pairs"] == 48 + len(pairs)  # the fixed pairs and these
    assert f"dpo round 1: {len(pairs)} online pairs from {sft} on 12 tasks of {tasks}" in proc.stdout
    # each pair: one prompt, a passing answer against a failing one, as the sandbox judges them now
    problems = {p.task_id: p for p in load_problems(tasks)}
    samples = [{"task_id": p["task_id"], "completion": completion_for(problems[p["task_id"]], p[side][0]["content"]),
                "side": side} for p in pairs for side in ("chosen", "rejected")]
    _, verdicts = score_samples(list(problems.values()), samples, ks=(), progress=False, limits=sandbox_limits(C))
    assert all(v["passed"] == (v["side"] == "chosen") for v in verdicts)
    for p in pairs:
        assert p["prompt"] == problems[p["task_id"]].messages() and p["chosen"] != p["rejected"]
        assert p["chosen"][0]["content"] != problems[p["task_id"]].reference()  # the model's answer, not the reference
    assert 0 < round_1["online_passed"] < 1


def test_an_interrupted_online_run_continues_after_its_finished_rounds(answering_sft, toy_pairs, tmp_path):
    """What a run killed during round 2 leaves: round 1's model (complete: its rlhf_stage.json) and
    pairs. The same command continues from that model; round 1 is neither sampled nor trained again."""
    import shutil

    from rlhf.handoff import save_stage_output
    from rlhf.settings import scalar_settings

    sft, tasks = answering_sft
    round_1 = tmp_path / "runs" / "dpo" / "checkpoints" / "round_1"
    figures = {"round": 1, "start": sft, "pairs": 48, "online_pairs": 0, "online_passed": None, "train_loss": 0.5}
    save_stage_output(str(round_1 / "model"), "dpo", lambda tmp: shutil.copytree(sft, tmp, dirs_exist_ok=True),
                      {"round": figures}, scalar_settings())
    write_jsonl(round_1 / "pairs.jsonl", [])
    proc = run_script("train_dpo.py", *dpo_args(sft, toy_pairs, tmp_path, "--DPO_ROUNDS=2", "--DPO_ONLINE_SAMPLES=4",
                                                 f"--PPO_PROMPTS_FILE={tasks}", "--GEN_MAX_NEW_TOKENS=48",
                                                 "--DPO_LR=1e-3", "--EVAL_SAMPLES=0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"dpo round 1/2: finished by the interrupted run, continuing from {round_1 / 'model'}" in proc.stdout
    assert "dpo round 1:" not in proc.stdout and "dpo round 1 step" not in proc.stdout  # not sampled, not trained
    history = json.load(open(tmp_path / "dpo_model" / "eval_results.json"))["round_history"]
    assert [h["round"] for h in history] == [1, 2] and history[0] == figures
    assert history[1]["start"] == str(round_1 / "model") and history[1]["pairs"] == history[1]["online_pairs"] > 0
    assert not (tmp_path / "runs" / "dpo" / "checkpoints").exists()


def test_an_online_round_runs_under_accelerate_launch_on_two_processes(answering_sft, toy_pairs, tmp_path):
    """accelerate launch (2 CPU processes, gloo): the main process samples the online pairs, both
    train on them, one model is saved."""
    from transformers import AutoModelForCausalLM

    sft, tasks = answering_sft
    out = launch("train_dpo.py", *dpo_args(sft, toy_pairs, tmp_path, "--DPO_ROUNDS=1", "--DPO_ONLINE_SAMPLES=4",
                                           f"--PPO_PROMPTS_FILE={tasks}", "--GEN_MAX_NEW_TOKENS=48", "--DPO_BATCH_SIZE=4",
                                           "--EVAL_SAMPLES=0"))
    assert "== dpo | 2 process(es)" in out and out.count("online pairs from") == 1  # sampled once, by the main process
    pairs = len(open(tmp_path / "dpo_model" / "online_pairs.jsonl").readlines())
    metrics = json.load(open(tmp_path / "dpo_model" / "eval_results.json"))
    assert pairs > 0 and metrics["round_history"][0]["pairs"] == 48 + pairs
    assert re.search(rf"dpo round 1 step \d+/{-(-(48 + pairs) // 8)} \|", out)  # 2 processes x 4 pairs a step
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo_model")
