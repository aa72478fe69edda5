"""How each stage's cost grows: seconds per optimizer step (SFT, RM) and per PPO iteration against
model size, and against the data each step holds (batch size), steady state (warm-up steps not
timed). A stage's total time is steps x seconds per step, and its steps grow linearly with the
data set (EPOCHS x examples / batch), so per-step cost at each batch size is what data size changes.

Model sizes are the embedded default's architecture at other widths and depths (the same
tokenizer, vocabulary 4096), randomly initialised, so no training is needed: SFT and RM timing do
not depend on the weights; PPO does (response lengths), so at every size the PPO rows use
random-init policies whose responses run to PPO_RESPONSE_LEN: comparable across sizes, not with
the trained default's shorter answers.

    python bench/bench_scaling.py                        # 3 sizes x 3 stages, then 2 batch sizes x 3 stages
    python bench/bench_scaling.py --sizes=128x2,256x4 --batches=8,16 --steps=4
"""

import os
import shutil
import sys
import tempfile

import _common
import config as C
from rlhf.settings import apply_overrides


def make_models(size, folder):
    """A random-init model of `size` ("HIDDENxLAYERS", MLP 3x hidden, head dim 32) with the default's
    tokenizer, saved as a finished-looking SFT output and as a reward model (normalisation 0/1), so
    train_ppo.py accepts them. Returns (sft_dir, rm_dir, parameters)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.base_model import resolve_base_model
    from rlhf.common import load_tokenizer
    from rlhf.handoff import STAGE_INFO_FILE, save_tokenizer, write_json
    from rlhf.reward import load_reward_model, save_reward_normalization

    base = resolve_base_model(C)
    hidden, layers = (int(x) for x in size.split("x"))
    config = AutoConfig.from_pretrained(base)
    heads = max(1, hidden // 32)
    config.update(dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       layer_types=["full_attention"] * layers))
    torch.manual_seed(C.SEED)
    model = AutoModelForCausalLM.from_config(config)
    sft_dir, rm_dir = os.path.join(folder, "sft_model"), os.path.join(folder, "rm_model")
    model.save_pretrained(sft_dir)
    save_tokenizer(load_tokenizer(base), sft_dir)
    write_json(os.path.join(sft_dir, STAGE_INFO_FILE), {"stage": "sft", "note": "bench_scaling: random init"})
    rm = load_reward_model(sft_dir)
    rm.save_pretrained(rm_dir)
    save_tokenizer(load_tokenizer(base), rm_dir)
    save_reward_normalization(rm_dir, {"mean": 0.0, "std": 1.0})
    write_json(os.path.join(rm_dir, STAGE_INFO_FILE), {"stage": "rm", "note": "bench_scaling: random init"})
    return sft_dir, rm_dir, sum(p.numel() for p in model.parameters())


def time_stages(sft_dir, rm_dir, steps, warmup, ppo_steps, out, overrides, batch=None):
    """Seconds per step of SFT and RM and per PPO iteration for the models in sft_dir / rm_dir,
    with BATCH_SIZE, RM_BATCH_SIZE and PPO_BATCH_SIZE set to `batch` when given."""
    from bench_mfu import run_sft
    from bench_rm_vs_sft import run_rm

    from rlhf.common import load_tokenizer
    from rlhf.data import load_preference_pairs

    saved = C.MODEL_NAME, C.BATCH_SIZE, C.RM_BATCH_SIZE
    C.MODEL_NAME = sft_dir
    if batch:
        C.BATCH_SIZE = C.RM_BATCH_SIZE = batch
    try:
        sft = run_sft(steps, warmup, out)
        tps, per_step = run_rm(sft_dir, load_tokenizer(sft_dir), load_preference_pairs(C.RM_TRAIN_FILE),
                               warmup + steps, warmup, out)
    finally:
        C.MODEL_NAME, C.BATCH_SIZE, C.RM_BATCH_SIZE = saved
    ppo_batch = [f"--PPO_BATCH_SIZE={batch}", f"--PPO_MINI_BATCH_SIZE={max(1, batch // 4)}"] if batch else []
    history = _common.run_train_ppo(os.path.join(out, "ppo"), ppo_steps,
                                    [f"--SFT_DIR={sft_dir}", f"--RM_DIR={rm_dir}", "--OVERWRITE=true", "--PPO_ADVANTAGE=gae",
                                     *overrides, *ppo_batch])  # gae: as in the figures of bench/README.md
    shutil.rmtree(os.path.join(out, "ppo"), ignore_errors=True)
    timed = history[1:] or history
    return {"sft_seconds_per_step": sft["seconds"] / sft["steps"], "sft_real_tokens_per_second": sft["real_tokens_per_second"],
            "rm_seconds_per_step": per_step / tps, "rm_tokens_per_second": tps,
            "ppo_seconds_per_iteration": sum(h["seconds"] for h in timed) / len(timed),
            "ppo_response_length": sum(h["response_length"] for h in timed) / len(timed)}


def main(argv):
    own, rest = _common.own_options(argv, {"sizes": "128x2,256x4,384x6", "batches": "8,32", "steps": 4,
                                           "warmup": 1, "ppo_steps": 2})
    apply_overrides(rest)
    result = _common.header("python bench/bench_scaling.py " + " ".join(argv))
    result.update(by_size={}, by_batch={})
    with tempfile.TemporaryDirectory() as tmp:
        for size in own["sizes"].split(","):
            sft_dir, rm_dir, n = make_models(size, os.path.join(tmp, size))
            t = time_stages(sft_dir, rm_dir, own["steps"], own["warmup"], own["ppo_steps"], os.path.join(tmp, "run"), rest)
            result["by_size"][size] = {"parameters": n, **t}
            print(f"size {size} ({n / 1e6:.1f}M) | {t}", flush=True)
        sft_dir, rm_dir, n = make_models(f"{C.BASE_HIDDEN}x{C.BASE_LAYERS}", os.path.join(tmp, "default"))
        for batch in (int(b) for b in own["batches"].split(",")):
            t = time_stages(sft_dir, rm_dir, own["steps"], own["warmup"], own["ppo_steps"], os.path.join(tmp, "run"), rest, batch)
            result["by_batch"][batch] = t
            print(f"batch {batch} | {t}", flush=True)
    result["load_average_1min_after"] = os.getloadavg()[0]
    rows = [[f"{s} ({r['parameters'] / 1e6:.1f}M)", f"{r['sft_seconds_per_step']:.2f}", f"{r['rm_seconds_per_step']:.2f}",
             f"{r['ppo_seconds_per_iteration']:.1f}"] for s, r in result["by_size"].items()]
    print("\n".join(_common.table(["hidden x layers (params)", "SFT s/step", "RM s/step", "PPO s/iteration"], rows)))
    rows = [[b, f"{r['sft_seconds_per_step']:.2f}", f"{r['rm_seconds_per_step']:.2f}", f"{r['ppo_seconds_per_iteration']:.1f}"]
            for b, r in result["by_batch"].items()]
    print("\n".join(_common.table(["batch (sequences / pairs / episodes)", "SFT s/step", "RM s/step", "PPO s/iteration"], rows)))
    _common.save_results("scaling", result)


if __name__ == "__main__":
    main(sys.argv[1:])
