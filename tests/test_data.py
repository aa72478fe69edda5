"""rlhf/data.py: the TRL data formats of the three stages, read by one jsonl reader, and every
mistake as one line naming file and line."""

import os

import pytest

from conftest import write_jsonl
from rlhf.data import load_preference_pairs, load_rows, load_sft_examples, read_jsonl
from rlhf.settings import UserError

CONVERSATION = [{"role": "user", "content": "用Python实现快速排序算法"},
                {"role": "assistant", "content": "```python\ndef quick_sort(a):\n    return sorted(a)\n```"}]


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


def test_unknown_role_names_file_line_and_the_roles(tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "robot", "content": "a"}, CONVERSATION[1]]}]
    with pytest.raises(UserError, match=r"d.jsonl:2: unknown role 'robot' in `messages`; use system, user, assistant, tool"):
        load_sft_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    system = {"messages": [{"role": "system", "content": "be brief"}] + CONVERSATION}
    assert load_sft_examples(write_jsonl(tmp_path / "s.jsonl", [system]))[0]["prompt"][0]["role"] == "system"


def test_a_folder_is_not_a_data_file(tmp_path):
    os.makedirs(tmp_path / "d.jsonl")
    for read in (load_rows, read_jsonl, load_sft_examples):
        with pytest.raises(UserError, match=r"d.jsonl is a folder"):
            read(str(tmp_path / "d.jsonl"))


def test_read_jsonl_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(str(tmp_path / "r.jsonl")) == [{"a": 1, "_line": 1}, {"a": 2, "_line": 3}]
    with pytest.raises(UserError, match=r"nope.jsonl: no such file"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("source", ["openai_humaneval", "mbpp:sanitized:test", "someone/my-tasks:train"])
def test_a_hub_id_that_cannot_be_reached_is_one_line(source, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1, as conftest sets it), a hub id is one line naming it and why."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=rf"cannot load dataset '{source}' from the hub \(ConnectionError: .*Offline") as e:
        load_rows(source)
    assert "\n" not in str(e.value)


def test_hub_ids_name_config_and_split(monkeypatch):
    """"name", "name:split" and "name:config:split" reach datasets.load_dataset as such; without a
    split, "train" or the only split; more than three parts is not an id."""
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        rows = datasets.Dataset.from_list([{"x": 1}])
        return rows if split else datasets.DatasetDict({"test": rows} if name == "one_split" else {"a": rows, "b": rows})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_rows("mbpp:sanitized:test") == [{"x": 1}] and calls[-1] == ("mbpp", "sanitized", "test")
    assert load_rows("trl-lib/Capybara:train") == [{"x": 1}] and calls[-1] == ("trl-lib/Capybara", None, "train")
    assert load_rows("one_split") == [{"x": 1}] and calls[-1] == ("one_split", None, None)
    with pytest.raises(UserError, match=r"has the splits a, b: name one \(two_splits:a\)"):
        load_rows("two_splits")
    with pytest.raises(UserError, match="neither a data file nor a hub dataset id"):
        load_rows("a:b:c:d")
