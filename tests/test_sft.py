"""Smoke test of train_sft.py as a user runs it, on a tiny locally built model."""

import json
import os

import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def sft_run(tiny_base, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    args = [f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={out / 'sft_model'}", f"--RUNS_DIR={out / 'runs'}",
            f"--SFT_TRAIN_FILE={toy_data['sft_train']}", f"--SFT_EVAL_FILE={toy_data['sft_eval']}",
            "--EPOCHS=2", "--BATCH_SIZE=8", "--LR=3e-3", "--SFT_EVAL_PASS_AT_1=false", "--LOG_EVERY=2"]
    proc = run_script("train_sft.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, args


def test_sft_saves_a_loadable_model_that_generates(sft_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc, _ = sft_run
    folder = out / "sft_model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tok.apply_chat_template([{"role": "user", "content": "Write a function add_3(x)"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(new) >= 1
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_sft_reports_metrics_and_logs(sft_run):
    out, proc, _ = sft_run
    results = json.load(open(out / "sft_model" / "eval_results.json"))
    assert results["eval_perplexity"] > 1.0 and 0.0 <= results["eval_token_accuracy"] <= 1.0
    assert results["train_tokens"] > 0
    history = [h for h in json.load(open(out / "sft_model" / "rlhf_stage.json"))["metrics"]["log_history"] if "loss" in h]
    assert history[-1]["loss"] < history[0]["loss"]  # it learned something
    assert "sft step 2/" in proc.stderr + proc.stdout  # the fixed-format log line
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "runs" / "sft"))
    assert not os.path.exists(out / "runs" / "sft" / "checkpoints")  # cleaned after a finished run


def test_sft_refuses_to_overwrite_a_finished_model(sft_run, run_in_process):
    out, _, args = sft_run
    proc = run_in_process("train_sft.py", *args)
    assert proc.returncode == 2
    assert "already holds a finished model" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_clear_errors_for_user_mistakes(tmp_path, tiny_base, toy_data, run_in_process):
    proc = run_script("train_sft.py", "--BATCHSIZE=4")
    assert proc.returncode == 2 and "did you mean BATCH_SIZE" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_in_process("train_sft.py", f"--MODEL_NAME={tmp_path / 'missing'}", f"--SFT_DIR={tmp_path / 'o'}")
    assert proc.returncode == 2 and "is not a model folder" in proc.stderr
    proc = run_in_process("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={tmp_path / 'o'}",
                      f"--SFT_TRAIN_FILE={tmp_path / 'nope.jsonl'}")
    assert proc.returncode == 2 and "nope.jsonl not found" in proc.stderr
    proc = run_in_process("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={tmp_path / 'o'}",
                      f"--SFT_TRAIN_FILE={toy_data['sft_train']}", f"--SFT_EVAL_FILE={toy_data['sft_eval']}", "--MAX_LEN=5")
    assert proc.returncode == 2 and "longer than MAX_LEN=5" in proc.stderr
    assert not os.path.exists(tmp_path / "o")  # nothing written on error


def test_sft_early_stopping_keeps_the_best_checkpoint(tiny_base, toy_data, tmp_path):
    """Held-out answers the training data contradicts (x - k against x + k): the held-out loss
    falls while the format is learned, then rises; training stops `patience` evaluations after its
    lowest point and the saved model is that best one, not the last."""
    from conftest import toy_conversations, write_jsonl

    contradicting = [{"messages": [r["messages"][0], {"role": "assistant", "content": r["messages"][1]["content"]
                                                      .replace("x + ", "x - ")}]} for r in toy_conversations(8, seed=2)]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", contradicting)
    proc = run_script("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={tmp_path / 'sft'}",
                      f"--RUNS_DIR={tmp_path / 'runs'}", f"--SFT_TRAIN_FILE={toy_data['sft_train']}",
                      f"--SFT_EVAL_FILE={eval_file}", "--EPOCHS=12", "--BATCH_SIZE=8", "--LR=1e-2",
                      "--EVAL_EVERY=3", "--SFT_EARLY_STOP_PATIENCE=2", "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.load(open(tmp_path / "sft" / "rlhf_stage.json"))["metrics"]
    evals = [h["eval_loss"] for h in info["log_history"] if "eval_loss" in h]  # no final evaluate() repeats one
    best = min(range(len(evals)), key=evals.__getitem__)
    assert info["epochs_trained"] < 12, evals  # it stopped early ...
    assert len(evals) == best + 1 + 2  # ... two evaluations after the best one
    assert abs(info["eval_loss"] - evals[best]) < 1e-4  # and reports the best one's loss ...
    import config as C
    from rlhf.common import load_causal_lm, load_tokenizer, torch_dtype
    from rlhf.data import load_sft_examples
    from train_sft import sft_trainer

    saved = str(tmp_path / "sft")
    evaluated = sft_trainer(load_causal_lm(saved, torch_dtype(C.PRECISION)), load_tokenizer(saved),
                            load_sft_examples(eval_file), load_sft_examples(eval_file), str(tmp_path / "again"),
                            report_to="none",
                            per_device_eval_batch_size=8).evaluate()  # the run's (BATCH_SIZE): the mean loss is per batch
    assert abs(evaluated["eval_loss"] - evals[best]) < 1e-4  # ... which the saved model has: the best, not the last
    assert "early stopping: best held-out loss" in proc.stdout
    assert not os.path.exists(tmp_path / "runs" / "sft" / "checkpoints")


def test_answer_only_head_gives_trl_loss_gradients_and_metrics():
    """score_answer_tokens_only (CPU) against TRL's own fused head on the same weights and batch:
    prompt and padding positions labelled -100, as SFTTrainer labels them."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl.trainer.utils import add_fused_lm_head

    from train_sft import score_answer_tokens_only

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    trl_model = AutoModelForCausalLM.from_config(config)
    ours = copy.deepcopy(trl_model)
    for m in (trl_model, ours):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    score_answer_tokens_only(ours)

    input_ids = torch.randint(0, 64, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0  # right padding, as SFTTrainer pads
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, :6] = -100  # a longer prompt
    labels[attention_mask == 0] = -100
    results = []
    for m in (trl_model, ours):
        out = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b.loss, a.loss)
    torch.testing.assert_close(b.log_probs, a.log_probs)
    torch.testing.assert_close(b.entropy, a.entropy)
    assert torch.equal(b.is_top1.bool(), a.is_top1.bool()) and torch.equal(b.label_mask, a.label_mask)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    # without fused_lm_head the model is the plain one (generation, logits)
    plain = ours(input_ids=input_ids).logits
    assert plain.shape == (3, 10, 64)


def prepared_labels(tokenizer, model_dir, examples, tmp_path):
    """The rows SFTTrainer trains on, as it prepares them from sft_rows(examples): (input_ids, labels)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf.data import sft_rows

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=256, report_to=[], use_cpu=True, bf16=False),
                         train_dataset=Dataset.from_list(sft_rows(tokenizer, examples)))
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def test_single_turn_examples_get_trls_own_labels_among_multi_turn_ones(tiny_base, toy_data, tmp_path):
    """A data file with one multi-turn conversation is tokenised by us (rlhf.data.assistant_labels),
    every example of it: a single-turn one gets exactly the labels TRL gives it on its own."""
    from rlhf.common import load_tokenizer
    from rlhf.data import assistant_labels, load_sft_examples

    tokenizer = load_tokenizer(tiny_base)
    single = load_sft_examples(toy_data["sft_train"])[:6]
    trl_labels = prepared_labels(tokenizer, tiny_base, single, tmp_path / "trl")
    ours = [assistant_labels(tokenizer, ex["prompt"] + ex["completion"], "x") for ex in single]
    assert [(r["input_ids"], r["labels"]) for r in ours] == trl_labels
    assert all(-100 in labels and set(labels) != {-100} for _, labels in trl_labels)  # prompt masked, answer kept


