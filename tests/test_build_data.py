"""scripts/build_data.py and the bundled data it writes: formats, labels verified by execution,
disjoint splits, determinism."""
import filecmp
import json
import os
import subprocess
import sys

import pytest

from rlhf import codeeval
from rlhf.data import read_jsonl
from rlhf.settings import UserError
from scripts import build_data

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
FILES = ["sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_prompts", "eval_tasks", "val_tasks"]


def rows(name):
    return [{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(os.path.join(DATA, name + ".jsonl"))]


def test_formats_and_disjoint_splits():
    sft = rows("sft_train")
    assert all(r["messages"][1]["content"].startswith("```python\n") and r["messages"][1]["content"].endswith("\n```")
               for r in sft)
    pair = rows("rm_train")[0]
    assert {"prompt", "chosen", "rejected", "bug"} <= set(pair) and pair["chosen"] != pair["rejected"]
    train_ids = {r["task_id"] for r in sft}
    for name in ("sft_eval", "ppo_prompts", "eval_tasks", "val_tasks"):
        assert not train_ids & {r["task_id"] for r in rows(name)}, name
    assert not {r["task_id"] for r in rows("ppo_prompts")} & {r["task_id"] for r in rows("eval_tasks")}
    val = {r["task_id"] for r in rows("val_tasks")}  # the validation split: trained on by nothing, not the eval set
    assert val and not val & ({r["task_id"] for r in rows("ppo_prompts")} | {r["task_id"] for r in rows("eval_tasks")})
    # held-out parameter values: present in eval, absent from SFT
    assert any(r["heldout_params"] for r in rows("eval_tasks"))
    assert {"zh", "en"} == {r["lang"] for r in sft}
    assert len({r["family"] for r in sft}) >= 30
    assert "用Python实现快速排序算法" in {r["messages"][0]["content"] for r in sft}


def test_eval_and_ppo_files_load_as_problems():
    for name in ("eval_tasks", "ppo_prompts", "val_tasks"):
        problems = codeeval.load_problems(os.path.join(DATA, name + ".jsonl"))
        assert all(p.format == "project" for p in problems)
        assert problems[0].messages()[0]["role"] == "user"


def small_tasks():
    rng = build_data.random.Random(0)
    return [t for fam in build_data.task_families.F[:2] for t in build_data.instances(0, fam, rng)][:4]


def test_verify_rejects_a_corrupt_reference():
    tasks = small_tasks()
    build_data.verify(tasks, tasks[:1], workers=2)  # the real labels pass
    broken = dict(tasks[0], solution=tasks[0]["solution"].replace("==", "!="))
    with pytest.raises(UserError, match="reference"):
        build_data.verify([broken], [], workers=2)
    no_bug = dict(tasks[0], bugs={"same": tasks[0]["solution"]})  # a "bug" that passes
    with pytest.raises(UserError, match="no bug fails"):
        build_data.verify([no_bug], [no_bug], workers=2)


def test_build_is_deterministic(tmp_path):
    for d in ("a", "b"):
        subprocess.run([sys.executable, "scripts/build_data.py", "--families", "2", "--seed", "3",
                        "--out", str(tmp_path / d)], check=True, capture_output=True)
    for name in FILES:
        assert filecmp.cmp(tmp_path / "a" / f"{name}.jsonl", tmp_path / "b" / f"{name}.jsonl", shallow=False), name
    assert json.loads(open(tmp_path / "a" / "eval_tasks.jsonl").readline())["family"] in ("sum_multiples", "count_char")
