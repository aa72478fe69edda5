"""A matrix of model families: every stage (train_sft.py, train_rm.py, train_ppo.py, train_dpo.py,
scripts/evaluate.py, scripts/generate.py) on tiny models built here with the chat template and
special-token conventions of the families users bring, and what must hold whatever the family:
one BOS per sequence (none where the template writes none), the SFT loss on the answer only, the same token ids for the same
conversation in SFT, RM, PPO and evaluation, and answers that stop at every token that ends a turn.

Each family is its real architecture at a tiny size (random weights, hidden 32), a byte-level BPE
trained here on the toy data with the family's special tokens, and a short chat template of our
own that writes the same tokens in the same structure as the real one:
  qwen2.5  ChatML with a default system message; EOS <|im_end|>, pad <|endoftext|>, and both in the
           generation_config's EOS ids; no BOS.
  llama3   the template writes <|begin_of_text|>, which the tokenizer also puts before any text it
           encodes; <|eot_id|> ends a turn, EOS is <|end_of_text|> (the only EOS id its
           generation_config lists, as in Llama 3's first release); no pad token.
  mistral  <s>[INST] ...[/INST] answer</s> (v3 tokenizer: [INST] and [/INST] are special tokens);
           a system message raises; no pad token (<unk> pads).
  gemma2   <bos><start_of_turn>user ...<end_of_turn>, the answer's role is `model`; a system
           message raises; soft-capped logits (head_scales_logits).
  phi3     <|user|> ...<|end|> <|assistant|> ...<|end|>, then EOS <|endoftext|> (which is also its
           pad); no BOS in the template although the tokenizer adds one; three generation_config
           EOS ids.
  base     a Llama 3 style base model with no chat template: SFT installs ChatML
           (--CHAT_TEMPLATE=chatml), adding its tokens and resizing the embeddings.
  starcoder2  a base code model whose BOS, EOS and unk are all <|endoftext|>, no pad (<fim_pad>
           pads), no chat template: SFT installs ChatML.
The stages run in this process (run_in_process) with spies on what they tokenise and where they stop.
"""

import json
import shutil

import pytest

