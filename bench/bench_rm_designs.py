"""What limits the reward model: the RM stage trained on other preference pairs and at other depths,
on one SFT model, with the figures the stage falls short on split by kind.

Each design is the RM stage (train_rm.py in a subprocess, REPORT_TO none) with one change:
  bundled         RM_TRAIN_FILE as it is (the stage's default)
  more_values     plus one `wrong_value` pair for each SFT training instance whose prompt is not in
                  RM_TRAIN_FILE: its reference against the reference of a random other seen variant
  mirrored        plus the mirror of each `wrong_value` pair of RM_TRAIN_FILE: an SFT training prompt
                  of the other variant, its reference chosen and the first variant's rejected, so
                  the same two programs are once chosen and once rejected and only the prompt tells
  prompt_swap     plus, for each `wrong_value` pair of RM_TRAIN_FILE, one program under two prompts:
                  its own (chosen) and an SFT training prompt of the other variant with the same
                  function name (rejected); the pair differs in the prompt alone (implicit-prompt rows)
  <design>+N      the same pairs on the SFT model plus N new decoder layers whose attention and MLP
                  output projections start at zero (so the deeper RM starts as the shallow one)
The extra pairs are rebuilt from scripts/task_families.py with scripts/build_data.py's split, so they
hold seen variants only, like the bundled ones; the bench checks that the rebuilt split is the one
behind RM_TRAIN_FILE. Reported per design: train seconds, held-out pair accuracy on RM_EVAL_FILE
(all, and `wrong_value` pairs apart: the pairs an RM can rank only by reading the prompt) and the
agreement with the tests on the SFT model's failures of EVAL_TASKS_FILE (train_rm.py's
heldout_test_agreement). Choose on the validation split: the default tasks are data/val_tasks.jsonl.

    python bench/bench_rm_designs.py --SFT_DIR=/tmp/run/sft_model       # SFT run on data/val_tasks.jsonl
    python bench/bench_rm_designs.py --SFT_DIR=... --designs=bundled+2 --RM_EPOCHS=4

SFT_DIR must hold the SFT stage's answers to EVAL_TASKS_FILE (eval_results.jsonl: `python
train_sft.py --EVAL_TASKS_FILE=data/val_tasks.jsonl`). On 2 cores each design trains 80-90 s at the
stage's defaults (2 epochs), 1.7x that with 2 more layers; scoring adds about 30 s.
"""

import json
import os
import random
import subprocess
import sys
import tempfile

import _common
import config as C
from rlhf.settings import UserError, apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"designs": "bundled,more_values,mirrored,bundled+2", "data_seed": 0}


def training_split(data_seed):
    """scripts/build_data.py's split for `data_seed`: (families by name, the instances of each file)."""
    from scripts import build_data

    families, _, parts, _ = build_data.tasks_and_split(data_seed)
    return {f.name: f for f in families}, parts


def wrong_value_pair(task, fam, other_params):
    """The task's reference against the reference another seen variant would have (same name)."""
    from scripts import build_data, task_families

    code = task_families.fill(fam.code, other_params, task["entry_point"])
    return None if code == task["solution"] else build_data.preference_row(task, code, "wrong_value")


def extra_pairs(design, bundled, families, parts, seed=7):
    """The pairs a design adds to the bundled ones (see the module docstring)."""
    from scripts import build_data

    rng = random.Random(seed)
    sft = [t for t in parts["sft_train"] if not t["bare"]]
    if design == "bundled":
        return []
    if design == "more_values":
        in_rm = {p["task_id"] for p in bundled}
        out = []
        for t in sft:
            fam = families[t["family"]]
            roles = build_data.variant_roles(fam)  # training variants that are another task than t's
            others = [q for i, q in enumerate(fam.params)
                      if roles[i] == "train" and fam.task_class(i) != fam.task_class(t["pi"])]
            if t["task_id"] not in in_rm and others:
                out.append(wrong_value_pair(t, fam, rng.choice(others)))
        return [p for p in out if p]
    if design in ("mirrored", "prompt_swap"):
        # SFT training prompts of the variant whose program a bundled `wrong_value` pair rejected,
        # in the pair's language; prompt_swap: same function name too
        def key(t, pi):
            return (t["family"], pi, t["lang"]) + ((t["entry_point"],) if design == "prompt_swap" else ())

        pool, tasks = {}, {t["task_id"]: t for t in parts["sft_train"]}
        for t in sft:
            pool.setdefault(key(t, t["pi"]), []).append(t)
        out = []
        for p in bundled:
            if p["bug"] != "wrong_value":
                continue
            t = tasks[p["task_id"]]
            fam = families[t["family"]]
            other = build_data.wrong_value_variant(fam, t["pi"])
            if not pool.get(key(t, other)):
                continue
            b = rng.choice(pool[key(t, other)])
            if design == "mirrored":  # b's prompt, b's program over a's
                out.append(wrong_value_pair(b, fam, fam.params[t["pi"]]))
            else:  # a's program under a's prompt (chosen) and under b's (rejected)
                answer = {"role": "assistant", "content": build_data.fenced(t["solution"])}
                out.append({"chosen": [{"role": "user", "content": t["prompt"]}, answer],
                            "rejected": [{"role": "user", "content": b["prompt"]}, answer],
                            "task_id": t["task_id"], "family": t["family"], "lang": t["lang"], "bug": "wrong_value"})
        return [p for p in out if p]
    raise UserError(f"unknown design {design!r}: bundled, more_values, mirrored or prompt_swap, each with an optional "
                    "+N (layers)")


