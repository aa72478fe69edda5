"""rlhf/model_card.py: every stage output carries a README.md model card (base model, recipe,
data, settings, metrics, how to load it) whose code runs as written; PUSH_TO_HUB uploads the
folder, tested offline with huggingface_hub's calls replaced by recorders."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import config as C
from conftest import ppo_args
from rlhf.handoff import save_stage, save_stage_output
from rlhf.settings import UserError, check_values, scalar_settings


class SavesItself:
    def __init__(self, name):
        self.name = name

    def save_pretrained(self, folder):
        open(os.path.join(folder, self.name), "w").write(self.name)


def card_of(folder):
    return open(os.path.join(folder, "README.md"), encoding="utf-8").read()


def python_block(card):
    (block,) = re.findall(r"^```python\n(.*?)^```", card, re.S | re.M)
    return block


def test_the_card_says_what_the_model_was_made_from_and_how_it_did(tmp_path):
    run = {**scalar_settings(), "MODEL_NAME": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "LR": 1e-4,
           "RECIPE": "recipes/qwen2.5-coder-1.5b-lora.py", "SFT_TRAIN_FILE": "trl-lib/Capybara:train"}
    out = str(tmp_path / "sft_model")
    save_stage("sft", out, SavesItself("weights"), SavesItself("tokenizer"),
               {"eval_loss": 0.123456, "pass_at_1": 0.5, "log_history": [{"loss": 1.0}]}, str(tmp_path / "ckpt"), run)
    card = card_of(out)
    front = card.split("---")[1]
    assert "base_model: Qwen/Qwen2.5-Coder-1.5B-Instruct" in front and "library_name: transformers" in front
    assert "- trl-lib/Capybara" in front and "pipeline_tag: text-generation" in front and "- sft" in front
    assert "| base model (`MODEL_NAME`) | `Qwen/Qwen2.5-Coder-1.5B-Instruct` |" in card
    assert "| recipe (`RECIPE`) | `recipes/qwen2.5-coder-1.5b-lora.py` |" in card
    assert "| `SFT_TRAIN_FILE` | `trl-lib/Capybara:train` |" in card and "| `LR` | `0.0001` |" in card
    assert "| eval_loss | 0.1235 |" in card and "| pass_at_1 | 0.5 |" in card and "log_history" not in card
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card


def test_a_local_base_model_is_no_hub_base_model_and_the_rm_card_loads_a_reward_model(tmp_path):
    out = str(tmp_path / "rm_model")
    save_stage_output(out, "rm", lambda tmp: None, {"eval_accuracy": 0.9},
                      {**scalar_settings(), "MODEL_NAME": str(tmp_path)},  # a folder: not a Hub id
                      {"inputs": {"sft": {"path": "./sft_model", "finished_at": "2026-12-01T10:00:00"}}})
    card = card_of(out)
    assert "base_model:" not in card.split("---")[1] and "pipeline_tag: text-classification" in card
    assert "| built on (SFT) | `./sft_model`, finished 2026-12-01T10:00:00 |" in card
    assert "AutoModelForSequenceClassification" in python_block(card) and "| `RM_LR` |" in card


def run_snippet(code, tmp_path):
    (tmp_path / "use.py").write_text(code.replace("max_new_tokens=256", "max_new_tokens=8"), encoding="utf-8")
    proc = subprocess.run([sys.executable, "use.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def test_the_cards_code_runs_as_written(ppo_inputs, tmp_path):
    """The card's snippet on the tiny SFT model (generation) and RM (a normalised score)."""
    assert run_snippet(python_block(card_of(ppo_inputs["sft"])), tmp_path).strip() is not None
    score = run_snippet(python_block(card_of(ppo_inputs["rm"])), tmp_path)
    assert float(score.strip()) == float(score.strip())  # a number, not NaN