def test_every_assistant_turn_of_a_conversation_trains(tiny_base, tmp_path):
    """Multi-turn SFT: both assistant turns of a 2-turn conversation carry labels in what SFTTrainer
    trains on (the first one too, which the last-message rule dropped); the user turns carry none."""
    from rlhf.common import load_tokenizer
    from rlhf.data import load_sft_examples

    turns = [{"role": "user", "content": "Write add_3(x)."},
             {"role": "assistant", "content": "```python\ndef add_3(x):\n    return x + 3\n```"},
             {"role": "user", "content": "Now add_5(x)."},
             {"role": "assistant", "content": "```python\ndef add_5(x):\n    return x + 5\n```"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    examples = load_sft_examples(str(tmp_path / "d.jsonl"))
    assert examples == [{"messages": turns, "where": f"{tmp_path / 'd.jsonl'}:1"}]
    tokenizer = load_tokenizer(tiny_base)
    [(ids, labels)] = prepared_labels(tokenizer, tiny_base, examples, tmp_path / "trl")
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    untrained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "return x + 3" in trained and "return x + 5" in trained
    assert "Write add_3" in untrained and "Now add_5" in untrained
    assert "Write add_3" not in trained and "Now add_5" not in trained


def test_a_template_that_rewrites_earlier_turns_is_one_line(tiny_base):
    """A template that writes an earlier answer otherwise once another turn follows (here: drops it,
    as reasoning templates drop earlier thoughts) cannot train that turn where it stands."""
    from rlhf.common import load_tokenizer
    from rlhf.data import assistant_labels
    from rlhf.settings import UserError

    tokenizer = load_tokenizer(tiny_base)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
             {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    with pytest.raises(UserError, match=r"d.jsonl:3: the chat template writes assistant turn 1 differently"):
        assistant_labels(tokenizer, turns, "d.jsonl:3")
