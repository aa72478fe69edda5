"""rlhf/settings.py: the --NAME=value override mechanism shared by every stage script, the checks
of allowed values and ranges, and --help."""

import os
import re

import pytest

import config as C
from rlhf.settings import UserError, apply_overrides, parse_value


@pytest.fixture(autouse=True)
def restore_config():
    saved = {k: v for k, v in vars(C).items() if k.isupper()}
    yield
    for k, v in saved.items():
        setattr(C, k, v)


def test_override_changes_the_constant_with_its_type():
    changes = apply_overrides(["--LR=3e-4", "--BATCH_SIZE=4", "--USE_LORA=true", "--MODEL_NAME=some/model"], quiet=True)
    assert C.LR == 3e-4 and isinstance(C.LR, float)
    assert C.BATCH_SIZE == 4 and isinstance(C.BATCH_SIZE, int)
    assert C.USE_LORA is True
    assert C.MODEL_NAME == "some/model"
    assert set(changes) == {"LR", "BATCH_SIZE", "USE_LORA", "MODEL_NAME"}


def test_names_are_case_insensitive_and_dashes_allowed():
    apply_overrides(["--lr=0.5", "--grad-accum=3"], quiet=True)
    assert C.LR == 0.5 and C.GRAD_ACCUM == 3


def test_unknown_name_lists_close_matches():
    with pytest.raises(UserError, match="unknown setting --BATCHSIZE.*BATCH_SIZE"):
        apply_overrides(["--BATCHSIZE=4"], quiet=True)


def test_type_is_checked():
    with pytest.raises(UserError, match="integer"):
        apply_overrides(["--BATCH_SIZE=four"], quiet=True)
    with pytest.raises(UserError, match="integer"):
        apply_overrides(["--EPOCHS=1.5"], quiet=True)
    with pytest.raises(UserError, match="true or false"):
        apply_overrides(["--USE_LORA=maybe"], quiet=True)
    with pytest.raises(UserError, match="number"):
        apply_overrides(["--LR=fast"], quiet=True)


def test_integer_written_as_float_is_accepted():
    assert parse_value("X", "1e3", 5) == 1000


def test_argument_without_equals_is_an_error():
    with pytest.raises(UserError, match="--NAME=value"):
        apply_overrides(["--LR", "3e-4"], quiet=True)


def test_each_change_is_printed(capsys):
    apply_overrides(["--EPOCHS=2"])
    assert "EPOCHS = 2" in capsys.readouterr().out


def test_allowed_values_agree_with_config_comments():
    """CHOICES is the one list of allowed values: config.py's comment names each of them."""
    from rlhf.settings import CHOICES, config_sections

    comments = {name: comment for _, rows in config_sections() for name, comment in rows}
    for name, allowed in CHOICES.items():
        missing = [v for v in allowed if v not in comments[name]]
        assert not missing, f"config.py's comment of {name} omits {missing}"


def test_defaults_pass_the_checks_and_every_checked_name_exists():
    from rlhf.settings import CHOICES, RANGES, check_values, settings

    assert set(CHOICES) | set(RANGES) <= set(settings())
    check_values()


