"""Data for the three stages and the tools: TRL's standard formats (conversational SFT examples,
preference pairs, prompts) from local .jsonl/.json/.parquet files or hub datasets, validated row
by row so a mistake is one line naming file:line. The one jsonl reader of the project."""

import json
import os

from rlhf.settings import UserError

ROLES = ("system", "user", "assistant", "tool")  # what chat templates (ours, Qwen's, Llama's) render


def load_rows(source):
    """Rows (list of dicts) from a .jsonl/.json/.parquet file or a `datasets` hub id: "name",
    "name:split" or "name:config:split" (e.g. "openai_humaneval", "mbpp:sanitized:test"). Without a
    split: "train", or the dataset's only split. A file or id that cannot be read is a UserError."""
    if os.path.isdir(source):
        raise UserError(f"{source} is a folder; give a data file in it (.jsonl, .json or .parquet)")
    if os.path.exists(source):
        if os.path.getsize(source) == 0:
            raise UserError(f"{source} is empty")
        if source.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(source)
        if source.endswith(".json"):
            try:
                with open(source, encoding="utf-8") as f:
                    data = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{source}:{e.lineno}: malformed JSON ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise UserError(f"{source}: not UTF-8 text (byte {e.start})") from None
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of objects")
            return data
        if source.endswith(".parquet"):
            import datasets

            return datasets.load_dataset("parquet", data_files=source, split="train").to_list()
        raise UserError(f"{source}: unknown file type; use .jsonl, .json or .parquet")
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
        raise UserError(f"data file {source} not found (build the bundled data with `python scripts/build_data.py`)")
    return load_hub_rows(source)


def load_hub_rows(source):
    """Rows of the hub dataset `source` ("name[:config]:split", see load_rows)."""
    import datasets

    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UserError(f"{source!r} is neither a data file nor a hub dataset id (name, name:split or name:config:split)")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else None
    try:
        loaded = datasets.load_dataset(name, config or None, split=split or None)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"cannot load dataset {source!r} from the hub ({type(e).__name__}{': ' + reason if reason else ''}); "
                        "download it first or point the setting at a local file") from None
    if not split:  # a DatasetDict: "train", or the only split there is
        if "train" not in loaded and len(loaded) != 1:
            raise UserError(f"hub dataset {source!r} has the splits {', '.join(loaded)}: name one ({name}:{next(iter(loaded))})")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded.to_list()


def read_jsonl(path):
    """Rows of a .jsonl (or .jsonl.gz) file, each with its line number in `_line`; a missing file,
    a folder or a bad line is a UserError naming the file (and line)."""
    import gzip

    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a .jsonl file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def row_where(source, row, index):
    """Where a row is, for its errors: "file:line" (jsonl), else "source row N" (JSON, parquet, hub)."""
    return f"{source}:{row['_line']}" if "_line" in row else f"{source} row {index + 1}"


def _check_messages(messages, where, field):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `{field}` must be a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message in `{field}` needs a string `role` and `content`")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: unknown role {m['role']!r} in `{field}`; use {', '.join(ROLES)}")


