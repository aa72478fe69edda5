"""rlhf/handoff.py: a stage output is saved atomically with its metadata and refused when
missing or unfinished; the save tail every stage shares; no import cycle in rlhf/; every file
the project reads or writes as text names its encoding."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

import config as C
from conftest import ROOT
from rlhf.handoff import (
    STAGE_INFO_FILE, check_output_dir, is_current, require_stage_output, save_stage, save_stage_output, save_tokenizer,
    write_json, write_jsonl,
)
from rlhf.settings import UserError, scalar_settings


def test_hand_off_requires_a_finished_output_and_refuses_overwrite(tmp_path):
    out = str(tmp_path / "sft_model")
    with pytest.raises(UserError, match="does not exist: run `python train_sft.py` first"):
        require_stage_output(out, "sft")
    os.makedirs(out)  # a half-written folder (no metadata) is not a finished output
    with pytest.raises(UserError, match="no finished SFT model"):
        require_stage_output(out, "sft")

    save_stage_output(out, "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v1"), {"m": 1},
                      scalar_settings())
    assert require_stage_output(out, "sft") == out
    assert json.load(open(os.path.join(out, STAGE_INFO_FILE)))["metrics"] == {"m": 1}
    with pytest.raises(UserError, match="--OVERWRITE=true"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)
    save_stage_output(out, "sft", lambda tmp: open(os.path.join(tmp, "weights"), "w").write("v2"), {"m": 2},
                      scalar_settings())
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
               str(checkpoints), scalar_settings(), also=lambda tmp: open(os.path.join(tmp, "extra.json"), "w").write("{}"))
    out = tmp_path / "sft_model"
    assert sorted(os.listdir(out)) == ["README.md", "eval_results.json", "extra.json", STAGE_INFO_FILE, "tokenizer", "weights"]
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


def text_opens_without_encoding(path):
    """Line numbers of the open() calls in `path` that read or write text in the locale's encoding."""
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            binary = isinstance(mode, ast.Constant) and "b" in mode.value
            if not binary and not any(k.arg == "encoding" for k in node.keywords):
                found.append(node.lineno)
    return found


def test_every_text_file_the_project_opens_names_its_encoding():
    """Prompts, settings and reports hold Chinese text: a file opened in the locale's encoding breaks on
    a machine whose locale is not UTF-8 (Windows' cp1252, a Latin-1 server)."""
    code = [p for pattern in ("*.py", "rlhf/**/*.py", "scripts/*.py", "bench/*.py")
            for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    assert len(code) > 40
    assert {os.path.relpath(p, ROOT): lines for p in code if (lines := text_opens_without_encoding(p))} == {}


def test_stage_metadata_and_reward_statistics_round_trip_under_an_ascii_locale(tmp_path):
    """The C locale without Python's UTF-8 coercion: the default encoding is ASCII there."""
    script = (  # ASCII itself (a command line is decoded in the locale's encoding): the text as escapes
        "import locale, sys\n"
        "from rlhf.handoff import read_stage_info, write_json\n"
        "from rlhf.reward import load_reward_normalization, save_reward_normalization\n"
        "print(locale.getpreferredencoding(False))\n"
        "folder, text = sys.argv[1], '\\u5199\\u4e00\\u4e2a\\u51fd\\u6570 reverse'\n"
        "write_json(folder + '/rlhf_stage.json', {'prompt': text})\n"
        "assert read_stage_info(folder) == {'prompt': text}\n"
        "save_reward_normalization(folder, {'mean': 0.5, 'std': 1.0, 'source': text})\n"
        "assert load_reward_normalization(folder)['source'] == text\n")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         encoding="utf-8", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    if "utf" in out.stdout.lower():
        pytest.skip(f"this Python keeps UTF-8 under the C locale ({out.stdout.strip()})")


# ---------------------------------------------------------------------------------------------
# Provenance: a stage builds only on outputs made from this run's MODEL_NAME and RECIPE
# ---------------------------------------------------------------------------------------------

def fake_stage(folder, stage, model, recipe="", finished_at="2026-01-01T00:00:00", inputs=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, STAGE_INFO_FILE), "w") as f:
        json.dump({"stage": stage, "finished_at": finished_at, "base_model": model, "metrics": {},
                   "settings": {"RECIPE": recipe, "MODEL_NAME": model}, "inputs": inputs or {}}, f)
    return str(folder)