from conftest import toy_conversations, toy_preference_pairs, write_jsonl
from rlhf.settings import scalar_settings

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}")
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}" + ALTERNATE +
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}" + ALTERNATE +
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (  # no BOS; EOS after the last message of a conversation that asks for no answer
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
# special: the vocabulary's special tokens, in id order; adds_bos: the tokenizer puts BOS before any
# text it encodes (its post-processor, as the real ones do); bos_first: every sequence starts with one
# BOS (the template writes it; Phi-3's and StarCoder2's, whose BOS is its EOS, have none); ends_turn:
# what the template writes after an answer; stage_args: what the stages need for this family
FAMILIES = {
    "qwen2.5": dict(arch="Qwen2Config", special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                    eos="<|im_end|>", pad="<|endoftext|>", unk=None, adds_bos=False, bos_first=False, template=QWEN25_TEMPLATE,
                    generation_eos=["<|im_end|>", "<|endoftext|>"], ends_turn="<|im_end|>", tied=True),
    "llama3": dict(arch="LlamaConfig", special=LLAMA3_SPECIAL, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                   unk=None, adds_bos=True, bos_first=True, template=LLAMA3_TEMPLATE, generation_eos=["<|end_of_text|>"],
                   ends_turn="<|eot_id|>", tied=False),
    "mistral": dict(arch="MistralConfig", special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>",
                    pad=None, unk="<unk>", adds_bos=True, bos_first=True, template=MISTRAL_TEMPLATE, generation_eos=["</s>"],
                    ends_turn="</s>", tied=False),
    "gemma2": dict(arch="Gemma2Config", special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                   bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", adds_bos=True, bos_first=True,
                   template=GEMMA_TEMPLATE,
                   generation_eos=["<eos>", "<end_of_turn>"], ends_turn="<end_of_turn>", tied=True),
    "phi3": dict(arch="Phi3Config", special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                                              "<|system|>", "<|user|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", adds_bos=True, bos_first=False,
                 template=PHI3_TEMPLATE,
                 generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"], ends_turn="<|end|>", tied=False),
    "base": dict(arch="LlamaConfig", special=LLAMA3_SPECIAL[:2], bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                 unk=None, adds_bos=True, bos_first=True, template=None, generation_eos=["<|end_of_text|>"], ends_turn="<|im_end|>",
                 tied=False, stage_args=["--CHAT_TEMPLATE=chatml"]),
    "starcoder2": dict(arch="Starcoder2Config", special=["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>",
                                                         "<fim_pad>", "<repo_name>", "<file_sep>"],
                       bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>", adds_bos=False,
                       bos_first=False, template=None, generation_eos=["<|endoftext|>"], ends_turn="<|im_end|>", tied=True,
                       stage_args=["--CHAT_TEMPLATE=chatml"]),
}

SHARED = (3, 7)  # add_k tasks whose prompt is in every stage's data: the same conversation everywhere


def prompt_text(k):
    return f"Write a function add_{k}(x) that returns x plus {k}."


def answer_text(k, sign="+"):
    return f"```python\ndef add_{k}(x):\n    return x {sign} {k}\n```"


def build_tokenizer(family, texts):
    """A byte-level BPE of ~320 tokens with the family's special tokens, EOS, BOS, pad and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=f["special"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if f["adds_bos"]:
        bos = (f["bos"], tok.token_to_id(f["bos"]))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    named = {f[k] for k in ("bos", "eos", "pad", "unk")}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"], pad_token=f["pad"],
                                 unk_token=f["unk"], additional_special_tokens=[t for t in f["special"] if t not in named])
    hf.chat_template = f["template"]
    return hf


def build_family(family, folder, texts):
    """Save a tiny random model of `family` with its tokenizer and generation_config to `folder`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    f = FAMILIES[family]
    tok = build_tokenizer(family, texts)
    extra = dict(head_dim=8, sliding_window=32, query_pre_attn_scalar=8) if f["arch"] == "Gemma2Config" else {}
    config = getattr(transformers, f["arch"])(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=f["tied"], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    stops = tok.convert_tokens_to_ids(f["generation_eos"])
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=stops[0] if len(stops) == 1 else stops)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def family_data(tmp_path_factory):
    """Toy files for every stage; the SHARED prompts are in each (SFT and RM with the same answer)."""
    folder = tmp_path_factory.mktemp("family_data")
    shared = [{"messages": [{"role": "user", "content": prompt_text(k)}, {"role": "assistant", "content": answer_text(k)}]}
              for k in SHARED]
    pairs = [{"prompt": [{"role": "user", "content": prompt_text(k)}], "chosen": [{"role": "assistant", "content": answer_text(k)}],
              "rejected": [{"role": "assistant", "content": answer_text(k, "-")}]} for k in SHARED]
    tasks = [{"task_id": f"t{k}", "prompt": prompt_text(k), "entry_point": f"add_{k}",
              "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}], "solution": f"def add_{k}(x):\n    return x + {k}"}
             for k in SHARED]
    ppo = [dict(tasks[0], prompt=[{"role": "user", "content": prompt_text(SHARED[0])}]),  # with tests
           {"prompt": [{"role": "user", "content": prompt_text(SHARED[1])}]}]  # without: the RM scores it
    files = {
        "sft_train": write_jsonl(folder / "sft_train.jsonl", toy_conversations(14, seed=1) + shared),
        "sft_eval": write_jsonl(folder / "sft_eval.jsonl", toy_conversations(4, seed=2)),
        "rm_train": write_jsonl(folder / "rm_train.jsonl", toy_preference_pairs(12, seed=3) + pairs),
        "rm_eval": write_jsonl(folder / "rm_eval.jsonl", toy_preference_pairs(4, seed=4)),
        "tasks": write_jsonl(folder / "tasks.jsonl", tasks),
        "ppo": write_jsonl(folder / "ppo.jsonl", ppo),
    }
    rows = toy_conversations(64, seed=5) + shared
    files["texts"] = [m["content"] for r in rows for m in r["messages"]]
    return files


@pytest.fixture(scope="session")
def family_bases(tmp_path_factory, family_data):
    """{family: folder of its tiny base model}, built once."""
    folder = tmp_path_factory.mktemp("family_bases")
    return {name: build_family(name, folder / name, family_data["texts"]) for name in FAMILIES}


def stop_ids(tok, family):
    """The ids that must end an answer of `family`: its EOS, its generation_config's and its turn end."""
    f = FAMILIES[family]
    return set(tok.convert_tokens_to_ids([f["eos"], f["ends_turn"], *f["generation_eos"]]))


def unpadded(ids, mask):
    """The rows of a left-padded batch without their padding, as lists."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


class Spy:
    """Records the arguments of the calls of a function it replaces (and its results)."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, self.real = [], getattr(owner, name)
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        result = self.real(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


@pytest.mark.parametrize("family", [name for name in FAMILIES if FAMILIES[name]["template"]])
def test_each_family_pads_apart_and_stops_at_every_turn_end(family, family_bases):
    """load_tokenizer's pad is neither the EOS nor the turn's end; the stop ids are the family's
    (Qwen2.5's pad <|endoftext|> is one of them: its generation_config lists it); evaluation
    generates with them, from prompts with one BOS."""
    from rlhf.codeeval import generate_completions
    from rlhf.common import end_of_turn_ids, load_for_generation

    model, tok = load_for_generation(family_bases[family], "auto")
    assert tok.pad_token_id not in end_of_turn_ids(tok)
    assert set(end_of_turn_ids(tok, model)) == stop_ids(tok, family)
    messages = [{"role": "user", "content": prompt_text(3)}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == FAMILIES[family]["bos_first"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids  # how evaluation and PPO encode it
    (answer,), = generate_completions(model, tok, [messages], max_new_tokens=4, progress=False)
    assert isinstance(answer, str)


@pytest.mark.parametrize("family", [name for name in FAMILIES if FAMILIES[name]["template"]])
def test_every_assistant_turn_trains_on_each_familys_template(family, family_data):
    """Multi-turn SFT (rlhf.data.assistant_labels) on each family's template: both answers of a
    2-turn conversation and the token that ends each turn carry labels, the prompts do not."""
    from rlhf.data import assistant_labels

    tok = build_tokenizer(family, family_data["texts"])
    turns = [{"role": "user", "content": prompt_text(3)}, {"role": "assistant", "content": answer_text(3)},
             {"role": "user", "content": prompt_text(7)}, {"role": "assistant", "content": answer_text(7)}]
    row = assistant_labels(tok, turns, "x")
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    untrained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == -100])
    text = tok.decode(trained)
    assert text.index("x + 3") < text.index("x + 7") and prompt_text(3) in untrained and prompt_text(7) in untrained
    assert "add_3(x) that" not in text and "add_7(x) that" not in text
    assert trained.count(tok.convert_tokens_to_ids(FAMILIES[family]["ends_turn"])) == 2, text


def test_a_base_model_without_a_chat_template_is_one_line_or_tuned_on_chatml(family_bases, family_data, tmp_path,
                                                                             run_in_process):
    args = [f"--MODEL_NAME={family_bases['base']}", f"--SFT_DIR={tmp_path}/sft_model", f"--RUNS_DIR={tmp_path}/runs",
            f"--SFT_TRAIN_FILE={family_data['sft_train']}", f"--SFT_EVAL_FILE={family_data['sft_eval']}"]
    proc = run_in_process("train_sft.py", *args)
    assert proc.returncode == 2 and "has no chat template" in proc.stderr and "--CHAT_TEMPLATE=chatml" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # LoRA cannot train the embeddings of the tokens ChatML adds
    proc = run_in_process("train_sft.py", *args, "--CHAT_TEMPLATE=chatml", "--USE_LORA=true")
    assert proc.returncode == 2 and "--USE_LORA=false" in proc.stderr and "Traceback" not in proc.stderr


def test_a_template_that_refuses_a_system_message_is_one_line_in_every_stage(family_bases, tmp_path, run_in_process):
    """Gemma's and Mistral's templates raise on a system message: the stage names the file and row
    (it was jinja's traceback)."""
    from rlhf.handoff import save_stage_output

    system = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": prompt_text(3)}]
    answer = [{"role": "assistant", "content": answer_text(3)}]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"messages": system + answer}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": system, "chosen": answer, "rejected": answer}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": system}])
    for stage in ("sft", "rm"):  # stage outputs as far as the data checks need them
        save_stage_output(str(tmp_path / stage), stage,
                          lambda tmp: shutil.copytree(family_bases["mistral"], tmp, dirs_exist_ok=True), {},
                          scalar_settings())
    runs = f"--RUNS_DIR={tmp_path}/runs"
    for proc, source in (
            (run_in_process("train_sft.py", f"--MODEL_NAME={family_bases['gemma2']}", f"--SFT_DIR={tmp_path}/o", runs,
                            f"--SFT_TRAIN_FILE={sft_file}", f"--SFT_EVAL_FILE={sft_file}"), sft_file),
            (run_in_process("train_rm.py", f"--SFT_DIR={tmp_path}/sft", f"--RM_DIR={tmp_path}/o", runs,
                            f"--RM_TRAIN_FILE={pairs}", f"--RM_EVAL_FILE={pairs}"), pairs),
            (run_in_process("train_ppo.py", f"--SFT_DIR={tmp_path}/sft", f"--RM_DIR={tmp_path}/rm", f"--PPO_DIR={tmp_path}/o",
                            runs, f"--PPO_PROMPTS_FILE={prompts}"), prompts)):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"{source}: row 1: the model's chat template refuses it (System role not supported)" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_on_the_family(family, family_bases, family_data, tmp_path, run_in_process, monkeypatch):
    """SFT, RM, DPO, PPO (2 iterations), scripts/evaluate.py and scripts/generate.py run to the end on
    the family; every sequence has the BOS its template writes, once; SFT's labels are the answer and
    the turn's end; the RM, DPO, PPO and every evaluation see SFT's token ids for the same conversation;
    sampling and the saved generation_config stop at every id that ends an answer."""
    import trl
    from transformers import GenerationConfig

    import rlhf.generation
    import train_ppo
    import train_sft
    from rlhf.common import load_tokenizer
    from rlhf.reward import conversation_ids

    f, d = FAMILIES[family], family_data
    common = [f"--RUNS_DIR={tmp_path}/runs", f"--EVAL_TASKS_FILE={d['tasks']}", "--EVAL_SAMPLES=0",
              "--SEED_PROMPT_SAMPLES=0", "--GEN_MAX_NEW_TOKENS=8", "--REPORT_TO=none", "--LOG_EVERY=1"]
    sft, rm, ppo, dpo = tmp_path / "sft_model", tmp_path / "rm_model", tmp_path / "ppo_model", tmp_path / "dpo_model"
    sft_trainers, rm_trainers, dpo_trainers = Spy(monkeypatch, train_sft, "sft_trainer"), [], []
    generated = Spy(monkeypatch, rlhf.generation, "generate")  # every evaluation's and tool's prompts

    class RewardTrainer(trl.RewardTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rm_trainers.append(self)

    class DPOTrainer(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dpo_trainers.append(self)

    monkeypatch.setattr(trl, "RewardTrainer", RewardTrainer)
    monkeypatch.setattr(trl, "DPOTrainer", DPOTrainer)

    # ---- SFT
    proc = run_in_process("train_sft.py", f"--MODEL_NAME={family_bases[family]}", f"--SFT_DIR={sft}",
                          f"--SFT_TRAIN_FILE={d['sft_train']}", f"--SFT_EVAL_FILE={d['sft_eval']}", "--EPOCHS=1",
                          "--BATCH_SIZE=8", "--SFT_EARLY_STOP_PATIENCE=0", "--MAX_LEN=256", *common, *f.get("stage_args", []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = load_tokenizer(str(sft))
    bos, stops, end = tok.bos_token_id, stop_ids(tok, family), tok.convert_tokens_to_ids(f["ends_turn"])
    assert tok.pad_token_id is not None and tok.pad_token_id not in {tok.eos_token_id, end}

    def one_bos(ids, what):
        first = f["bos_first"]
        assert ids.count(bos) == first and (not first or ids[0] == bos), (what, tok.decode(ids))

    trainer = sft_trainers.calls[0][2]
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    prompts, conversations = {}, {}  # SFT's token ids of the shared prompts and conversations, by prompt text
    for i, row in enumerate(rows):
        ids, answer = row["input_ids"], [int(label != -100) for label in row["labels"]]  # TRL's completion mask
        one_bos(ids, "SFT example")
        assert (batch["labels"][i, :len(ids)] != -100).long().tolist() == answer  # what the loss sees
        n = answer.index(1)
        assert 0 not in answer[n:] and end in ids[n:]  # the answer's tokens, with the turn's end (learns to stop)
        assert ids[:n] == tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
        text = row["prompt"][-1]["content"]
        prompts[text], conversations[text] = ids[:n], ids
    assert {prompt_text(k) for k in SHARED} <= set(prompts)

    # ---- RM: the same conversation, the same ids
    proc = run_in_process("train_rm.py", f"--SFT_DIR={sft}", f"--RM_DIR={rm}", f"--RM_TRAIN_FILE={d['rm_train']}",
                          f"--RM_EVAL_FILE={d['rm_eval']}", "--RM_EPOCHS=1", "--RM_BATCH_SIZE=8",
                          f"--RM_ONPOLICY_PROMPTS_FILE={d['tasks']}", "--RM_ONPOLICY_SAMPLES=1", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for row in rm_trainers[0].train_dataset:
        for side in ("chosen", "rejected"):
            one_bos(row[f"{side}_ids"], "RM input")
        text = row["prompt"][-1]["content"]
        chosen = row["chosen"] if row["chosen"][0]["role"] != "assistant" else row["prompt"] + row["chosen"]
        assert row["chosen_ids"] == conversation_ids(tok, chosen)  # what PPO's scoring builds
        if text in conversations:  # SFT's answer to a prompt is the RM's chosen one
            assert row["chosen_ids"] == conversations[text]
            seen.add(text)
    assert {prompt_text(k) for k in SHARED} <= seen

    # ---- DPO: the same conversation, the same ids (prompt + chosen as DPOTrainer tokenises them)
    proc = run_in_process("train_dpo.py", f"--SFT_DIR={sft}", f"--DPO_DIR={dpo}", f"--RM_TRAIN_FILE={d['rm_train']}",
                          f"--RM_EVAL_FILE={d['rm_eval']}", "--DPO_EPOCHS=1", "--DPO_BATCH_SIZE=8", "--MAX_LEN=256",
                          *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for row in dpo_trainers[0].train_dataset:
        for side in ("chosen", "rejected"):
            one_bos(row["prompt_ids"] + row[f"{side}_ids"], "DPO input")
        text = row["prompt"][-1]["content"]
        assert row["prompt_ids"] + row["chosen_ids"] == conversation_ids(tok, row["prompt"] + row["chosen"])
        if text in conversations:  # SFT's answer to a prompt is DPO's chosen one
            assert row["prompt_ids"] + row["chosen_ids"] == conversations[text] and row["prompt_ids"] == prompts[text]
            seen.add(text)
    assert {prompt_text(k) for k in SHARED} <= seen
    assert (dpo / "rlhf_stage.json").exists()

    # ---- PPO: its prompts are SFT's, it stops at every end of a turn
    encoded, sampled = Spy(monkeypatch, train_ppo, "encode_prompts"), Spy(monkeypatch, train_ppo, "sample")
    proc = run_in_process("train_ppo.py", f"--SFT_DIR={sft}", f"--RM_DIR={rm}", f"--PPO_DIR={ppo}",
                          f"--PPO_PROMPTS_FILE={d['ppo']}", "--PPO_STEPS=2", "--PPO_BATCH_SIZE=4", "--PPO_MINI_BATCH_SIZE=2",
                          "--PPO_SAMPLES_PER_PROMPT=2", "--PPO_OVERSAMPLE=1", "--PPO_EPOCHS=1", "--PPO_RESPONSE_LEN=8",
                          "--MAX_LEN=128", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (_, asked, _), _, (query, mask) in encoded.calls:
        for row, ids in zip(asked, unpadded(query, mask)):
            assert ids == prompts[row["messages"][-1]["content"]]
    for (_, _, _, eos_ids, pad_id), _, _ in sampled.calls:
        assert stops <= set(eos_ids) and pad_id == tok.pad_token_id
    assert len([h for h in json.load(open(ppo / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]) == 2
    for folder in (sft, ppo, dpo):  # transformers' generate() stops where our stages stop
        saved = GenerationConfig.from_pretrained(folder).eos_token_id
        assert stops <= set(saved if isinstance(saved, list) else [saved]), folder

    # ---- the tools
    proc = run_in_process("scripts/evaluate.py", "--model", str(ppo), "--problems", d["tasks"], "--max-new-tokens", "8",
                          "--out", str(tmp_path / "evaluate.jsonl"), "--SANDBOX_TIMEOUT_S=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@1" in json.loads(proc.stdout)
    proc = run_in_process("scripts/generate.py", "--model", str(ppo), "--greedy", "--max-new-tokens", "8",
                          prompt_text(SHARED[0]))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # every evaluation (SFT's, the RM's on-policy answers, PPO's, the tools'): SFT's prompt ids, every stop
    assert len(generated.calls) >= 5
    for (_, ids, mask, _, eos_ids, pad_id), _, _ in generated.calls:
        assert all(row in prompts.values() for row in unpadded(ids, mask))
        assert stops <= set(eos_ids) and pad_id == tok.pad_token_id


@pytest.mark.slow
def test_ppo_rollouts_end_at_the_token_that_ends_a_turn(family_bases, family_data, tmp_path, run_in_process, monkeypatch):
    """Llama 3 ends a turn with <|eot_id|> and a document with <|end_of_text|>, its tokenizer's EOS
    and the only EOS id its generation_config lists. A policy planted to answer <|eot_id|> at once:
    every rollout ends at its first token, and the rollout mask holds that token alone. (PPO stopped
    only at the tokenizer's EOS before 5941bbc: every rollout ran to PPO_RESPONSE_LEN and got the
    missing-EOS penalty, 0% ended.)"""
    import torch
    from transformers import AutoModelForCausalLM

    import rlhf.ppo_models
    import train_ppo
    from rlhf.common import load_tokenizer
    from rlhf.handoff import save_stage_output
    from rlhf.reward import load_reward_model, save_reward_normalization

    base, sft, rm = family_bases["llama3"], str(tmp_path / "sft_model"), str(tmp_path / "rm_model")
    tok = load_tokenizer(base)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():  # residual dimension 0 is 1 at every position, and only <|eot_id|>'s output row reads it
        policy.model.embed_tokens.weight[:, 0] = 1.0
        for layer in policy.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        policy.lm_head.weight[:, 0] = 0.0
        policy.lm_head.weight[eot, 0] = 50.0
    policy.config.pad_token_id = tok.pad_token_id
    save_stage_output(sft, "sft", lambda tmp: (policy.save_pretrained(tmp), tok.save_pretrained(tmp)), {},
                      scalar_settings())
    reward_model = load_reward_model(sft)

    def save_rm(tmp):
        save_reward_normalization(tmp, {"mean": 0.0, "std": 1.0}, reward_model)
        reward_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    save_stage_output(rm, "rm", save_rm, {}, scalar_settings())
    # the rollout's masks: after sampling (train_ppo.rollout) and padded to every process's width (Rollout.padded)
    masks = [Spy(monkeypatch, train_ppo, "first_eos_mask"), Spy(monkeypatch, rlhf.ppo_models, "first_eos_mask")]
    proc = run_in_process("train_ppo.py", f"--SFT_DIR={sft}", f"--RM_DIR={rm}", f"--PPO_DIR={tmp_path}/ppo_model",
                          f"--RUNS_DIR={tmp_path}/runs", f"--PPO_PROMPTS_FILE={family_data['ppo']}",
                          f"--EVAL_TASKS_FILE={family_data['tasks']}", "--PPO_STEPS=2", "--PPO_BATCH_SIZE=4",
                          "--PPO_MINI_BATCH_SIZE=2", "--PPO_SAMPLES_PER_PROMPT=2", "--PPO_OVERSAMPLE=1", "--PPO_EPOCHS=1",
                          "--PPO_RESPONSE_LEN=8", "--GEN_MAX_NEW_TOKENS=8", "--MAX_LEN=128", "--PPO_EVAL_EVERY=0",
                          "--PPO_SAVE_EVERY=0", "--EVAL_SAMPLES=0", "--SEED_PROMPT_SAMPLES=0", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [h for h in json.load(open(tmp_path / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]
    assert [h["eos_rate"] for h in history] == [1.0, 1.0], history
    assert [h["response_length"] for h in history] == [1.0, 1.0]
    assert all(spy.calls for spy in masks)
    for (response, _), _, (mask, ends, last) in masks[0].calls + masks[1].calls:  # the <|eot_id|> and nothing after it
        assert (response[:, 0] == eot).all() and ends.all() and (last == 0).all() and mask.sum(1).eq(1).all()