def deepen(src, dst, extra):
    """src's causal LM with `extra` more decoder layers on top, their attention and MLP output
    projections zero (each new layer adds nothing until trained), saved with src's other files."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = model.config
    n = config.num_hidden_layers
    config.num_hidden_layers = n + extra
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types + [config.layer_types[-1]] * extra
    torch.manual_seed(0)
    deeper = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = deeper.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.startswith("model.layers.") and int(k.split(".")[2]) >= n for k in missing), missing
    with torch.no_grad():
        for layer in deeper.model.layers[n:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    deeper.save_pretrained(dst)
    for name in os.listdir(src):  # tokenizer, chat template, the SFT stage's answers and metadata
        if not name.startswith(("model", "config")) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)


def accuracy_by_kind(rm_dir, pairs):
    """(accuracy on all pairs, right `wrong_value` pairs, their count) of the RM in rm_dir."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.common import load_tokenizer
    from rlhf.reward import score_conversations

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    scores = score_conversations(model, load_tokenizer(rm_dir), [p["prompt"] + p["chosen"] for p in pairs]
                                 + [p["prompt"] + p["rejected"] for p in pairs], C.RM_SCORE_BATCH_SIZE, "cpu")
    right = (scores[:len(pairs)] > scores[len(pairs):]).tolist()
    wrong_value = [r for r, p in zip(right, pairs) if p.get("bug") == "wrong_value"]
    return sum(right) / len(right), sum(wrong_value), len(wrong_value)


def main(argv):
    own, overrides = _common.own_options(argv, DEFAULTS)
    if not any(o.startswith("--EVAL_TASKS_FILE=") for o in overrides):
        overrides.append("--EVAL_TASKS_FILE=data/val_tasks.jsonl")  # settings are chosen on validation
    apply_overrides(overrides)
    from rlhf.data import read_jsonl
    from rlhf.handoff import require_stage_output

    require_stage_output(C.SFT_DIR, "sft")
    answers = os.path.join(C.SFT_DIR, "eval_results.jsonl")
    asked = {r["task_id"] for r in read_jsonl(C.EVAL_TASKS_FILE)}
    if not (os.path.exists(answers) and asked & {r["task_id"] for r in read_jsonl(answers)}):
        raise UserError(f"{C.SFT_DIR} holds no answers to {C.EVAL_TASKS_FILE}, so no agreement with the tests: train "
                        f"it with `python train_sft.py --EVAL_TASKS_FILE={C.EVAL_TASKS_FILE} --SFT_DIR=...`, or pass "
                        "the --EVAL_TASKS_FILE its answers are for")
    bundled = read_jsonl(C.RM_TRAIN_FILE)
    families, parts = training_split(own["data_seed"])
    if {p["task_id"] for p in bundled} != {t["task_id"] for t in parts["rm_train"]}:
        raise UserError(f"{C.RM_TRAIN_FILE} is not the split of `scripts/build_data.py --seed {own['data_seed']}`: "
                        "pass --data_seed=N, or rebuild the data")
    evals = read_jsonl(C.RM_EVAL_FILE)
    result = _common.header("python bench/bench_rm_designs.py " + " ".join(argv)) | {"runs": []}
    rows = []
    specs = [(spec, *spec.partition("+")[::2]) for spec in own["designs"].split(",")]
    extras = {design: extra_pairs(design, bundled, families, parts) for _, design, _ in specs}  # a typo fails here
    if not all(layers.isdigit() for _, _, layers in specs if layers):
        raise UserError(f"--designs={own['designs']}: the part after + is a number of layers (bundled+2)")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, design, layers in specs:
            extra = extras[design]
            train_file, sft_dir = os.path.join(tmp, f"{design}.jsonl"), C.SFT_DIR
            with open(train_file, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in bundled + extra)
            if layers:
                sft_dir = os.path.join(tmp, f"sft_plus_{layers}")
                if not os.path.isdir(sft_dir):
                    deepen(C.SFT_DIR, sft_dir, int(layers))
            rm_dir = os.path.join(tmp, spec, "rm_model")
            subprocess.run([sys.executable, os.path.join(ROOT, "train_rm.py"), *overrides, f"--SFT_DIR={sft_dir}",
                            f"--RM_TRAIN_FILE={train_file}", f"--RM_DIR={rm_dir}", f"--RUNS_DIR={tmp}/{spec}/runs",
                            "--REPORT_TO=none"], check=True, cwd=ROOT)
            with open(os.path.join(rm_dir, "eval_results.json"), encoding="utf-8") as f:
                metrics = json.load(f)
            accuracy, wv_right, wv = accuracy_by_kind(rm_dir, evals)
            run = {"design": spec, "pairs": len(bundled) + len(extra), "train_seconds": metrics["train_seconds"],
                   "train_accuracy": metrics["train_accuracy"], "eval_accuracy": accuracy,
                   "wrong_value_right": wv_right, "wrong_value_pairs": wv,
                   "agreement": metrics.get("heldout_test_agreement"), "failures": metrics.get("heldout_test_failures")}
            result["runs"].append(run)
            rows.append([spec, run["pairs"], f"{run['train_seconds']:.0f}", f"{run['train_accuracy']:.3f}",
                         f"{accuracy:.3f}", f"{wv_right}/{wv}", f"{accuracy * len(evals) - wv_right:.0f}/{len(evals) - wv}",
                         "-" if run["agreement"] is None else f"{run['agreement']:.3f} ({run['failures']})"])
    print("\n".join(_common.table(["design", "train pairs", "train s", "train acc", "held-out acc", "wrong_value right",
                                   "other right", "agreement (failures)"], rows)))
    print(result["date"], "|", result["machine"], "|", result["versions"])
    _common.save_results("bench_rm_designs", result)


if __name__ == "__main__":
    from rlhf.common import run_stage

    run_stage(main)
