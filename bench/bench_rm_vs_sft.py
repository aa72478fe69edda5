"""Training throughput of the RM stage against the SFT stage on the same model and sequences.

Both trainers see the same conversations: the RM trains on preference pairs from RM_TRAIN_FILE
(RM_BATCH_SIZE pairs per step = 2x that many sequences), SFT trains on the same pairs' two
conversations as prompt-completion examples (2 x RM_BATCH_SIZE per step, packed padding-free as
train_sft.py does). Each is set up as its stage script sets it up (fp32 on CPU, RM batches
grouped by length) and runs a fixed number of optimizer steps; tokens are the real
(non-padding) tokens the trainer counts (for the RM: chosen + rejected). The first WARMUP steps
are not timed. Rounds alternate SFT, RM, SFT, RM, ... and the medians are reported. One RM round
in bf16 (TRL's default, which `use_cpu=True` leaves on) is run as a contrast.

    python bench/bench_rm_vs_sft.py                      # prints the table
    python bench/bench_rm_vs_sft.py --write-readme       # also records it in bench/README.md
    python bench/bench_rm_vs_sft.py --MODEL_NAME=/tmp/rmwork/sft_model --rounds=3

Other settings of config.py are overridden as --NAME=value, as in the stage scripts.
"""

import datetime
import os
import statistics
import sys

import _common
import config as C
from rlhf.base_model import resolve_base_model
from rlhf.common import load_tokenizer, seed_everything, trainer_args
from rlhf.data import load_preference_pairs
from rlhf.settings import apply_overrides

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
HEADING = "## RM vs SFT throughput"


def tokens_per_second(cb):
    (t0, n0), (t1, n1) = cb.marks[0], cb.marks[-1]
    return (n1 - n0) / (t1 - t0), (n1 - n0) / (len(cb.marks) - 1)


def common_args(steps, out):
    """The fields both runs share; precision etc. as the stages set them (fp32 on CPU)."""
    from trl import RewardConfig

    fields = trainer_args(RewardConfig, C)
    fields.update(report_to=[])
    return dict(output_dir=out, max_steps=steps, logging_steps=10**6, save_strategy="no", eval_strategy="no",
                learning_rate=1e-4, disable_tqdm=True, **fields)


def run_sft(model_path, tokenizer, pairs, steps, warmup, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf.reward import conversation_ids

    rows = [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen", "rejected")]
    # Packed rows hold several conversations: as many rows per step as hold the RM step's
    # 2 x RM_BATCH_SIZE conversations, so both steps see about the same tokens.
    mean_len = statistics.mean(len(conversation_ids(tokenizer, r["prompt"] + r["completion"])) for r in rows[:2000])
    rows_per_step = max(1, round(2 * C.RM_BATCH_SIZE * mean_len / C.RM_MAX_LEN)) if C.PACKING else 2 * C.RM_BATCH_SIZE
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = SFTConfig(per_device_train_batch_size=rows_per_step, max_length=C.RM_MAX_LEN, packing=C.PACKING,
                     **common_args(steps, out))
    cb = _common.timing_callback(warmup)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         callbacks=[cb])
    trainer.train()
    return tokens_per_second(cb)


def run_rm(model_path, tokenizer, pairs, steps, warmup, out, bf16=False):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.reward import conversation_ids, load_reward_model

    rows = [dict(p, length=max(len(conversation_ids(tokenizer, p["prompt"] + p["chosen"])),
                               len(conversation_ids(tokenizer, p["prompt"] + p["rejected"])))) for p in pairs]
    model = load_reward_model(model_path, for_training=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    fields = common_args(steps, out)
    if bf16:  # what RewardConfig does when precision is not set explicitly
        fields.update(bf16=True)
    args = RewardConfig(per_device_train_batch_size=C.RM_BATCH_SIZE, max_length=C.RM_MAX_LEN,
                        train_sampling_strategy="group_by_length", remove_unused_columns=False,  # as train_rm.py
                        **fields)
    cb = _common.timing_callback(warmup)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                            callbacks=[cb])
    trainer.train()
    return tokens_per_second(cb)


def main(argv):
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(("--rounds=", "--steps=", "--warmup=", "--bf16-steps="))}
    write = "--write-readme" in argv
    apply_overrides([a for a in argv if a.split("=", 1)[0] not in own and a != "--write-readme"])
    rounds, steps = int(own.get("--rounds", 2)), int(own.get("--steps", 12))
    warmup, bf16_steps = int(own.get("--warmup", 2)), int(own.get("--bf16-steps", 3))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import torch

    model_path = resolve_base_model(C)
    tokenizer = load_tokenizer(model_path)
    pairs = load_preference_pairs(C.RM_TRAIN_FILE)
    load_before = os.getloadavg()
    results = {"sft": [], "rm": []}
    with tempfile.TemporaryDirectory() as out:
        for r in range(rounds):
            for name, fn in (("sft", run_sft), ("rm", run_rm)):
                seed_everything(C.SEED)
                tps, per_step = fn(model_path, tokenizer, pairs, warmup + steps, warmup, out)
                results[name].append((tps, per_step))
                print(f"round {r + 1}/{rounds} | {name} | {tps:,.0f} tokens/s | {per_step:,.0f} tokens/step", flush=True)
        seed_everything(C.SEED)
        bf16_tps, _ = run_rm(model_path, tokenizer, pairs, 1 + bf16_steps, 1, out, bf16=True)
        print(f"contrast | rm in bf16 (TRL's default) | {bf16_tps:,.0f} tokens/s", flush=True)
    load_after = os.getloadavg()
    sft = statistics.median(t for t, _ in results["sft"])
    rm = statistics.median(t for t, _ in results["rm"])
    command = "python bench/bench_rm_vs_sft.py " + " ".join(argv)
    lines = [
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; machine: {_common.machine()}; "
        f"torch threads {torch.get_num_threads()}",
        f"- versions: {_common.versions()}",
        f"- model: {model_path}; batch: {C.RM_BATCH_SIZE} pairs (RM), the same {2 * C.RM_BATCH_SIZE} conversations' "
        f"worth of packed rows of {C.RM_MAX_LEN} tokens (SFT, packing {C.PACKING}); {steps} timed steps after "
        f"{warmup} warm-up; {rounds} alternating rounds",
        f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        "",
        "| run | tokens/s (median) | all rounds | tokens/step |",
        "|---|---|---|---|",
        f"| SFT, fp32 | {sft:,.0f} | {', '.join(f'{t:,.0f}' for t, _ in results['sft'])} | {results['sft'][0][1]:,.0f} |",
        f"| RM, fp32 | {rm:,.0f} | {', '.join(f'{t:,.0f}' for t, _ in results['rm'])} | {results['rm'][0][1]:,.0f} |",
        f"| RM, bf16 (TRL default, contrast) | {bf16_tps:,.0f} | 1 round, {bf16_steps} steps | |",
        "",
        f"RM / SFT = **{rm / sft:.2f}x**; RM fp32 / RM bf16 = {rm / bf16_tps:.1f}x.",
    ]
    print("\n".join(lines))
    if write:
        text = open(README, encoding="utf-8").read() if os.path.exists(README) else "# Benchmarks\n"
        section = f"{HEADING}\n\n" + "\n".join(lines) + "\n"
        start = text.find(HEADING)
        if start >= 0:  # replace the old result, keep everything else
            end = text.find("\n## ", start + len(HEADING))
            text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        with open(README, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"written to {README}")


if __name__ == "__main__":
    main(sys.argv[1:])
