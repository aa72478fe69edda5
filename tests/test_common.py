"""rlhf/common.py: the embedded tokenizer and chat template, pad/EOS handling, LoRA set-up, the
Trainer schedule SFT and RM share, the PPO prompt generator."""

import pytest

import config as C
from rlhf.common import check_lora_targets, load_tokenizer, lora_config, prompt_rng, trainer_schedule
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


def test_score_head_lora_trains_the_head_fully():
    """RM and PPO critic: the new `score` head is trained as a whole, the body through adapters."""
    assert lora_config("SEQ_CLS", C).modules_to_save == ["score"]
    assert lora_config("CAUSAL_LM", C).modules_to_save is None


def test_lora_config_reads_the_settings_it_is_given():
    import types

    lora = lora_config("CAUSAL_LM", types.SimpleNamespace(LORA_R=4, LORA_ALPHA=8, LORA_DROPOUT=0.1,
                                                          LORA_TARGET_MODULES="q_proj, v_proj"))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, sorted(lora.target_modules)) == (4, 8, 0.1, ["q_proj", "v_proj"])


def test_lora_targets_are_checked_against_the_model(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    check_lora_targets(model, True, "q_proj, v_proj")
    with pytest.raises(UserError, match=r"no layer named query_key_value; its linear layers are .*v_proj"):
        check_lora_targets(model, True, "q_proj,query_key_value")
    check_lora_targets(model, False, "q_proj,query_key_value")  # without LoRA the setting is not used


def test_trainer_schedule_follows_eval_every():
    schedule = trainer_schedule(0.1, 0, 10)
    assert schedule["eval_strategy"] == "epoch" and schedule["save_steps"] is None and schedule["logging_steps"] == 10
    schedule = trainer_schedule(0.1, 5, 10)
    assert (schedule["eval_strategy"], schedule["eval_steps"], schedule["save_steps"], schedule["warmup_steps"]) == \
        ("steps", 5, 5, 0.1)


def test_prompt_rng_depends_on_seed_rank_and_step_only():
    draw = [prompt_rng(42, 0, 3).randrange(1000) for _ in range(2)]
    assert draw[0] == draw[1]  # the same step draws the same prompts (a resumed run)
    others = {prompt_rng(*key).randrange(10**9) for key in ((42, 0, 3), (42, 1, 3), (42, 0, 4), (43, 0, 3))}
    assert len(others) == 4


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_end_of_turn_is_what_the_template_ends_an_answer_with(tiny_base, tmp_path):
    """A Llama-3 style tokenizer: EOS <|end_of_text|> ends a document, <|eot_id|> ends a turn and
    is what a chat model emits; both stop an answer, and neither is the pad token."""
    from transformers import AutoTokenizer, GenerationConfig

    from rlhf.common import end_of_turn_ids, template_end_ids

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                                          "<|start_header_id|>", "<|end_header_id|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|end_of_text|>", None
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    eot, eot_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert template_end_ids(tok) == [eot]
    assert end_of_turn_ids(tok) == [eot_text, eot]
    assert tok.pad_token_id not in (eot, eot_text)

    class Model:  # a checkpoint whose generation_config lists another stop token too
        generation_config = GenerationConfig(eos_token_id=[eot_text, tok.convert_tokens_to_ids("<|endoftext|>")])

    assert end_of_turn_ids(tok, Model()) == [eot_text, tok.convert_tokens_to_ids("<|endoftext|>"), eot]
    # the embedded template ends a turn with its EOS: one id
    assert end_of_turn_ids(load_tokenizer(tiny_base)) == [load_tokenizer(tiny_base).eos_token_id]


def test_mixed_precision_follows_the_precision_setting(monkeypatch):
    """PPO's accelerate set-up: bf16 and fp16 are mixed precision (fp16 with loss scaling, on a
    CUDA GPU), fp32 is none; before, fp16 silently trained in fp32."""
    import torch

    from rlhf.common import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for choice, want in (("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16"), ("FP16", "fp16")):
        assert mixed_precision(choice) == want
    with pytest.raises(UserError, match="PRECISION must be one of"):
        mixed_precision("fp8")
