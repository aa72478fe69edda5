"""`--NAME=value` overrides of the constants in config.py, the one override mechanism of every
stage script, and recipes: `--RECIPE=FILE` names a file of `NAME = value` lines (recipes/*.py)
applied first, so that the command line's own overrides win. Unknown names fail with the close
matches; values are checked against the type of the constant they replace and against the allowed
values and ranges below; each change is printed once. `--help` lists the settings a script reads,
grouped and commented as in config.py."""

import ast
import difflib
import io
import os
import re
import textwrap
import tokenize

import config as C

# The one list of allowed values: validation (check_values), --help and config.py's comments
# (tests/test_settings.py checks that each comment names every value) all read it.
CHOICES = {
    "PRECISION": ("auto", "fp32", "bf16", "fp16"),
    "PPO_KL_ESTIMATOR": ("k1", "k2", "k3"),
    "PPO_EXEC_REWARD": ("all", "fraction"),
    "PPO_ADVANTAGE": ("gae", "grpo", "dr_grpo", "rloo", "reinforce++"),
    "PPO_LOSS_NORM": ("batch", "mini_batch"),
    "SANDBOX_MODE": ("namespaces", "weak"),
    "CHAT_TEMPLATE": ("model", "chatml"),
}
# Numbers that must lie in an interval, checked before any work. Shares and probabilities first:
# a warm-up "ratio" of 1 or more is read by transformers as a number of steps, not a share.
RANGES = {
    **dict.fromkeys(("WARMUP_RATIO", "RM_WARMUP_RATIO", "DPO_WARMUP_RATIO", "LORA_DROPOUT"), "[0, 1)"),
    "DPO_LABEL_SMOOTHING": "[0, 0.5)",
    **dict.fromkeys(("PPO_GAMMA", "PPO_LAM"), "[0, 1]"),
    **dict.fromkeys((
        "BATCH_SIZE", "GRAD_ACCUM", "EPOCHS", "MAX_LEN", "LR", "LOG_EVERY", "RM_BATCH_SIZE", "RM_GRAD_ACCUM",
        "RM_EPOCHS", "RM_MAX_LEN", "RM_LR", "RM_SCORE_BATCH_SIZE", "GEN_MAX_NEW_TOKENS", "GEN_BATCH_SIZE", "LORA_R",
        "LORA_ALPHA",
        "PPO_STEPS", "PPO_BATCH_SIZE", "PPO_MINI_BATCH_SIZE", "PPO_EPOCHS", "PPO_LR", "PPO_CRITIC_LR",
        "PPO_SAMPLES_PER_PROMPT", "PPO_OVERSAMPLE", "PPO_RESPONSE_LEN", "PPO_TEMPERATURE", "PPO_CLIP", "PPO_VF_CLIP",
        "PPO_KL_HORIZON", "PPO_MAX_GRAD_NORM", "SANDBOX_TIMEOUT_S", "SANDBOX_MEMORY_MB", "SANDBOX_DISK_MB",
        "SANDBOX_FILE_SIZE_MB", "SANDBOX_MAX_PROCS", "DPO_BETA", "DPO_LR", "DPO_EPOCHS", "DPO_BATCH_SIZE",
        "DPO_GRAD_ACCUM", "DPO_ONLINE_SAMPLES"), "(0, inf)"),
    **dict.fromkeys((
        "WEIGHT_DECAY", "SFT_EARLY_STOP_PATIENCE", "EVAL_EVERY", "RM_CENTER_REWARDS_COEF", "EVAL_MAX_TASKS", "EVAL_SAMPLES",
        "SEED_PROMPT_SAMPLES", "RM_ONPOLICY_SAMPLES",
        "PPO_KL_COEF", "PPO_KL_TARGET", "PPO_VF_COEF", "PPO_SIL_COEF", "PPO_EXEC_WEIGHT", "PPO_EVAL_EVERY",
        "PPO_SAVE_EVERY", "PPO_EVAL_TASKS", "DPO_ROUNDS"), "[0, inf)"),
}


# config.py's learning rates, chosen for the embedded model (tests/test_settings.py checks that they
# agree): a stage that would train another model with one of them says so (rlhf.handoff.learning_rate_notes)
EMBEDDED_LEARNING_RATES = {"sft": {"LR": 1e-3}, "rm": {"RM_LR": 1e-3}, "ppo": {"PPO_LR": 5e-5, "PPO_CRITIC_LR": 3e-4},
                           "dpo": {"DPO_LR": 1e-4}}


