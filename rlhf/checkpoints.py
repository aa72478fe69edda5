"""Checkpoints that survive a kill: written to a temporary place and renamed once complete, resumed
only when complete; a loss that stops being finite and a full disk end in one line that names the
last good checkpoint. Used by the three stages (the Trainer's through train_resumable, PPO's own)."""

import json
import os
import shutil

from rlhf.handoff import disk_full_is_an_error, write_json, write_jsonl
from rlhf.settings import UserError

CHECKPOINT_MARKER = "rlhf_checkpoint.json"  # written into a Trainer checkpoint before it is renamed into place


def checkpoint_folder(runs_dir, stage):
    """Where a stage keeps its checkpoints while it runs (removed once its output is saved); runs_dir: RUNS_DIR."""
    return os.path.join(runs_dir, stage, "checkpoints")


def staging_folder(checkpoints):
    """The Trainer's output_dir: it writes checkpoint-N here, in place; atomic_checkpoints moves
    each finished one into the checkpoint folder `checkpoints`."""
    return os.path.join(checkpoints, ".saving")


def complete_checkpoints(folder, marker=CHECKPOINT_MARKER, prefix="checkpoint-"):
    """{step: path} of the complete checkpoints in `folder`: `<prefix>N` folders holding `marker`."""
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        step = name[len(prefix):]
        if name.startswith(prefix) and step.isdigit() and os.path.exists(os.path.join(folder, name, marker)):
            found[int(step)] = os.path.join(folder, name)
    return found


def last_checkpoint(folder, marker=CHECKPOINT_MARKER, prefix="checkpoint-"):
    """The newest complete checkpoint in `folder`, or None."""
    found = complete_checkpoints(folder, marker, prefix)
    return found[max(found)] if found else None


def resume_from(folder, run_settings, marker=CHECKPOINT_MARKER, prefix="checkpoint-"):
    """The checkpoint this run continues from (None: from the start). What a kill mid-save left in
    `folder` (a temporary folder, a checkpoint without its marker) is removed with a line, never
    resumed from. run_settings: this run's settings {NAME: value} (rlhf.settings.scalar_settings);
    with RESUME false the complete checkpoints stay until this run's first save, else a line names
    the settings that differ from the checkpoint's."""
    from accelerate import PartialState

    main = PartialState().is_main_process
    complete = complete_checkpoints(folder, marker, prefix)
    last = complete[max(complete)] if complete else None
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) and main else []:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and path not in complete.values():
            if os.listdir(path):  # (the Trainer creates its empty staging folder itself)
                print(f"removing {path}: an incomplete checkpoint (the run was stopped while saving it)")
            shutil.rmtree(path, ignore_errors=True)
    if last and not run_settings["RESUME"]:
        if main:
            print(f"RESUME is false: starting over; {last} is replaced at this run's first checkpoint")
        return None
    if last and main:
        print(f"resuming from {last} (step {last[len(os.path.join(folder, prefix)):]})")
        with open(os.path.join(last, marker), encoding="utf-8") as f:
            saved = json.load(f).get("settings", {})
        changed = [f"{k}={v!r} (now {run_settings[k]!r})" for k, v in saved.items()
                   if k not in ("RESUME", "OVERWRITE") and k in run_settings and run_settings[k] != v]
        if changed:
            print(f"note: the checkpoint was made with {', '.join(changed)}; its optimizer, learning rate "
                  "and place in the data win: --RESUME=false to start over with the new settings")
    return last


def rows_made_once(path, make, state, resume):
    """The rows `make()` returns (sampled training data: the RM's on-policy pairs, DPO's online
    pairs), made by the main process and written to `path`, a .jsonl file in a stage's checkpoint
    folder, complete or absent; then read by every process. A resumed run (`resume`: RESUME) reads
    the file of the interrupted one instead, so it trains on the rows it started with."""
    from rlhf.data import read_jsonl

    if state.is_main_process and not (resume and os.path.exists(path)):
        rows = make()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path + ".tmp", rows)
        os.replace(path + ".tmp", path)  # complete or absent: a kill mid-write leaves no half file
    elif state.is_main_process:
        print(f"reusing {path} of the interrupted run")
    state.wait_for_everyone()
    return read_jsonl(path) if os.path.getsize(path) else []  # (read_jsonl refuses an empty file)