@pytest.fixture
def lineage(tmp_path):
    """An SFT and an RM output made from some/model without a recipe, and the settings of a run whose
    SFT_DIR and RM_DIR point at them."""
    from rlhf.settings import scalar_settings

    sft = fake_stage(tmp_path / "sft", "sft", "some/model", finished_at="T1")
    rm = fake_stage(tmp_path / "rm", "rm", "some/model", inputs={"sft": {"path": sft, "finished_at": "T1"}})
    return sft, rm, {**scalar_settings(), "SFT_DIR": sft, "RM_DIR": rm}


def test_a_stage_takes_the_model_name_of_its_input_when_none_is_given(lineage, capsys):
    from rlhf.handoff import check_lineage

    assert check_lineage("ppo", {}, lineage[2]) == "some/model"
    assert f"ppo: MODEL_NAME = 'some/model': the base model of {lineage[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_a_stage_refuses_an_input_of_another_model_or_recipe(lineage, stage):
    from rlhf.handoff import check_lineage

    with pytest.raises(UserError) as e:
        check_lineage(stage, {"MODEL_NAME": "other/model"}, {**lineage[2], "MODEL_NAME": "other/model"})
    message = str(e.value)
    assert message.startswith(f"{lineage[0]} was trained from MODEL_NAME='some/model', not 'other/model': ")
    assert "--OVERWRITE=true" in message and "--redo sft" in message and "\n" not in message
    with pytest.raises(UserError, match=f"{lineage[0]} was made with RECIPE='', not 'recipes/qwen2.5-coder-1.5b-lora.py': "
                                        "pass --RECIPE= to build on it"):
        check_lineage(stage, {}, {**lineage[2], "MODEL_NAME": "some/model", "RECIPE": "recipes/qwen2.5-coder-1.5b-lora.py"})


def test_ppo_refuses_an_rm_trained_on_an_earlier_sft_model(lineage):
    from rlhf.handoff import check_lineage

    fake_stage(lineage[0], "sft", "some/model", finished_at="T2")  # SFT trained again after the RM
    with pytest.raises(UserError, match="was trained on an SFT model finished at T1, .* was finished at T2: train the RM "
                                        r"again on it \(`python train_rm.py --OVERWRITE=true`"):
        check_lineage("ppo", {}, lineage[2])
    check_lineage("rm", {}, lineage[2])  # the RM stage itself may build on the new SFT model


def test_the_embedded_learning_rates_on_another_model_are_said():
    import importlib.util

    from rlhf.handoff import learning_rate_notes
    from rlhf.settings import EMBEDDED_LEARNING_RATES

    spec = importlib.util.spec_from_file_location("pristine_config", C.__file__)
    pristine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pristine)  # config.py as shipped: EMBEDDED_LEARNING_RATES must be its values
    assert all(getattr(pristine, n) == v for rates in EMBEDDED_LEARNING_RATES.values() for n, v in rates.items())
    shipped = {n: v for n, v in vars(pristine).items() if n.isupper()}
    assert learning_rate_notes("sft", {}, shipped) == []  # the embedded model: its own rates
    qwen = {**shipped, "MODEL_NAME": "Qwen/Qwen2.5-Coder-1.5B-Instruct"}
    (line,) = learning_rate_notes("sft", {}, qwen)
    assert line == ("sft: note: LR=0.001 is the embedded model's learning rate (config.py), not one for "
                    "Qwen/Qwen2.5-Coder-1.5B-Instruct: pass --LR=... or a recipe (recipes/, --RECIPE=...)")
    assert [n.split("=")[0] for n in learning_rate_notes("ppo", {}, qwen)] == ["ppo: note: PPO_LR"]  # grpo: no critic
    assert len(learning_rate_notes("ppo", {}, {**qwen, "PPO_ADVANTAGE": "gae"})) == 2
    assert learning_rate_notes("rm", {}, {**qwen, "RM_LR": 1e-5}) == []  # chosen: no note
    assert learning_rate_notes("sft", {"LR": 1e-3}, qwen) == []  # given on the command line: no note


