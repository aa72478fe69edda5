"""The hand-off between stages: a stage output is a model folder saved atomically with a small
metadata file (rlhf_stage.json, written last: its presence marks a finished output); the next
stage refuses a missing or unfinished one with the command that makes it. A kill mid-save leaves
the previous output (or nothing), and the next run finishes or removes what it left. A full disk
is one line that says what is kept. A stage refuses to build on outputs made from another
MODEL_NAME or RECIPE (check_lineage). rlhf/checkpoints.py builds its atomic checkpoints on this."""

import contextlib
import datetime
import errno
import json
import os
import shutil

from rlhf.model_card import model_card, push_to_hub
from rlhf.settings import UserError

STAGE_INFO_FILE = "rlhf_stage.json"  # written last: its presence marks a finished stage output
STAGE_COMMANDS = {"sft": "python train_sft.py", "rm": "python train_rm.py", "ppo": "python train_ppo.py",
                  "dpo": "python train_dpo.py"}
STAGE_INPUTS = {"sft": (), "rm": (("sft", "SFT_DIR"),), "ppo": (("sft", "SFT_DIR"), ("rm", "RM_DIR")),  # what each builds on
                "dpo": (("sft", "SFT_DIR"),)}
HISTORY_KEYS = ("log_history", "history")  # per-step logs: in rlhf_stage.json, not in eval_results.json
FREE_BYTES_WHEN_FULL = 16 * 2**20  # a save that failed with less than this free on its disk failed for lack of space


# ---------------------------------------------------------------------------------------------
# Reading a previous stage's output
# ---------------------------------------------------------------------------------------------

def require_stage_output(path, stage):
    """Fail with the command to run when a previous stage's output is missing or unfinished."""
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: run `{STAGE_COMMANDS[stage]}` first")
    if not os.path.exists(os.path.join(path, STAGE_INFO_FILE)):
        raise UserError(f"{path} holds no finished {stage.upper()} model (no {STAGE_INFO_FILE}; "
                        f"the run may have been interrupted): run `{STAGE_COMMANDS[stage]}` again")
    return path