def diverged(stage, step, detail, folder, lr_setting, marker=CHECKPOINT_MARKER, prefix="checkpoint-"):
    """The one error of every stage whose loss stops being finite: the step, the checkpoint a
    rerun would resume from, and what to change."""
    last = last_checkpoint(folder, marker, prefix) or "none yet"
    return UserError(f"{stage}: training diverged at step {step} ({detail}); last good checkpoint: {last}. "
                     f"Lower {lr_setting} and start over with --RESUME=false (a resumed run keeps the "
                     "checkpoint's learning rate)")


def atomic_checkpoints(folder, run_settings):
    """A Trainer callback that makes its checkpoints atomic. The Trainer writes checkpoint-N in place
    (into its output_dir, staging_folder), so a kill mid-save would leave a half folder that
    transformers' get_last_checkpoint takes for a good one. on_save runs once the Trainer has
    written everything (transformers 5.24 `_maybe_log_save_evaluate`: `_save_checkpoint` - model,
    optimizer, scheduler, RNG states, trainer_state.json - then `on_save`); this callback then adds
    the marker (with `run_settings`, which resume_from compares), renames the checkpoint into
    `folder` (one atomic step) and removes the older ones."""
    from accelerate import PartialState
    from transformers import TrainerCallback

    class AtomicCheckpoints(TrainerCallback):
        # With load_best_model_at_end (early stopping) the Trainer records the best checkpoint by
        # the path it wrote it to, the staging folder: point it at where the checkpoint lives now,
        # after each save and after a resume (trainer_state.json holds the staging path), and
        # never remove it while it is the best.
        def _moved(self, args, state):
            staging = os.path.join(args.output_dir, "")
            if state.best_model_checkpoint and state.best_model_checkpoint.startswith(staging):
                state.best_model_checkpoint = os.path.join(folder, state.best_model_checkpoint[len(staging):])

        def on_train_begin(self, args, state, control, **kwargs):
            self._moved(args, state)

        def on_save(self, args, state, control, **kwargs):
            PartialState().wait_for_everyone()  # every process has written its part (RNG state)
            self._moved(args, state)
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                staged, final = os.path.join(args.output_dir, name), os.path.join(folder, name)
                write_json(os.path.join(staged, CHECKPOINT_MARKER), {"step": state.global_step, "settings": run_settings})
                shutil.rmtree(final, ignore_errors=True)  # the same step from a run with RESUME=false
                os.replace(staged, final)
                best = os.path.basename(state.best_model_checkpoint or "")
                for other in os.listdir(folder):
                    if other.startswith("checkpoint-") and other not in (name, best):
                        shutil.rmtree(os.path.join(folder, other), ignore_errors=True)
            PartialState().wait_for_everyone()

    return AtomicCheckpoints


def stop_when_diverged(stage, folder, lr_setting):
    """A Trainer callback that stops the run at the first optimizer step after which a trained weight
    is NaN or inf (what a non-finite loss or gradient leads to), before that step can be saved.
    It checks the weights rather than the loss: the Trainer does not hand the step's loss to
    callbacks, and under fp16 a step with inf gradients is skipped by the loss scaler, not an error."""
    import torch
    from transformers import TrainerCallback

    class StopWhenDiverged(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            trained = [p for p in model.parameters() if p.requires_grad]
            # a NaN or inf anywhere makes its tensor's sum NaN or inf; one sum per tensor costs ~15x
            # less than isfinite() on a CPU
            with torch.no_grad():
                sums = [p.sum(dtype=torch.float32) for p in trained]
            if sums and not torch.isfinite(torch.stack(sums)).all():
                raise diverged(stage, state.global_step, "the loss or its gradient was not finite: the weights "
                               "are NaN or inf", folder, lr_setting)

    return StopWhenDiverged


def train_resumable(trainer, stage, lr_setting, folder, run_settings):
    """trainer.train() for a TRL stage whose output_dir is staging_folder(folder): atomic checkpoints
    in `folder`, resumed from the last complete one (resume_from: RESUME of `run_settings`), one line
    for divergence or a full disk. Returns train()'s result."""
    trainer.add_callback(atomic_checkpoints(folder, run_settings))
    trainer.add_callback(stop_when_diverged(stage, folder, lr_setting))
    last = resume_from(folder, run_settings)
    kept = "the last complete checkpoint is kept and a rerun resumes from it"
    with disk_full_is_an_error(f"a checkpoint under {folder}", staging_folder(folder), kept):
        return trainer.train(resume_from_checkpoint=last)