@pytest.mark.parametrize("arg, message", [
    ("--WARMUP_RATIO=1", "WARMUP_RATIO must be in [0, 1), not 1.0"),
    ("--PPO_GAMMA=1.01", "PPO_GAMMA must be in [0, 1], not 1.01"),
    ("--PPO_MAX_GRAD_NORM=0", "PPO_MAX_GRAD_NORM must be above 0"),
    ("--PRECISION=fp8", "PRECISION must be one of auto, fp32, bf16, fp16, not 'fp8'"),
])
def test_out_of_range_values_are_refused(arg, message):
    from rlhf.settings import check_values

    apply_overrides([arg], quiet=True)
    with pytest.raises(UserError) as e:
        check_values()
    assert message in str(e.value)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_stage_help_lists_its_settings_grouped_with_defaults_and_comments(stage, capsys, monkeypatch, tmp_path):
    import importlib

    from rlhf.common import run_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [f"train_{stage}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        run_stage(importlib.import_module(f"train_{stage}").main)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and os.listdir(tmp_path) == []
    assert out.startswith(f"usage: python train_{stage}.py [--NAME=value ...]")
    assert "Shared by all stages:\n  --MODEL_NAME=./base_model " in out  # grouped as in config.py, default shown
    assert "--PRECISION=auto {auto,fp32,bf16,fp16}" in out
    own = {"sft": "--WARMUP_RATIO=0.05 [0, 1)", "rm": "--RM_LR=0.001", "ppo": "--PPO_KL_ESTIMATOR=k1 {k1,k2,k3}"}[stage]
    assert own in out
    others = {"sft": "--RM_LR=", "rm": "--PPO_LR=", "ppo": "--WARMUP_RATIO="}[stage]
    assert others not in out  # only what this stage reads
    assert "--SANDBOX_TIMEOUT_S=1.0" in out and "--GEN_BATCH_SIZE=512" in out  # its evaluations' (RM: on-policy pairs)
    assert "peak learning rate (cosine decay" in out or "policy learning rate" in out  # config.py's comment


@pytest.mark.parametrize("tool", ["build_data", "evaluate", "generate", "pipeline", "report", "rm_vs_tests"])
def test_every_tool_has_help(tool):
    from conftest import run_script

    proc = run_script(f"scripts/{tool}.py", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage:") and not proc.stderr, proc.stderr
    if tool in ("generate", "rm_vs_tests", "report"):  # they take defaults from config.py: shown with comments
        assert re.search(r"\n  (--)?[A-Z_]+( = |=)\S+ +\w", proc.stdout), proc.stdout


# ---------------------------------------------------------------------------------------------
# Recipes: --RECIPE=FILE, a file of NAME = value lines applied before the command line's overrides
# ---------------------------------------------------------------------------------------------

def write_recipe(tmp_path, text, name="r.py"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_recipe_applies_before_the_command_line_and_each_change_is_printed_once(tmp_path, capsys):
    recipe = write_recipe(tmp_path, '"""A recipe."""\n# a comment\nLR = 1e-5\nEPOCHS = 2\nMODEL_NAME = "some/model"\n'
                                    'PPO_TEMPERATURE = 1\n')
    changes = apply_overrides([f"--RECIPE={recipe}", "--EPOCHS=3"])
    assert C.LR == 1e-5 and C.MODEL_NAME == "some/model" and C.EPOCHS == 3  # the command line wins
    assert C.PPO_TEMPERATURE == 1.0 and isinstance(C.PPO_TEMPERATURE, float)  # an int may stand for a float
    assert list(changes) == ["RECIPE", "LR", "EPOCHS", "MODEL_NAME", "PPO_TEMPERATURE"]
    out = capsys.readouterr().out
    assert out.count("EPOCHS") == 1 and f"setting EPOCHS = 3 (command line, over {recipe}'s 2; config.py has 5)" in out
    assert f"setting LR = 1e-05 ({recipe}; config.py has 0.001)" in out


def test_recipe_named_in_config_py_applies_too(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RECIPE", write_recipe(tmp_path, "BATCH_SIZE = 7\n"))
    assert apply_overrides([], quiet=True) == {"BATCH_SIZE": 7} and C.BATCH_SIZE == 7


@pytest.mark.parametrize("text, message", [
    ("LR = 1e-5\nBATCHSIZE = 4\n", "r.py:2: unknown setting BATCHSIZE; did you mean BATCH_SIZE"),
    ("EPOCHS = 1.5\n", "r.py:1: EPOCHS = 1.5: config.py's EPOCHS is a int (5)"),
    ("USE_LORA = 1\n", "r.py:1: USE_LORA = 1: config.py's USE_LORA is a bool (False)"),
    ("import os\n", "r.py:1: a recipe holds only NAME = value lines"),
    ("LR = 2 * LR\n", "r.py:1: LR: the value must be a literal"),
    ("RECIPE = 'other.py'\n", "r.py:1: unknown setting RECIPE"),
    ("LR = (\n", "r.py:1: not Python"),
])
def test_a_bad_recipe_line_is_one_error_naming_file_and_line(tmp_path, text, message):
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(UserError) as e:
        apply_overrides([f"--RECIPE={recipe}"], quiet=True)
    assert message in str(e.value).replace(str(tmp_path) + os.sep, "")


def test_a_missing_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match=r"no such file \(recipes/ has qwen2.5-coder-1.5b-lora.py"):
        apply_overrides([f"--RECIPE={tmp_path}/nope.py"], quiet=True)


RECIPES = sorted(f"recipes/{f}" for f in os.listdir(os.path.join(os.path.dirname(C.__file__), "recipes")))


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_are_complete_and_valid(recipe, tmp_path, monkeypatch):
    """Each recipe sets every length, learning rate, batch and the temperature a real model needs,
    its values pass the checks of every stage, it says that nothing has run on a GPU, cites its
    sources, and the accelerate configs it names exist. From another directory: the recipe path is
    the repository's."""
    from rlhf.settings import ROOT, check_values

    monkeypatch.chdir(tmp_path)
    changes = apply_overrides([f"--RECIPE={recipe}"], quiet=True)
    check_values()
    needed = {"MODEL_NAME", "MAX_LEN", "RM_MAX_LEN", "PPO_RESPONSE_LEN", "GEN_MAX_NEW_TOKENS", "LR", "RM_LR", "PPO_LR",
              "PPO_CRITIC_LR", "BATCH_SIZE", "GRAD_ACCUM", "RM_BATCH_SIZE", "PPO_BATCH_SIZE", "PPO_MINI_BATCH_SIZE",
              "PPO_TEMPERATURE", "SANDBOX_TIMEOUT_S", "SFT_DIR", "RM_DIR", "PPO_DIR"}
    assert needed <= set(changes), needed - set(changes)
    assert C.PPO_BATCH_SIZE % C.PPO_MINI_BATCH_SIZE == 0 and C.PPO_BATCH_SIZE % C.PPO_SAMPLES_PER_PROMPT == 0
    assert C.MAX_LEN > C.PPO_RESPONSE_LEN and C.PPO_TEMPERATURE == 0.7
    for name in ("ACCELERATE_CONFIG", "PPO_ACCELERATE_CONFIG"):
        assert not getattr(C, name) or os.path.isfile(os.path.join(ROOT, getattr(C, name))), getattr(C, name)
    text = open(os.path.join(ROOT, recipe), encoding="utf-8").read()
    assert "NOTHING IN THIS PROJECT HAS RUN ON A GPU YET" in text
    assert all(source in text for source in ("TRL", "OpenRLHF", "Qwen"))


# ---------------------------------------------------------------------------------------------
# REPORT_TO: any tracker transformers supports (PPO: those accelerate supports), checked at the start
# ---------------------------------------------------------------------------------------------

def test_report_to_takes_transformers_trackers_and_checks_them_at_the_start(capsys):
    from transformers.integrations import get_available_reporting_integrations

    from rlhf.common import check_report_to, report_to

    assert check_report_to("tensorboard", "sft") == "tensorboard" and report_to("tensorboard") == ["tensorboard"]
    assert check_report_to("none", "rm") == "none" and report_to("None") == []
    with pytest.raises(UserError, match=r"unknown tracker 'tensorbaord'; transformers supports .*comet_ml.*mlflow.*"
                                        r"tensorboard.*wandb, all or none"):
        check_report_to("tensorbaord", "sft")
    for tracker in ("mlflow", "neptune", "wandb"):  # known to transformers; an error only where it is not installed
        if tracker not in get_available_reporting_integrations():
            with pytest.raises(UserError, match=f"{tracker} is not installed here: pip install {tracker}"):
                check_report_to(f"tensorboard,{tracker}", "sft")


def test_ppo_leaves_out_a_tracker_accelerate_lacks_with_a_line(capsys):
    from rlhf.common import check_report_to

    # neptune: transformers' Trainer has it, accelerate does not
    assert check_report_to("tensorboard,neptune", "ppo") == "tensorboard"
    assert "ppo: REPORT_TO neptune: not a tracker of accelerate, which PPO logs through" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown tracker 'tensorbaord'"):
        check_report_to("tensorbaord", "ppo")