def read_stage_info(folder):
    """A stage output's metadata (rlhf_stage.json) as a dict, or None when it is not finished."""
    path = os.path.join(folder, STAGE_INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def same_name(a, b):
    """Do two MODEL_NAME (or RECIPE) values name the same thing: the same hub id, or the same folder
    however it is written?"""
    a, b = os.path.expanduser(a or ""), os.path.expanduser(b or "")
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normpath(a) == os.path.normpath(b) if a and b else a == b


def check_lineage(stage, given, run_settings, main_process=True):
    """Before `stage` builds on the earlier stage outputs it reads (STAGE_INPUTS, found through
    `run_settings`: {NAME: value}): each was made with this run's RECIPE and from its MODEL_NAME, else
    one line naming the fix. Returns the MODEL_NAME the run builds on: one that neither the command
    line nor the recipe gave (`given`: apply_overrides' changes) is the SFT output's, with a line.
    An RM trained on an earlier SFT output than SFT_DIR's is refused."""
    infos, model_name = {}, run_settings["MODEL_NAME"]
    for earlier, setting in STAGE_INPUTS[stage]:
        folder = run_settings[setting]
        info = read_stage_info(folder)
        if info is None:
            continue  # require_stage_output names the command that makes it
        infos[earlier] = info
        remake = (f"make it again with this run's settings (`{STAGE_COMMANDS[earlier]} ... --OVERWRITE=true`, or "
                  f"`python scripts/pipeline.py ... --redo {earlier}`), or point {setting} at one that was")
        recipe = info.get("settings", {}).get("RECIPE", "")
        if not same_name(recipe, run_settings["RECIPE"]):
            raise UserError(f"{folder} was made with RECIPE={recipe!r}, not {run_settings['RECIPE']!r}: pass "
                            f"--RECIPE={recipe} to build on it, or {remake}")
        model = info.get("base_model") or model_name
        if not same_name(model, model_name):
            if "MODEL_NAME" in given or earlier != "sft":
                raise UserError(f"{folder} was trained from MODEL_NAME={model!r}, not {model_name!r}: {remake}")
            if main_process:
                print(f"{stage}: MODEL_NAME = {model!r}: the base model of {folder}")
            model_name = model
    made_on = infos.get("rm", {}).get("inputs", {}).get("sft", {}).get("finished_at")
    if made_on and "sft" in infos and made_on != infos["sft"].get("finished_at"):
        raise UserError(f"{run_settings['RM_DIR']} was trained on an SFT model finished at {made_on}, and "
                        f"{run_settings['SFT_DIR']} was finished at {infos['sft'].get('finished_at')}: train the RM again "
                        "on it (`python train_rm.py --OVERWRITE=true`, or `python scripts/pipeline.py --redo rm`)")
    return model_name


def learning_rate_notes(stage, given, run_settings):
    """Lines that say so when the embedded model's learning rates (config.py's own, settings.
    EMBEDDED_LEARNING_RATES) would train another model: a pretrained model wants 10-1000x less.
    `run_settings`: the run's {NAME: value}; `given`: the names the command line or a recipe set."""
    from rlhf.settings import EMBEDDED_LEARNING_RATES

    if same_name(run_settings["MODEL_NAME"], run_settings["BASE_MODEL_DIR"]):
        return []
    names = [n for n in EMBEDDED_LEARNING_RATES[stage] if n != "PPO_CRITIC_LR" or run_settings["PPO_ADVANTAGE"] == "gae"]
    return [f"{stage}: note: {n}={run_settings[n]!r} is the embedded model's learning rate (config.py), not one for "
            f"{run_settings['MODEL_NAME']}: pass --{n}=... or a recipe (recipes/, --RECIPE=...)"
            for n in names if n not in given and run_settings[n] == EMBEDDED_LEARNING_RATES[stage][n]]


def indist_answers_path(reports, stage):
    """Where scripts/pipeline.py writes, and scripts/report.py reads, the greedy answers of
    `stage`'s model to INDIST_TASKS_FILE (the in-distribution tasks)."""
    return os.path.join(reports, f"indist_{stage}.jsonl")


def is_current(path, *inputs):
    """Does `path` exist and is it at least as new as each of `inputs` that exists? Answers written
    before their model was trained again (its rlhf_stage.json), or their task file rebuilt, are not."""
    return os.path.exists(path) and all(os.path.getmtime(path) >= os.path.getmtime(i) for i in inputs if os.path.exists(i))


# ---------------------------------------------------------------------------------------------
# Writing this stage's output
# ---------------------------------------------------------------------------------------------

def check_output_dir(path, overwrite):
    """Refuse to replace a finished stage output unless `overwrite` (the OVERWRITE setting), after
    finishing a save that a kill interrupted."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        recover_interrupted_save(path)
    PartialState().wait_for_everyone()
    if os.path.exists(os.path.join(path, STAGE_INFO_FILE)) and not overwrite:
        raise UserError(f"{path} already holds a finished model; move it away or pass --OVERWRITE=true to replace it")


def recover_interrupted_save(path):
    """What a kill during save_stage_output left next to `path`: a complete `<path>.tmp-PID` (killed
    between its two renames, `path` itself gone) is moved into place; an incomplete one (killed while
    writing: possibly gigabytes) is removed; a `<path>.old-PID` whose replacement is in place is removed.
    Each with a line."""
    import glob

    base = path.rstrip("/")
    for tmp in sorted(glob.glob(f"{glob.escape(base)}.tmp-*")):
        if os.path.exists(os.path.join(tmp, STAGE_INFO_FILE)) and not os.path.exists(path):
            print(f"{path}: finishing a save that was interrupted (moving {tmp} into place)")
            os.rename(tmp, path)
        else:
            print(f"removing {tmp}: an incomplete save of {path} (the run was stopped while saving it)")
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(glob.glob(f"{glob.escape(base)}.old-*")):
        if os.path.exists(path):
            print(f"removing {old}: the model {path} replaced (the run was stopped before removing it)")
            shutil.rmtree(old, ignore_errors=True)


def machine():
    """Where a stage ran: platform, Python version, CPU count and GPU names (report.md's first line)."""
    import platform

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def save_stage_output(path, stage, save_fn, metrics, run_settings, extra=None):
    """Save atomically: `save_fn(tmp_dir)` writes the model and tokenizer into a temporary
    sibling folder, we add the model card (README.md) and the metadata file, then swap it into place. A crash mid-save leaves
    the previous output (or nothing), never a half-written folder that looks finished. run_settings: the
    run's settings {NAME: value} (rlhf.settings.scalar_settings), recorded in the metadata."""
    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"{path} is unchanged" if os.path.exists(path) else f"nothing was written to {path}"
    with disk_full_is_an_error(path, tmp, f"{kept}, the checkpoints under {run_settings['RUNS_DIR']} are kept"):
        os.makedirs(tmp)
        save_fn(tmp)
        info = {
            "stage": stage,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "base_model": run_settings["MODEL_NAME"],
            "metrics": metrics,
            "settings": run_settings,
            "machine": machine(),
        }
        info.update(extra or {})
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(stage, path, info))
        write_json(os.path.join(tmp, STAGE_INFO_FILE), info)
    old = f"{path.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_stage(stage, path, model, tokenizer, metrics, checkpoints, run_settings, also=None, extra=None, show=None):
    """The end of every stage (main process only): the model, its tokenizer, eval_results.json
    (the metrics without the per-step history), the model card and the metadata with `run_settings`
    (save_stage_output), saved atomically to `path`; then the stage's checkpoint folder is removed
    (finished: the next run starts fresh), one line printed and, with PUSH_TO_HUB, the folder
    uploaded. `also(tmp)` writes anything else first; `show` limits the metrics in that line."""
    results = {k: v for k, v in metrics.items() if k not in HISTORY_KEYS}
    infos = {earlier: (run_settings[setting], read_stage_info(run_settings[setting]))
             for earlier, setting in STAGE_INPUTS[stage]}
    inputs = {earlier: {"path": folder, "finished_at": info.get("finished_at")}  # check_lineage reads them
              for earlier, (folder, info) in infos.items() if info}

    def save(tmp):
        if also is not None:
            also(tmp)
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(os.path.join(tmp, "eval_results.json"), results)

    save_stage_output(path, stage, save, metrics, run_settings, {"inputs": inputs, **(extra or {})})
    shutil.rmtree(checkpoints, ignore_errors=True)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items() if show is None or k in show}
    print(f"{stage} done | {shown} | saved {path}")
    if run_settings["PUSH_TO_HUB"]:
        push_to_hub(path, stage, run_settings["HUB_MODEL_ID"])


