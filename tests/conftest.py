"""Shared fixtures: a tiny locally built model and tiny data files, so every test runs offline
on a CPU in seconds. Everything runs with the Hugging Face hub switched off.

Two lanes: `bash test.sh -m "not slow"` runs the unit tests (under a minute); `bash test.sh` runs
everything, as CI does. A test is `slow` when it, or a fixture it uses, starts a process (a stage
script, a tool, `accelerate launch`): marked here, from the source, so no test can forget it.
Tests that train in this process carry @pytest.mark.slow themselves."""

import inspect
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def toy_conversations(n, seed=0):
    """`add_k` tasks in English and Chinese: enough structure for a tiny model to learn a bit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(1, 30)
        prompt = rng.choice([f"Write a function add_{k}(x) that returns x plus {k}.",
                             f"写一个函数 add_{k}(x)，返回 x 加 {k}。"])
        answer = f"```python\ndef add_{k}(x):\n    return x + {k}\n```"
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


LAUNCHES_A_PROCESS = re.compile(r"\b(run_script|subprocess\.\w+|Popen|launch|run_evaluate)\(")


def starts_a_process(function):
    try:
        return bool(LAUNCHES_A_PROCESS.search(inspect.getsource(function)))
    except (OSError, TypeError):  # no source (a builtin fixture)
        return False


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that starts a process itself or through one of its fixtures."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in (fixtures.name2fixturedefs.values() if fixtures else []) for d in ds]
        if starts_a_process(getattr(item, "function", None)) or any(starts_a_process(d.func) for d in defs):
            item.add_marker(pytest.mark.slow)


def run_script(script, *args, cwd=ROOT, timeout=600):
    """Run a project script as a user would; returns the CompletedProcess (output captured)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_data")
    return {
        "sft_train": write_jsonl(folder / "sft_train.jsonl", toy_conversations(48, seed=1)),
        "sft_eval": write_jsonl(folder / "sft_eval.jsonl", toy_conversations(8, seed=2)),
        "folder": folder,
    }


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, toy_data):
    """A ~50k-parameter Qwen2 with a 400-token BPE vocabulary, built like the embedded default."""
    from rlhf.base_model import build_base_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    build_base_model(str(out), data_files=[toy_data["sft_train"]], vocab_size=400, hidden=32, layers=2,
                     heads=4, kv_heads=2, intermediate=64, max_positions=256, stdlib_bytes=100_000)
    return str(out)


def toy_preference_pairs(n, seed=0):
    """`add_k` tasks as preference pairs: chosen adds k, rejected subtracts it (an easy toy
    preference a tiny reward model can learn in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 30)
        prompt = rng.choice([f"Write a function add_{k}(x) that returns x plus {k}.",
                             f"写一个函数 add_{k}(x)，返回 x 加 {k}。"])
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": f"```python\ndef add_{k}(x):\n    return x + {k}\n```"}],
            "rejected": [{"role": "assistant", "content": f"```python\ndef add_{k}(x):\n    return x - {k}\n```"}],
            "task_id": f"toy/{i}", "family": "add",  # extra fields, as in the bundled data
        })
    return rows


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_pairs")
    return {
        "rm_train": write_jsonl(folder / "rm_train.jsonl", toy_preference_pairs(48, seed=3)),
        "rm_eval": write_jsonl(folder / "rm_eval.jsonl", toy_preference_pairs(16, seed=4)),
        "folder": folder,
    }


@pytest.fixture(scope="session")
def tiny_sft(tiny_base, toy_data, tmp_path_factory):
    """./sft_model of the tiny base, made by running train_sft.py once (a finished stage output)."""
    out = tmp_path_factory.mktemp("tiny_sft")
    proc = run_script("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={out / 'sft_model'}",
                      f"--RUNS_DIR={out / 'runs'}", f"--SFT_TRAIN_FILE={toy_data['sft_train']}",
                      f"--SFT_EVAL_FILE={toy_data['sft_eval']}", "--EPOCHS=1", "--BATCH_SIZE=8",
                      "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(out / "sft_model")


@pytest.fixture(scope="session")
def ppo_inputs(tiny_base, tmp_path_factory):
    """A tiny ./sft_model (the untrained tiny base), a ./rm_model from it, prompts with tests."""
    from rlhf.common import load_tokenizer
    from rlhf.handoff import save_stage_output
    from rlhf.reward import load_reward_model, save_reward_normalization

    folder = tmp_path_factory.mktemp("ppo_inputs")
    sft, rm = str(folder / "sft_model"), str(folder / "rm_model")
    save_stage_output(sft, "sft", lambda tmp: shutil.copytree(tiny_base, tmp, dirs_exist_ok=True), {})
    model, tok = load_reward_model(sft), load_tokenizer(sft)

    def save_rm(tmp):
        save_reward_normalization(tmp, {"mean": 0.0, "std": 1.0}, model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    save_stage_output(rm, "rm", save_rm, {})
    rows = [{"task_id": f"t{k}", "prompt": [{"role": "user", "content": f"Write add_{k}(x) returning x plus {k}."}],
             "entry_point": f"add_{k}", "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}]} for k in range(1, 21)]
    prompts = write_jsonl(folder / "ppo.jsonl", rows)
    tasks = write_jsonl(folder / "tasks.jsonl", [dict(r, prompt=r["prompt"][0]["content"]) for r in rows[:4]])
    return {"sft": sft, "rm": rm, "prompts": prompts, "tasks": tasks, "folder": folder}


def ppo_args(inp, out, *extra):
    """Overrides that run train_ppo.py on ppo_inputs `inp`, every output under `out`, in seconds."""
    return [f"--SFT_DIR={inp['sft']}", f"--RM_DIR={inp['rm']}", f"--PPO_DIR={out}/ppo_model", f"--RUNS_DIR={out}/runs",
            f"--PPO_PROMPTS_FILE={inp['prompts']}", f"--EVAL_TASKS_FILE={inp['tasks']}", "--MAX_LEN=128",
            "--PPO_BATCH_SIZE=8", "--PPO_MINI_BATCH_SIZE=4", "--PPO_RESPONSE_LEN=12", "--GEN_MAX_NEW_TOKENS=12",
            "--REPORT_TO=none", *extra]
