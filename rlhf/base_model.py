"""The embedded default base model: a byte-level BPE tokenizer trained on the bundled code data
and Python's own standard library, a ChatML chat template, and a small randomly initialised
Qwen2 causal LM. It is an ordinary Hugging Face folder, so every stage runs the same code path
it runs for Qwen2.5-Coder; SFT is what teaches it to write code.

train_sft.py builds it (resolve_base_model) when MODEL_NAME is the embedded default (BASE_MODEL_DIR)
and the folder does not exist yet; its size is set by the BASE_* constants in config.py.
"""

import os
import random
import sysconfig

from rlhf.data import read_jsonl
from rlhf.settings import UserError

# ChatML, as Qwen2.5 uses, with no system turn. EOS is <|im_end|>; padding has its own token
# so that masking padding never masks EOS (a policy whose EOS is masked never learns to stop).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# {% generation %} marks the assistant's tokens for TRL's assistant_only_loss; the turn's
# <|im_end|> is inside it so that a model trained that way also learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Texts whose token ids must survive save + reload unchanged (build_tokenizer's docstring: transformers
# reloads a qwen2 folder as Qwen2Tokenizer, which rebuilds the pre-tokenisation from its own code;
# tests/test_common.py::test_tokenizer_reload_keeps_ids_and_template checks these).
PROBE_TEXTS = [
    "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "用Python实现快速排序算法",
    "用Python实现二叉树遍历",
    "Write a function `add_3(x)` that returns x plus 3.\n\n\tindent  two  spaces",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n```python\nprint(1)\n```<|im_end|>\n",
    "x = [1, 2, 3]  # 注释 comment ünïcode 🙂",
]


def corpus_texts(data_files, stdlib_bytes):
    """Strings to train the tokenizer on: every string field of the bundled data files, plus
    up to `stdlib_bytes` of Python standard-library source (present on every machine)."""
    texts = []
    for path in data_files:
        if not os.path.exists(path):
            continue
        for row in read_jsonl(path):
            texts.extend(_strings_in(row))  # (its line number `_line` is no string: not taken)
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(stdlib, n) for n in os.listdir(stdlib) if n.endswith(".py"))
    random.Random(0).shuffle(files)
    taken = 0
    for path in files:
        if taken >= stdlib_bytes:
            break
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read()
        texts.append(text)
        taken += len(text)
    return texts


def _strings_in(obj):
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return []


def build_tokenizer(texts, vocab_size):
    """Byte-level BPE with our special tokens and chat template.

    Normaliser and pre-tokeniser are exactly Qwen2's (NFC, Qwen2's split regex with single
    digits, byte-level): transformers reloads any qwen2 folder as `Qwen2Tokenizer`, which
    rebuilds these from its own code, so a tokenizer trained with other rules would get other
    ids after the reload."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "right"  # training pads right; generation code switches to left
    return hf


def build_base_model(out_dir, settings, data_files=None, stdlib_bytes=3_000_000):
    """Build tokenizer + random Qwen2 model and save them to `out_dir`. Returns out_dir.

    Sizes, seed and answer length come from the BASE_*, SEED and GEN_MAX_NEW_TOKENS of `settings`
    (config.py's module in a stage; tests pass tiny sizes); the tokenizer is trained on `data_files`
    (default: its SFT_TRAIN_FILE, RM_TRAIN_FILE and PPO_PROMPTS_FILE) and some standard library."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if data_files is None:
        data_files = [settings.SFT_TRAIN_FILE, settings.RM_TRAIN_FILE, settings.PPO_PROMPTS_FILE]
    tokenizer = build_tokenizer(corpus_texts(data_files, stdlib_bytes), settings.BASE_VOCAB_SIZE)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.BASE_HIDDEN,
        num_hidden_layers=settings.BASE_LAYERS,
        num_attention_heads=settings.BASE_HEADS,
        num_key_value_heads=settings.BASE_KV_HEADS,
        intermediate_size=settings.BASE_INTERMEDIATE,
        max_position_embeddings=settings.BASE_MAX_POSITIONS,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    torch.manual_seed(settings.SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=settings.GEN_MAX_NEW_TOKENS,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # The reload must give the same ids, or every later stage silently sees other tokens.
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    for text in PROBE_TEXTS:
        if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise RuntimeError(f"tokenizer reload changed the ids of {text!r} ({type(reloaded).__name__})")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built the embedded base model in {out_dir}: {n_params / 1e6:.1f}M parameters, "
          f"vocabulary {len(tokenizer)}")
    return out_dir


def resolve_base_model(settings):
    """The folder or hub id of the base model MODEL_NAME of `settings` (config.py's module in a
    stage) names. Builds the embedded default (build_base_model) when it is what MODEL_NAME names
    and it does not exist yet."""
    name = settings.MODEL_NAME
    if os.path.normpath(name) == os.path.normpath(settings.BASE_MODEL_DIR) and not os.path.exists(
            os.path.join(name, "config.json")):
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            build_base_model(name, settings)
        state.wait_for_everyone()
        return name
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and os.path.exists(name.split(os.sep)[0])
    if looks_local and not os.path.exists(os.path.join(os.path.expanduser(name), "config.json")):
        raise UserError(f"MODEL_NAME {name!r} is not a model folder (no config.json there); "
                        "give a hub id or a folder saved with save_pretrained")
    return name