def save_tokenizer(tokenizer, folder):
    """save_pretrained with right padding. transformers 5 keeps a per-call padding_side="left"
    (used for generation) in the Rust backend and writes it to tokenizer.json, so the saved
    tokenizer would pad left for whoever loads it next; the padding state is reset first."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "no_padding"):
        backend.no_padding()
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)


def write_json(path, obj):
    """Indented and readable (non-ASCII characters as they are, in UTF-8 whatever the locale)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def write_jsonl(path, rows):
    """One JSON object per line (the per-task results of scripts/evaluate.py and the SFT stage)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------

def is_disk_full(error, path):
    """Did `error` come from a full disk? OSError says so (ENOSPC, EDQUOT); safetensors wraps it in
    its own error; torch.save says only "unexpected pos N vs M" (seen on a full tmpfs, torch 2.13),
    so the free space left on the disk decides."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
        return True
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free < FREE_BYTES_WHEN_FULL
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_an_error(what, tmp, kept):
    """Around a save into the temporary folder `tmp`: whatever fails, `tmp` is removed; a full disk
    becomes one line that names what was being saved and what is kept."""
    try:
        yield
    except Exception as e:
        full = not isinstance(e, UserError) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"disk full while saving {what} ({reason}): free space and rerun; {kept}") from None