class UserError(Exception):
    """A mistake the user can fix (missing input, bad data, unknown setting). Stage scripts turn
    it into one `error: ...` line and a non-zero exit, without a traceback."""


def settings():
    """The current settings: every UPPER_CASE constant of config.py, name -> value."""
    return {k: v for k, v in vars(C).items() if k.isupper() and not k.startswith("_")}


def scalar_settings():
    """The settings that are plain values (what a stage output and a checkpoint record)."""
    return {k: v for k, v in settings().items() if isinstance(v, (bool, int, float, str, type(None)))}


def in_range(value, interval):
    """Is `value` inside `interval`, written "[0, 1)" ("[" / "]" closed, "(" / ")" open, inf allowed)?"""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def range_text(interval):
    return {"(0, inf)": "above 0", "[0, inf)": "0 or more"}.get(interval, f"in {interval}")


def choice(name, value):
    """`value` of the CHOICES setting `name`, lower-cased; one line when it is not an allowed one."""
    lowered = str(value).lower()
    if lowered not in CHOICES[name]:
        raise UserError(f"{name} must be one of {', '.join(CHOICES[name])}, not {value!r}")
    return lowered


def check_values():
    """A value of the right type can still be wrong (`--PPO_KL_ESTIMATOR=k4`, `--BATCH_SIZE=0`,
    `--WARMUP_RATIO=2`): one line at the start, not a traceback (or a silent misreading) later."""
    for name in CHOICES:
        choice(name, getattr(C, name))
    if C.QLORA and not C.USE_LORA:
        raise UserError("QLORA=True trains LoRA adapters on a 4-bit base: add --USE_LORA=true")
    if C.PUSH_TO_HUB and C.HUB_MODEL_ID.count("/") != 1:
        raise UserError(f"PUSH_TO_HUB needs HUB_MODEL_ID as user/name (the stages add -sft, -rm, -ppo), not {C.HUB_MODEL_ID!r}")
    for name, value in settings().items():  # a data file that is a folder: IsADirectoryError deep in a reader
        if name.endswith("_FILE") and isinstance(value, str) and value and os.path.isdir(value):
            raise UserError(f"{name}={value!r} is a folder; give a data file (.jsonl, .json or .parquet)")
    for name, interval in RANGES.items():
        value = getattr(C, name, None)
        if isinstance(value, (int, float)) and not in_range(value, interval):
            raise UserError(f"{name} must be {range_text(interval)}, not {value!r} (config.py or --{name}=...)")


def dpo_loss_types(value, label_smoothing):
    """DPO_LOSS_TYPE (`value`) as the list TRL's DPOConfig takes (`sigmoid`, or `sigmoid,sft` for a
    sum), each checked against the losses DPOConfig documents for this TRL version (its `loss_type`
    help: the trainer itself only rejects an unknown loss at the first step); one line for an
    unknown one, and for exo_pair without DPO_LABEL_SMOOTHING (`label_smoothing`), which TRL refuses."""
    import dataclasses

    from trl import DPOConfig

    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    known = re.findall(r"`'(\w+)'`", field.metadata.get("help", "").split("If multiple")[0])
    wanted = [t.strip().lower() for t in str(value).split(",") if t.strip()]
    unknown = [t for t in wanted if known and t not in known] or ([] if wanted else [""])
    if unknown:
        raise UserError(f"DPO_LOSS_TYPE: unknown loss {unknown[0]!r}; TRL's DPOConfig has {', '.join(known)} "
                        "(several, comma-separated, are summed)")
    if "exo_pair" in wanted and not label_smoothing:
        raise UserError("DPO_LOSS_TYPE=exo_pair needs --DPO_LABEL_SMOOTHING above 0 (the EXO paper: 1e-3)")
    return wanted


