"""rlhf/handoff.py: a stage output is saved atomically with its metadata and refused when
missing or unfinished; the save tail every stage shares; no import cycle in rlhf/."""

import ast
import glob
import json
import os

import pytest

import config as C
from conftest import ROOT
from rlhf.handoff import STAGE_INFO_FILE, check_output_dir, require_stage_output, save_stage, save_stage_output
from rlhf.settings import UserError


def test_hand_off_requires_a_finished_output_and_refuses_overwrite(tmp_path, monkeypatch):
    out = str(tmp_path / "sft_model")
    with pytest.raises(UserError, match="does not exist: run `python train_sft.py` first"):
        require_stage_output(out, "sft")
    os.makedirs(out)  # a half-written folder (no metadata) is not a finished output
    with pytest.raises(UserError, match="no finished SFT model"):
        require_stage_output(out, "sft")

    save_stage_output(out, "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v1"), {"m": 1})
    assert require_stage_output(out, "sft") == out
    assert json.load(open(os.path.join(out, STAGE_INFO_FILE)))["metrics"] == {"m": 1}
    monkeypatch.setattr(C, "OVERWRITE", False)
    with pytest.raises(UserError, match="--OVERWRITE=true"):
        check_output_dir(out)
    monkeypatch.setattr(C, "OVERWRITE", True)
    check_output_dir(out)
    save_stage_output(out, "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v2"), {"m": 2})
    assert open(os.path.join(out, "weights")).read() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["sft_model"]  # no temporary folders left behind


class SavesItself:
    """What save_stage needs of a model and a tokenizer: save_pretrained."""

    def __init__(self, name):
        self.name = name

    def save_pretrained(self, folder):
        open(os.path.join(folder, self.name), "w").write(self.name)


def test_save_stage_writes_model_results_and_metadata_then_removes_checkpoints(tmp_path, capsys):
    checkpoints = tmp_path / "runs" / "sft" / "checkpoints"
    os.makedirs(checkpoints / "checkpoint-2")
    metrics = {"eval_loss": 0.123456, "log_history": [{"loss": 1.0}]}
    save_stage("sft", str(tmp_path / "sft_model"), SavesItself("weights"), SavesItself("tokenizer"), metrics,
               str(checkpoints), also=lambda tmp: open(os.path.join(tmp, "extra.json"), "w").write("{}"))
    out = tmp_path / "sft_model"
    assert sorted(os.listdir(out)) == ["eval_results.json", "extra.json", STAGE_INFO_FILE, "tokenizer", "weights"]
    assert json.load(open(out / "eval_results.json")) == {"eval_loss": 0.123456}  # no per-step history
    assert json.load(open(out / STAGE_INFO_FILE))["metrics"]["log_history"] == [{"loss": 1.0}]
    assert not checkpoints.exists()
    assert f"sft done | {{'eval_loss': 0.1235}} | saved {out}" in capsys.readouterr().out


def imports_of(path):
    """The rlhf modules a file imports, at any level (function-level imports count: a cycle is a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf"):
            names = [node.module] if node.module != "rlhf" else [f"rlhf.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rlhf."))
    return found


def test_no_import_cycle_in_rlhf():
    graph = {f"rlhf.{os.path.basename(p)[:-3]}": imports_of(p) for p in glob.glob(os.path.join(ROOT, "rlhf", "*.py"))}
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) is None:
            state[module] = "open"
            for dep in sorted(graph.get(module, ())):
                visit(dep, path + [module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "rlhf.common" not in graph["rlhf.checkpoints"] and "rlhf.checkpoints" not in graph["rlhf.handoff"]