def test_stage_scripts_check_their_inputs_lineage_before_any_work(ppo_inputs, tmp_path, run_in_process):
    proc = run_in_process("train_ppo.py", f"--SFT_DIR={ppo_inputs['sft']}", f"--RM_DIR={ppo_inputs['rm']}",
                          f"--PPO_DIR={tmp_path}/ppo", "--MODEL_NAME=Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "was trained from MODEL_NAME='./base_model', not 'Qwen/Qwen2.5-Coder-1.5B-Instruct'" in proc.stderr
    recipe = tmp_path / "r.py"
    recipe.write_text("PPO_STEPS = 3\n")
    proc = run_in_process("train_rm.py", f"--SFT_DIR={ppo_inputs['sft']}", f"--RM_DIR={tmp_path}/rm", f"--RECIPE={recipe}")
    assert proc.returncode == 2 and f"was made with RECIPE='', not '{recipe}'" in proc.stderr
    assert not os.path.exists(tmp_path / "ppo") and not os.path.exists(tmp_path / "rm")


def test_answers_are_current_when_at_least_as_new_as_every_input_that_exists(tmp_path):
    answers, model, tasks = (tmp_path / n for n in ("answers.jsonl", "rlhf_stage.json", "tasks.jsonl"))
    assert not is_current(str(answers), str(model))
    for path, when in ((answers, 200), (model, 200), (tasks, 100)):
        path.write_text("x")
        os.utime(path, (when, when))
    assert is_current(str(answers), str(model), str(tasks), str(tmp_path / "missing"))  # as new as the model
    os.utime(tasks, (300, 300))  # the task file rebuilt after the answers
    assert not is_current(str(answers), str(model), str(tasks))


def test_a_saved_tokenizer_pads_right_after_padding_left(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok(["a", "a b c"], padding=True, padding_side="left")  # as generation pads
    save_tokenizer(tok, tmp_path)
    saved = json.load(open(tmp_path / "tokenizer.json"))
    assert saved["padding"] is None, saved["padding"]
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(["a", "a b c"], padding=True)["attention_mask"][0][-1] == 0  # pads at the end


def test_a_tokenizer_whose_backend_has_no_padding_state_is_saved_as_it_is(tmp_path):
    # a tokenizer of remote code may keep another object as `_tokenizer` (no tokenizers.Tokenizer):
    # nothing to reset there, and the save goes on
    class Backend:
        pass

    class Tokenizer:
        _tokenizer, padding_side, saved = Backend(), "left", None

        def save_pretrained(self, folder):
            self.saved = (folder, self.padding_side)

    tok = Tokenizer()
    save_tokenizer(tok, tmp_path)
    assert tok.saved == (tmp_path, "right")


def test_json_files_are_indented_utf8_with_chinese_as_it_is(tmp_path):
    write_json(tmp_path / "x.json", {"prompt": "用Python实现快速排序算法"})
    raw = (tmp_path / "x.json").read_bytes()
    assert raw == '{\n  "prompt": "用Python实现快速排序算法"\n}'.encode("utf-8")
    write_jsonl(tmp_path / "x.jsonl", [{"a": "排序"}, {"b": 1}])
    assert (tmp_path / "x.jsonl").read_bytes() == '{"a": "排序"}\n{"b": 1}\n'.encode("utf-8")