class Recorder:
    """What HfApi's calls received, instead of the network."""

    def __init__(self, monkeypatch, fail=None):
        import huggingface_hub

        self.calls = []
        self.fail = fail
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self.record("create_repo"))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", self.record("upload_folder"))

    def record(self, name):
        def call(api, *args, **kwargs):
            if name == "upload_folder":  # what the folder holds when it is uploaded
                kwargs["files"] = sorted(os.listdir(kwargs["folder_path"]))
                kwargs["card"] = card_of(kwargs["folder_path"])
            self.calls.append((name, args, kwargs))
            if self.fail:
                raise self.fail
            return None

        return call


def test_push_to_hub_uploads_the_finished_folder_with_its_card_to_a_private_repo(tmp_path, monkeypatch, capsys):
    recorder = Recorder(monkeypatch)
    out = str(tmp_path / "ppo_model")
    save_stage("ppo", out, SavesItself("weights"), SavesItself("tokenizer"), {"pass_at_1": 0.25}, str(tmp_path / "c"),
               {**scalar_settings(), "PUSH_TO_HUB": True, "HUB_MODEL_ID": "someone/coder"})
    (create, args, kwargs), (upload, _, up) = recorder.calls
    assert (create, args, kwargs) == ("create_repo", ("someone/coder-ppo",), {"private": True, "exist_ok": True})
    assert upload == "upload_folder" and up["repo_id"] == "someone/coder-ppo" and up["folder_path"] == out
    assert {"README.md", "rlhf_stage.json", "weights", "tokenizer", "eval_results.json"} <= set(up["files"])
    assert 'from_pretrained("someone/coder-ppo")' in up["card"] and "| pass_at_1 | 0.25 |" in up["card"]
    assert "ppo: uploaded" in capsys.readouterr().out


def test_a_failed_upload_is_one_line_and_keeps_the_saved_model(tmp_path, monkeypatch):
    Recorder(monkeypatch, fail=OSError("401 Unauthorized\nmore detail"))
    out = str(tmp_path / "sft_model")
    with pytest.raises(UserError) as e:
        save_stage("sft", out, SavesItself("weights"), SavesItself("tokenizer"), {}, str(tmp_path / "c"),
                   {**scalar_settings(), "PUSH_TO_HUB": True, "HUB_MODEL_ID": "someone/coder"})
    assert str(e.value) == (f"upload of {out} to the Hub as someone/coder-sft failed (401 Unauthorized); the stage output "
                            f"is saved: upload it with `hf upload someone/coder-sft {out}`")
    assert os.path.exists(os.path.join(out, "rlhf_stage.json"))


def test_push_to_hub_needs_a_repo_id_and_a_token_before_any_work(monkeypatch):
    import huggingface_hub

    from rlhf.model_card import check_hub_login

    monkeypatch.setattr(C, "PUSH_TO_HUB", True)  # the settings check_values checks
    with pytest.raises(UserError, match="PUSH_TO_HUB needs HUB_MODEL_ID as user/name"):
        check_values()
    monkeypatch.setattr(C, "HUB_MODEL_ID", "someone/coder")
    check_values()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    check_hub_login(False)  # no upload: no token needed
    with pytest.raises(UserError, match="needs a Hugging Face token: run `hf auth login`"):
        check_hub_login(True)


def test_a_stage_run_with_push_to_hub_uploads_its_output(ppo_inputs, tmp_path, monkeypatch, run_in_process):
    """train_ppo.py as a user runs it (in this process), the upload recorded: the card of the
    output it uploads names the models it was built on and the run's metrics."""
    import huggingface_hub

    recorder = Recorder(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_STEPS=1", "--PPO_EVAL_EVERY=0",
                                                     "--PUSH_TO_HUB=true", "--HUB_MODEL_ID=someone/coder"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (_, (repo,), _), (_, _, upload) = recorder.calls
    assert repo == "someone/coder-ppo" and upload["folder_path"] == f"{tmp_path}/ppo_model"
    card = upload["card"]
    assert f"| built on (SFT) | `{ppo_inputs['sft']}`" in card and f"| built on (RM) | `{ppo_inputs['rm']}`" in card
    assert "| `PPO_STEPS` | `1` |" in card and re.search(r"\| pass_at_1 \| [0-9.]+ \|", card)
    info = json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))
    assert set(info["inputs"]) == {"sft", "rm"}
    shutil.rmtree(tmp_path / "ppo_model")