def parse_value(name, text, current):
    """Convert `text` to the type of `current` (the constant it overrides)."""
    if isinstance(current, bool):  # before int: bool is a subclass of int
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:  # accept 1e3 style integers, but not 0.5
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise UserError(f"--{name} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    # None, lists, tuples, dicts: a Python literal, else the plain string
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def unknown_setting(name, known, where):
    close = difflib.get_close_matches(name.lstrip("-").upper().replace("-", "_"), list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; the names are the constants in config.py"
    return UserError(f"{where}unknown setting {name}{hint}")


def recipe_path(recipe):
    """The file a RECIPE names: as given (relative to the working directory), else relative to the
    repository, so that `--RECIPE=recipes/x.py` works from anywhere."""
    for path in (recipe, os.path.join(ROOT, recipe)):
        if os.path.isfile(path):
            return path
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".py")) \
        if os.path.isdir(os.path.join(ROOT, "recipes")) else []
    raise UserError(f"RECIPE {recipe!r}: no such file" + (f" (recipes/ has {', '.join(shipped)})" if shipped else ""))


def read_recipe(recipe, known):
    """{NAME: value} of a recipe file: `NAME = literal` lines (and comments, a docstring) only, read
    with ast, never executed; each name a constant of config.py, each value of its type."""
    path = recipe_path(recipe)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise UserError(f"{recipe}:{e.lineno}: not Python: {e.msg}") from None
    values = {}
    for i, node in enumerate(tree.body):
        where = f"{recipe}:{node.lineno}: "
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{where}a recipe holds only NAME = value lines (constants of config.py)")
        name = node.targets[0].id
        if name not in known or name == "RECIPE":
            raise unknown_setting(name, {k: v for k, v in known.items() if k != "RECIPE"}, where)
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{where}{name}: the value must be a literal (a number, string, True/False)") from None
        values[name] = recipe_value(name, value, known[name], where)
    return values


def recipe_value(name, value, current, where):
    """A recipe's value checked against the type of config.py's constant (an int may stand for a float)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str)}.get(type(current), True)
    if not ok:
        raise UserError(f"{where}{name} = {value!r}: config.py's {name} is a {type(current).__name__} ({current!r})")
    return float(value) if isinstance(current, float) else value


def resolve_overrides(argv):
    """[(NAME, value, source)] of `argv`'s `--NAME=value` arguments and of the recipe they (or
    config.py) name, in the order they apply: RECIPE, the recipe's values, then the command line's,
    each name once with the value that wins. Nothing is changed. Names are matched
    case-insensitively and `-` may stand for `_` (`--lr=1e-4` sets LR)."""
    known = settings()
    by_key = {k.lower(): k for k in known}
    given = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: settings are given as --NAME=value, "
                            "for example --LR=1e-4 (names are the constants in config.py)")
        raw_name, text = arg[2:].split("=", 1)
        name = by_key.get(raw_name.replace("-", "_").lower())
        if name is None:
            raise unknown_setting(f"--{raw_name}", known, "")
        given[name] = parse_value(name, text, known[name])
    recipe = given.get("RECIPE", C.RECIPE)
    resolved = {"RECIPE": (recipe, "command line")} if "RECIPE" in given else {}
    for name, value in (read_recipe(recipe, known) if recipe else {}).items():
        resolved[name] = (value, recipe)
    for name, value in given.items():
        resolved[name] = (value, "command line" if name not in resolved or name == "RECIPE"
                          else f"command line, over {recipe}'s {resolved[name][0]!r}")
    return [(name, value, source) for name, (value, source) in resolved.items()]


def apply_overrides(argv, quiet=False):
    """Apply a recipe's values and `--NAME=value` arguments (resolve_overrides) to config.py's
    constants in place and return the changes {NAME: value}; each is printed once."""
    known = settings()
    changes = {}
    for name, value, source in resolve_overrides(argv):
        setattr(C, name, value)
        changes[name] = value
        if not quiet:
            origin = "" if source == "command line" else f"{source}; "
            print(f"setting {name} = {value!r} ({origin}config.py has {known[name]!r})")
    return changes


# ---------------------------------------------------------------------------------------------
# --help: the settings a script reads, grouped and commented as in config.py
# ---------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(C.__file__))
SHARED_SECTION = "Shared by all stages"
# what each stage reads besides its own script and the shared settings: the embedded base model
# (built by SFT when missing) and the sandbox that runs the unit tests (SFT's and PPO's pass@1,
# the RM's on-policy pairs of RM_ONPOLICY_SAMPLES)
STAGE_SOURCES = {"sft": ("train_sft.py", "rlhf/base_model.py", "rlhf/codeeval.py", "rlhf/sandbox"),
                 "rm": ("train_rm.py", "rlhf/codeeval.py", "rlhf/sandbox"),
                 "ppo": ("train_ppo.py", "rlhf/ppo_setup.py", "rlhf/codeeval.py", "rlhf/sandbox"),
                 "dpo": ("train_dpo.py", "rlhf/codeeval.py", "rlhf/sandbox")}


def config_sections():
    """[(banner title, [(NAME, comment), ...]), ...] in config.py's order, read from its source."""
    with open(C.__file__, encoding="utf-8") as f:
        source = f.read()
    sections, lines = [], source.splitlines()
    for i, line in enumerate(lines):
        if (line.startswith("# ") and not line.startswith("# -") and i > 0 and lines[i - 1].startswith("# ---")
                and i + 1 < len(lines) and lines[i + 1].startswith("# ---")):  # a banner between two rules
            sections.append((line[2:].strip(), []))
            continue
        name = re.match(r"([A-Z][A-Z0-9_]*)\s*=", line)
        if name and sections:
            try:  # the trailing comment, found by the tokenizer so a "#" inside a string is not one
                comments = [t.string for t in tokenize.generate_tokens(io.StringIO(line).readline)
                            if t.type == tokenize.COMMENT]
            except tokenize.TokenError:  # a value continued on the next line
                comments = []
            sections[-1][1].append((name.group(1), comments[0][1:].strip() if comments else ""))
    return [(t, rows) for t, rows in sections if rows]