def as_conversation(value, role):
    """A TRL field that may be plain text or a list of messages -> a list of messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def prompt_messages(row, where):
    """The prompt of a PPO row as messages: `prompt` (text or messages), else `messages` up to its
    last turn when that turn is the assistant's (an SFT conversation: its system message and earlier
    turns stay, its answer goes); a missing or malformed prompt is an error naming file and line."""
    if "prompt" in row:
        messages = as_conversation(row["prompt"], "user")
    elif "messages" in row:
        messages = row["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
    else:
        raise UserError(f"{where}: missing field `prompt`")
    _check_messages(messages, where, "prompt")
    return messages


def load_sft_examples(source):
    """SFT rows in TRL's conversational prompt-completion form: {"prompt": [messages],
    "completion": [assistant message]}. Accepts {"messages": [...]} (the last message must be
    the assistant's; loss goes on it) or {"prompt", "completion"} as text or messages. A
    conversation with several assistant turns stays {"messages": [...]}: every assistant turn
    trains (sft_rows), as TRL's assistant-only loss does."""
    out = []
    for i, row in enumerate(load_rows(source)):
        where = row_where(source, row, i)
        if "messages" in row:
            _check_messages(row["messages"], where, "messages")
            if row["messages"][-1]["role"] != "assistant":
                raise UserError(f"{where}: the last message must be the assistant's answer")
            if sum(m["role"] == "assistant" for m in row["messages"]) > 1:
                out.append({"messages": row["messages"], "where": where})
                continue
            prompt, completion = row["messages"][:-1], row["messages"][-1:]
        elif "prompt" in row and "completion" in row:
            prompt, completion = as_conversation(row["prompt"], "user"), as_conversation(row["completion"], "assistant")
            _check_messages(prompt, where, "prompt")
            _check_messages(completion, where, "completion")
        else:
            raise UserError(f"{where}: missing field: each row needs `messages`, or `prompt` and `completion`")
        out.append({"prompt": prompt, "completion": completion})
    return out


def conversation(example):
    """The whole conversation of an SFT example (load_sft_examples), prompt and answer(s)."""
    return example["messages"] if "messages" in example else example["prompt"] + example["completion"]


def sft_rows(tokenizer, examples):
    """The rows SFTTrainer trains on. Prompt-completion examples only: as they are (TRL puts the loss
    on the completion). With a conversation of several assistant turns among them: every example as
    {"input_ids", "labels"} (assistant_labels), which TRL trains on as given; a single-turn example
    gets the labels TRL would give it (tests/test_sft.py)."""
    if not any("messages" in ex for ex in examples):
        return examples
    return [assistant_labels(tokenizer, conversation(ex), ex.get("where", f"SFT example {i + 1}"))
            for i, ex in enumerate(examples)]


def assistant_labels(tokenizer, messages, where):
    """{"input_ids", "labels"} of a conversation through the chat template, labels -100 except on the
    assistant turns: what TRL's assistant_only_loss gives (TRL 1.16 needs `{% generation %}` markers
    in the template for it, which few models' templates have, and patches only templates it knows).
    An assistant turn runs from where the conversation before it, with the generation prompt, stops
    matching (TRL's prompt-completion rule, trl.data_utils.common_prefix_length) to where the
    conversation rendered up to and including it stops matching: its end-of-turn token trains, as in
    TRL; what a template writes only after the last message (Phi-3's EOS) trains on the last turn."""
    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=True,
                                             return_dict=True)["input_ids"]

    def common_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    ids = list(render(messages))
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = common_prefix(render(messages[:i], generation_prompt=True), ids) if i else 0
        end = common_prefix(render(messages[: i + 1]), ids)
        # the turn's text must lie in its span (whitespace aside: templates trim, tokenizers re-space)
        if "".join(m["content"].split()) not in "".join(tokenizer.decode(ids[start:end]).split()):
            raise UserError(f"{where}: the chat template writes assistant turn {sum(x['role'] == 'assistant' for x in messages[:i + 1])} "
                            "differently when another turn follows it (it drops or changes earlier turns), so that turn "
                            "cannot be trained where it stands; split the conversation into one row per assistant turn")
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def load_preference_pairs(source):
    """RM rows in TRL's conversational preference form {"prompt", "chosen", "rejected"}
    (implicit-prompt rows with only chosen/rejected conversations are accepted too)."""
    out = []
    for i, row in enumerate(load_rows(source)):
        where = row_where(source, row, i)
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{where}: missing field `{missing[0]}`: each row needs `prompt`, `chosen`, `rejected`")
        prompt = as_conversation(row.get("prompt", []), "user")
        chosen, rejected = as_conversation(row["chosen"], "assistant"), as_conversation(row["rejected"], "assistant")
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            _check_messages(value, where, field)
        if prompt:
            _check_messages(prompt, where, "prompt")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def template_lengths(tokenizer, conversations, source, add_generation_prompt=False):
    """Tokens of each conversation (a list of messages) through the tokenizer's chat template, as
    the trainers tokenise it. A conversation the template refuses (Gemma's and Mistral's raise on a
    system message, most on roles that do not alternate) is one line naming the file and the row."""
    import jinja2

    lengths = []
    for i, messages in enumerate(conversations):
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                return_dict=True)["input_ids"]
        except jinja2.TemplateError as e:
            raise UserError(f"{source}: row {i + 1}: the model's chat template refuses it ({e}); Gemma's and "
                            "Mistral's take no system message: put it in the first user message") from None
        lengths.append(len(ids))
    return lengths


def pair_lengths(tokenizer, pairs, source):
    """Tokens of the longer side of each preference pair (RewardTrainer drops a pair if either side
    is too long; train_dpo.py drops it as well rather than let DPOTrainer cut an answer short)."""
    chosen = template_lengths(tokenizer, [p["prompt"] + p["chosen"] for p in pairs], source)
    rejected = template_lengths(tokenizer, [p["prompt"] + p["rejected"] for p in pairs], source)
    return [max(c, r) for c, r in zip(chosen, rejected)]


def drop_too_long(examples, lengths, max_len, source, setting="MAX_LEN"):
    """Drop examples over max_len tokens (the value of `setting`) with a count; an error if none is left."""
    kept = [ex for ex, n in zip(examples, lengths) if n <= max_len]
    dropped = len(examples) - len(kept)
    if not kept:
        raise UserError(f"{source}: all {len(examples)} examples are longer than {setting}={max_len} tokens; raise {setting}")
    if dropped:
        print(f"dropped {dropped} of {len(examples)} examples of {source} longer than {setting}={max_len} tokens")
    return kept
