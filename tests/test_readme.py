"""The README's commands stay true: every script it runs exists, every --NAME=value is a real
setting, every --flag of our command-line tools is one they accept, and the deployment snippet
runs as written on a tiny model. The same checks run over the Chinese README, which must stay in
step with the English one: the same sections in the same order, the same commands, the same code."""

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

README = os.path.join(ROOT, "README.md")
README_ZH = os.path.join(ROOT, "README_zh.md")
BOTH = pytest.mark.parametrize("readme", [README, README_ZH], ids=["en", "zh"])
TOOLS = ("scripts/evaluate.py", "scripts/generate.py", "scripts/pipeline.py", "scripts/report.py")


def read(readme):
    return open(readme, encoding="utf-8").read()


def fenced_blocks(language, readme=README):
    return re.findall(rf"^```{language}\n(.*?)^```", read(readme), re.S | re.M)


def bash_commands(readme=README):
    """Each command line of the ```bash blocks, split like the shell does, comments dropped."""
    commands = []
    for block in fenced_blocks("bash", readme):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


@functools.cache
def help_text(script):
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def headings(readme):
    """(level, code spans) of each ## and ### heading outside code blocks: what a translation keeps."""
    text = re.sub(r"^```.*?^```", "", read(readme), flags=re.S | re.M)
    return [(len(m.group(1)), re.findall(r"`[^`]+`", m.group(2)))
            for m in re.finditer(r"^(#{2,3}) (.+)$", text, re.M)]


@BOTH
def test_readme_has_commands_and_the_figures_placeholder(readme):
    commands = [" ".join(c) for c in bash_commands(readme)]
    assert "bash run.sh" in commands and "bash test.sh" in commands
    assert 'python scripts/generate.py --model ./ppo_model 用Python实现快速排序算法' in commands
    assert "<!-- FIGURES" in read(readme) and "<!-- /FIGURES -->" in read(readme)


def test_readme_zh_is_in_step_with_readme():
    en, zh = read(README), read(README_ZH)
    assert "(README_zh.md)" in en.split("\n## ")[0], "README.md must link README_zh.md at the top"
    assert "(README.md)" in zh.split("\n## ")[0], "README_zh.md must link README.md at the top"
    en_headings, zh_headings = headings(README), headings(README_ZH)
    assert len(en_headings) >= 10, en_headings  # the parser found the sections
    assert zh_headings == en_headings, "README_zh.md's ##/### sections differ from README.md's (level, `code`)"
    assert bash_commands(README_ZH) == bash_commands(README), "the ```bash commands of the two READMEs differ"
    assert fenced_blocks("python", README_ZH) == fenced_blocks("python", README), "the python snippets differ"


@BOTH
def test_readme_commands_name_real_scripts_settings_and_flags(readme):
    from rlhf.settings import settings

    known = settings()
    for words in bash_commands(readme):
        scripts = [w for w in words if w.endswith((".py", ".sh")) and not w.startswith("-") and "=" not in w]
        for script in scripts:
            if script.startswith(("my_", "/")):
                continue
            assert os.path.exists(os.path.join(ROOT, script)), f"README runs {script}, which does not exist: {words}"
        after = words[words.index(scripts[0]) + 1:] if scripts else []  # flags of accelerate etc. come before
        for word in after:
            name = re.match(r"--([A-Z][A-Z0-9_]*)=", word)
            if name:
                assert name.group(1) in known, f"README uses unknown setting {word}: {words}"
            elif word.startswith("--") and scripts[0] in TOOLS:
                flag = word.split("=")[0]
                assert flag in help_text(scripts[0]), f"{scripts[0]} has no {flag}: {words}"


@pytest.mark.parametrize("script", ["scripts/evaluate.py", "scripts/generate.py"])
def test_help_runs(script):
    assert "usage:" in help_text(script)