def names_read_by(*paths):
    """The config.py names the given files or folders (relative to the repository root) read as `C.NAME`,
    or as `settings.NAME` in a helper that is handed config.py's module (rlhf.codeeval.sandbox_limits)."""
    found = set()
    for path in paths:
        full = os.path.join(ROOT, path)
        files = [os.path.join(full, f) for f in sorted(os.listdir(full)) if f.endswith(".py")] if os.path.isdir(full) \
            else [full] if os.path.exists(full) else []
        for file in files:
            with open(file, encoding="utf-8") as f:
                found.update(re.findall(r"\b(?:C|settings)\.([A-Z][A-Z0-9_]*)\b", f.read()))
    return found


def settings_help(names, width=100, flags=True):
    """The settings in `names`, grouped under config.py's banners: `--NAME=default  comment`
    (`NAME = default  comment` with flags=False, for a tool that takes no overrides)."""
    current, out = settings(), []
    for title, rows in config_sections():
        rows = [(n, c) for n, c in rows if n in names and n in current]
        if not rows:
            continue
        out.append(f"{title}:")
        for name, comment in rows:
            value = current[name]
            shown = value if not isinstance(value, str) or value else '""'
            flag = f"  --{name}={shown}" if flags else f"  {name} = {shown}"
            if name in CHOICES:
                flag += " {" + ",".join(CHOICES[name]) + "}"
            elif name in RANGES:
                flag += f" {RANGES[name]}"
            text = comment or ""
            if len(flag) < 34:
                out.extend(textwrap.wrap(text, width, initial_indent=flag.ljust(36), subsequent_indent=" " * 36) or [flag])
            else:
                out.append(flag)
                out.extend(textwrap.wrap(text, width, initial_indent=" " * 36, subsequent_indent=" " * 36))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def stage_help(stage, doc=""):
    """`python train_<stage>.py --help`: the script's docstring (what it reads, writes, how to launch
    it), then every setting it reads with its default and config.py's comment."""
    shared = {n for title, rows in config_sections() if title == SHARED_SECTION for n, _ in rows}
    names = shared | names_read_by(*STAGE_SOURCES[stage])
    head = f"usage: python train_{stage}.py [--NAME=value ...]\n\n{doc.strip()}\n\n" if doc else ""
    return (f"{head}Settings train_{stage}.py reads, with their defaults from config.py; override any with\n"
            "--NAME=value. {a,b} lists the allowed values, [0, 1) the allowed range.\n\n" + settings_help(names))


def tool_help(path, *names, overrides=False):
    """An argparse epilog for a tool in scripts/: the config.py settings it reads (`C.NAME` in its
    source, and `names`), as in --help of a stage; `overrides`: the tool takes --NAME=value."""
    names = names_read_by(os.path.relpath(path, ROOT)) | set(names)
    if not names:
        return None
    head = "Settings it reads (config.py; override with --NAME=value)" if overrides else "Defaults from config.py"
    return f"{head}:\n\n" + settings_help(names, flags=overrides)
