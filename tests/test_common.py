"""Shared helpers: the embedded tokenizer and chat template, pad/EOS handling, data loading and
its errors, and the stage hand-off."""

import json
import os

import pytest

import config as C
from conftest import write_jsonl
from rlhf.common import STAGE_INFO_FILE, check_output_dir, load_tokenizer, require_stage_output, save_stage_output
from rlhf.data import load_preference_pairs, load_sft_examples
from rlhf.settings import UserError

CONVERSATION = [{"role": "user", "content": "用Python实现快速排序算法"},
                {"role": "assistant", "content": "```python\ndef quick_sort(a):\n    return sorted(a)\n```"}]


def test_tokenizer_reload_keeps_ids_and_template(tiny_base):
    from transformers import AutoTokenizer

    from rlhf.base_model import PROBE_TEXTS

    tok = load_tokenizer(tiny_base)
    again = AutoTokenizer.from_pretrained(tiny_base)
    for text in PROBE_TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template


def test_chat_template_round_trip(tiny_base):
    tok = load_tokenizer(tiny_base)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<|im_start|>user\n用Python实现快速排序算法<|im_end|>\n<|im_start|>assistant\n"
                    "```python\ndef quick_sort(a):\n    return sorted(a)\n```<|im_end|>\n")
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE loses nothing, Chinese included
    # the generation prompt is exactly the prefix the full conversation starts its answer with
    prompt = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_pad_differs_from_eos_and_eos_ends_the_answer(tiny_base):
    tok = load_tokenizer(tiny_base)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2  # one per turn: the model learns to stop
    assert tok.pad_token_id not in ids


def test_tokenizer_without_distinct_pad_borrows_a_special_token(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.pad_token = tok.eos_token  # the usual broken set-up: pad == EOS
    tok.save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token_id != fixed.eos_token_id
    assert fixed.pad_token in ("<|pad|>", "<|endoftext|>")


def test_sft_formats_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CONVERSATION},
        {"prompt": "hi", "completion": "```python\nprint(1)\n```"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "x"}]},
    ])
    rows = load_sft_examples(path)
    assert rows[0] == {"prompt": CONVERSATION[:1], "completion": CONVERSATION[1:]}
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[1]["completion"][0]["role"] == "assistant"
    assert rows[2]["completion"] == [{"role": "assistant", "content": "x"}]


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "a"}]}\n{"oops": 1}\n', r"d.jsonl:1: the last message must be the assistant"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"oops": 1}\n',
     r"d.jsonl:2: missing field"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{not json\n',
     r"d.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}\n', r"d.jsonl:1: .*`role` and `content`"),
    ('\n\n', r"holds no rows"),
    ('[1, 2]\n', r"d.jsonl:1: expected a JSON object"),
])
def test_malformed_sft_data_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_sft_examples(str(tmp_path / "d.jsonl"))


def test_non_utf8_and_missing_and_empty_files(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: not UTF-8"):
        load_sft_examples(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="not found"):
        load_sft_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_sft_examples(str(tmp_path / "empty.jsonl"))


def test_preference_pairs_need_chosen_and_rejected(tmp_path):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    assert load_preference_pairs(write_jsonl(tmp_path / "ok.jsonl", [good, dict(good, prompt="q")]))[1]["prompt"] == \
        [{"role": "user", "content": "q"}]
    with pytest.raises(UserError, match=r"p.jsonl:2: missing field `rejected`"):
        load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": "q", "chosen": "a"}]))


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