def test_deployment_snippet_runs_as_written(tiny_base, tmp_path):
    snippet = next(b for b in fenced_blocks("python") if 'from_pretrained("./ppo_model"' in b)
    shutil.copytree(tiny_base, tmp_path / "ppo_model")  # the snippet's own path, relative to its cwd
    # the only change: fewer tokens (the tiny model has 256 positions and bf16 on a CPU is slow)
    script = snippet.replace("max_new_tokens=256", "max_new_tokens=16")
    (tmp_path / "deploy.py").write_text(script, encoding="utf-8")
    proc = subprocess.run([sys.executable, "deploy.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_reward_fn_example_runs_as_written(ppo_inputs, tmp_path, run_in_process, monkeypatch):
    """The README's PPO_REWARD_FN example, saved as my_rewards.py: its values by hand, then PPO runs 2
    iterations with it as the only reward, scoring each answer with it."""
    from conftest import ppo_args

    example = next(b for b in fenced_blocks("python") if b.startswith("# my_rewards.py"))
    (tmp_path / "my_rewards.py").write_text(example, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_rewards

    long_code = "\n".join(f"x{i} = {i}" for i in range(40))
    prompts = [[{"role": "user", "content": "Write add(a, b)."}]] * 3
    responses = ['```python\ndef add(a, b):\n    """Add."""\n    return a + b\n```',
                 "```python\ndef add(a, b):\n    return a + b\n```", f"```python\n{long_code}\n```"]
    assert my_rewards.documented_and_short(prompts, responses) == pytest.approx([0.2, 0.0, -0.2])
    calls = []  # (prompts, responses, rewards) of each call PPO makes
    original = my_rewards.documented_and_short
    monkeypatch.setattr(my_rewards, "documented_and_short",
                        lambda p, r: calls.append((p, r, original(p, r))) or calls[-1][2])
    command = next(c for c in bash_commands() if any(w.startswith("--PPO_REWARD_FN=") for w in c))
    setting = next(w for w in command if w.startswith("--PPO_REWARD_FN="))
    proc = run_in_process("train_ppo.py", *ppo_args(ppo_inputs, tmp_path, "--PPO_STEPS=2", "--PPO_EVAL_EVERY=0",
                                                    "--PPO_SAVE_EVERY=0", "--PPO_EXEC_WEIGHT=0", "--PPO_RM_WEIGHT=0",
                                                    "--PPO_PENALIZE_MISSING_EOS=false", setting))
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"]
    scores = [h["score"] for h in history if "kl" in h]
    assert len(calls) == len(scores) == 2  # one call per rollout batch of 8 answers, each with its prompt's messages
    assert all(len(p) == len(r) == 8 and p[0][-1]["role"] == "user" and isinstance(r[0], str) for p, r, _ in calls)
    # the example's rewards are the whole score
    assert scores == pytest.approx([sum(rewards) / len(rewards) for _, _, rewards in calls])


# settings named in backticks that are not config.py's: environment variables
ENVIRONMENT = {"OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_TOKEN", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES"}


@BOTH
def test_every_setting_the_readme_names_exists(readme):
    """`UPPER_CASE` (alone or `NAME=value` in backticks) and --NAME=value anywhere in the text are
    constants of config.py."""
    from rlhf.settings import settings

    known, text = settings(), read(readme)
    named = [m.group(1) for span in re.findall(r"`([^`\n]+)`", text)
             for m in [re.fullmatch(r"([A-Z][A-Z0-9_]*)(=\S*)?", span)] if m]
    flags = [n for n in re.findall(r"--([A-Z][A-Z0-9_]*)=", text) if n != "NAME"]  # --NAME=value: the placeholder
    assert len(named) > 40 and len(flags) > 20  # the patterns found them
    unknown = sorted({n for n in named + flags if n not in known and n not in ENVIRONMENT})
    assert not unknown, f"{os.path.basename(readme)} names settings config.py does not have: {unknown}"


def settings_table(readme):
    """The settings table: [(names, default cells, recipe cells)], and the recipe its third column
    names. Cells are split at ", ", with remarks in parentheses (either width) dropped."""
    rows = [line for line in read(readme).splitlines() if line.startswith("| ")]
    head = next(i for i, line in enumerate(rows) if "`recipes/" in line)
    recipe = re.search(r"`(recipes/[^`]+)`", rows[head]).group(1)
    table = []
    for line in rows[head + 1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].startswith("`"):
            break
        values = [[v.strip() for v in re.sub(r"\s*[(（][^)）]*[)）]", "", c).split(", ")] for c in cells[1:3]]
        table.append((re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]), *values))
    return recipe, table


@BOTH
def test_settings_table_states_config_defaults_and_the_recipes_values(readme):
    """Each value of the settings table equals config.py's default, and the recipe column the
    recipe's (config.py's where the recipe leaves a setting alone)."""
    import config as C
    from rlhf.settings import parse_value, resolve_overrides, settings

    defaults = settings()
    recipe, table = settings_table(readme)
    from_recipe = {name: value for name, value, _ in resolve_overrides([f"--RECIPE={recipe}"])}
    assert len(table) >= 15 and {"LR", "RM_LR", "PPO_LR", "PPO_RESPONSE_LEN", "PPO_TEMPERATURE"} <= {
        n for names, _, _ in table for n in names}
    for names, default_cells, recipe_cells in table:
        assert len(names) == len(default_cells) == len(recipe_cells), (names, default_cells, recipe_cells)
        for name, default, in_recipe in zip(names, default_cells, recipe_cells):
            current = getattr(C, name)
            assert parse_value(name, default, current) == defaults[name], f"{name}: README {default}, config.py {defaults[name]!r}"
            expected = from_recipe.get(name, defaults[name])
            assert parse_value(name, in_recipe, current) == expected, f"{name}: README {in_recipe}, {recipe} {expected!r}"
