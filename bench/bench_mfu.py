"""Model FLOPs utilisation (MFU) of each stage against this machine's measured fp32 matmul peak,
and where the SFT step's time goes (torch.profiler).

- peak: best torch.matmul throughput on square fp32 matrices (512, 1024, 2048), with the torch
  threads the stages use, measured in the same run (bench/_common.matmul_peak).
- SFT: train_sft.py's own trainer (train_sft.sft_trainer: batches grouped by length, fp32) for
  --steps optimizer steps after --warmup. Useful tokens = loss-bearing tokens (the answers; not
  the prompts, not padding). MFU = 6 x N x useful tokens/s / peak, N = parameters that multiply
  (_common.flop_params: all but the input embedding lookup; the tied output layer counts).
- RM: bench_rm_vs_sft.run_rm (train_rm.py's set-up); useful tokens = all real tokens of chosen
  and rejected (every token is read to score the answer). N excludes the embedding.
- PPO: train_ppo.py itself for --ppo-steps iterations (no evaluation, no checkpoints); useful
  tokens = valid response tokens (up to the first EOS) of the batch. Useful FLOPs per such
  token = 2 N (generation) + 2 x (policy + reference + critic) N (rollout forwards) +
  6 x (policy + critic) N x PPO_EPOCHS (updates); prompts, padding and the reward model's pass
  are left out, so this is a lower bound of the work done.
- Profile: a few SFT steps under torch.profiler; each op's own CPU time is put in one bucket:
  matmuls (linear layers), attention, logits/loss (any op on a vocabulary-sized tensor),
  optimizer (anything under Optimizer.step), data loading (under the DataLoader's next), other
  ops (norms, activations, rotary, copies); the rest of the wall time is Python and framework
  overhead (Trainer loop, callbacks, logging). Padding and prompt shares come from the batches.
- Ceiling: the matrix products of the mean SFT step (every linear layer at the step's positions,
  the head at its answer positions; forward, input and weight gradients) timed alone, nothing
  else. No change to the loop, kernels or framework can make a step faster than that, so its MFU
  on loss-bearing tokens bounds the stage's at this batch size and data.
- Fixes: SFT again with each cheap change, alternating with the stage as it is, same batches:
  fused AdamW and, as the contrast of the change that was adopted, TRL's own CPU loss path
  ("TRL CPU head": every position through the LM head; train_sft.score_answer_tokens_only is
  what replaced it) by default; --fixes="fused AdamW,torch.compile" adds torch.compile (its
  compile time is not timed, its recompiles for new batch lengths are).

    python bench/bench_mfu.py                      # everything, ~6 minutes on a quiet 2-core machine
    python bench/bench_mfu.py --only=sft,profile --steps=10
    python bench/bench_mfu.py --fixes=             # skip the SFT variants
"""

import os
import statistics
import sys
import tempfile
import time

import _common
import config as C
from rlhf.settings import apply_overrides

FIXES = {  # name -> sft_trainer keywords (SFTConfig fields, or answer_only_head) tried on the stage as it is
    "fused AdamW": dict(optim="adamw_torch_fused"),
    "torch.compile": dict(torch_compile=True),
    # the contrast: TRL's own CPU loss path (every position through the LM head, recomputed in the
    # backward), which train_sft.score_answer_tokens_only replaces on CPUs
    "TRL CPU head": dict(answer_only_head=False),
}


def sft_setup():
    """Model, tokenizer and data exactly as train_sft.py prepares them."""
    import functools

    from rlhf.base_model import resolve_base_model
    from rlhf.common import load_causal_lm, load_tokenizer, torch_dtype
    from rlhf.data import drop_too_long, load_sft_examples
    from train_sft import token_lengths

    base = resolve_base_model(C)
    tokenizer = load_tokenizer(base)
    train = load_sft_examples(C.SFT_TRAIN_FILE)
    train = drop_too_long(train, token_lengths(tokenizer, train), C.MAX_LEN, C.SFT_TRAIN_FILE)
    # the base model for training, loaded as train_sft.py loads it
    load = functools.partial(load_causal_lm, base, torch_dtype(C.PRECISION), qlora=C.QLORA,
                             gradient_checkpointing=C.GRADIENT_CHECKPOINTING)
    return base, tokenizer, train, load


def run_sft(steps, warmup, out, profile_steps=0, **overrides):
    """SFT for warmup + steps optimizer steps; returns the timing and token counts of the timed
    steps, and the profiler (or None)."""
    import torch
    from transformers import TrainerCallback

    from rlhf.common import seed_everything
    from train_sft import sft_trainer

    seed_everything(C.SEED)
    base, tokenizer, train, load_base = sft_setup()
    model = load_base()
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(out, "runs")
    trainer = sft_trainer(model, tokenizer, train, train[:8], out, max_steps=warmup + steps,
                          save_strategy="no", eval_strategy="no", disable_tqdm=True, **overrides)
    counts = []  # per training step: (loss-bearing tokens, real tokens, padded positions)
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        if model.training:
            labels, mask = inputs["labels"], inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else labels.numel()
            counts.append((int((labels[:, 1:] != -100).sum()), real, labels.numel()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    timing = _common.timing_callback(warmup)
    trainer.add_callback(timing)
    prof = None
    if profile_steps:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

        class Profile(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    self.t0 = time.perf_counter()
                    prof.start()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup + profile_steps:
                    prof.stop()
                    self.wall = time.perf_counter() - self.t0

        profiler_cb = Profile()
        trainer.add_callback(profiler_cb)
    trainer.train()
    (t0, _), (t1, _) = timing.marks[0], timing.marks[-1]
    timed = counts[warmup:warmup + len(timing.marks) - 1]
    useful, real, padded = (sum(c[i] for c in timed) for i in range(3))
    result = {"seconds": t1 - t0, "steps": len(timed), "useful_tokens": useful, "real_tokens": real,
              "padded_positions": padded, "useful_tokens_per_second": useful / (t1 - t0),
              "real_tokens_per_second": real / (t1 - t0), "flop_params": _common.flop_params(trainer.model),
              "mean_padded_length": padded / sum(1 for _ in timed) / C.BATCH_SIZE}
    if prof is not None:
        result["profile"] = attribute(prof, profiler_cb.wall, trainer.model.config.vocab_size)
        result["profile"]["steps"] = profile_steps
    return result


def median_run(runs):
    """The first good run's counts with the median rates over rounds (all rounds' rates kept),
    or the first error when every round failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    merged = dict(ok[0], rounds=[r["useful_tokens_per_second"] for r in ok])
    for key in ("useful_tokens_per_second", "real_tokens_per_second"):
        merged[key] = statistics.median(r[key] for r in ok)
    return merged


def bucket(event, vocab):
    """The bucket of one profiler event's own time (see the module docstring)."""
    parent = event.cpu_parent
    while parent is not None:
        if "Optimizer.step" in parent.name or "optimizer" in parent.name.lower():
            return "optimizer"
        if "DataLoader" in parent.name:
            return "data loading"
        parent = parent.cpu_parent
    name = event.name.lower()
    if "dataloader" in name:
        return "data loading"
    if "optimizer" in name or "adam" in name:
        return "optimizer"
    if any(vocab in shape for shape in (event.input_shapes or []) if isinstance(shape, (list, tuple))):
        return "logits/loss"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"):
        return "matmuls (linear layers)"
    return "other ops (norms, activations, rotary, copies)"


def attribute(prof, wall, vocab):
    """Seconds per bucket over the profiled steps (own CPU time of every op) + the overhead."""
    seconds = {}
    for event in prof.events():
        if event.self_cpu_time_total <= 0:
            continue
        b = bucket(event, vocab)
        seconds[b] = seconds.get(b, 0.0) + event.self_cpu_time_total / 1e6
    seconds["Python and framework overhead (loop, callbacks, logging)"] = max(0.0, wall - sum(seconds.values()))
    return {"wall_seconds": wall, "buckets": seconds}


def gemm_ceiling(model, rows, answer_rows, repeats=20):
    """Seconds of the matrix products alone of one SFT step: every linear layer's forward, input
    gradient and weight gradient on `rows` positions (batch x padded length), the LM head on the
    `answer_rows` answer positions (train_sft.score_answer_tokens_only), nothing else (no attention,
    norms, softmax, optimizer, framework). A step cannot be faster than this, so
    6 x N x answer tokens / these seconds / peak bounds the stage's MFU on loss-bearing tokens."""
    import torch

    head = model.get_output_embeddings()
    products = []  # (rows, in, out) of each linear layer, the head last
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            products.append((rows, module.in_features, module.out_features))
    products.append((answer_rows, head.in_features, head.out_features))
    best = float("inf")
    tensors = [(torch.randn(n, i), torch.randn(o, i), torch.randn(n, o)) for n, i, o in products]
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w, g in tensors:
            torch.nn.functional.linear(x, w)  # forward
            g @ w  # gradient of the input
            g.t() @ x  # gradient of the weight
        best = min(best, time.perf_counter() - t0)
    return best, sum(6 * n * i * o for n, i, o in products)


def main(argv):
    own, rest = _common.own_options(argv, {"steps": 12, "warmup": 3, "rounds": 2, "profile_steps": 4, "ppo_steps": 4,
                                           "rm_steps": 20, "only": "sft,rm,ppo,profile,fixes,ceiling",
                                           "fixes": "fused AdamW,TRL CPU head"})
    apply_overrides(rest)
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    only = own["only"].split(",")
    result = _common.header("python bench/bench_mfu.py " + " ".join(argv))
    # the peak is measured before and after the stages and the higher is used: on a machine that
    # is not quiet, a peak taken at a busy moment would inflate every MFU
    peak, per_size = _common.matmul_peak(torch.get_num_threads())
    result["peak_flops"], result["peak_by_size"] = peak, per_size
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({', '.join(f'{n}: {f / 1e9:.1f}' for n, f in per_size.items())})")
    with tempfile.TemporaryDirectory() as out:
        if "sft" in only:
            # the stage as it is and each fix alternate (base, fix 1, fix 2, base, ...), same batches;
            # medians over rounds, so a change in the machine's load hits all of them alike
            fixes = [f for f in own["fixes"].split(",") if f] if "fixes" in only else []
            runs = {"as it is": [], **{f: [] for f in fixes}}
            for _ in range(own["rounds"]):
                for name in runs:
                    try:
                        runs[name].append(run_sft(own["steps"], own["warmup"], out, **FIXES.get(name, {})))
                    except (RuntimeError, ImportError, OSError) as e:  # e.g. torch.compile without a C++ compiler
                        runs[name].append({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                    print(f"sft {name}: " + (runs[name][-1].get("error") or
                                             f"{runs[name][-1]['useful_tokens_per_second']:,.0f} useful tokens/s"), flush=True)
            sft = median_run(runs.pop("as it is"))
            result["sft"] = sft
            result["sft_fixes"] = {name: median_run(r) for name, r in runs.items()}
            for name, fixed in result["sft_fixes"].items():  # per-round ratios: load drift cancels within a round
                if "error" not in fixed:
                    fixed["speedup"] = statistics.median(f / b for f, b in zip(fixed["rounds"], sft["rounds"]))
        if "profile" in only:
            prof = run_sft(own["profile_steps"], own["warmup"], out, profile_steps=own["profile_steps"])
            result["sft_profile"] = prof["profile"]
            padding = 1 - prof["real_tokens"] / prof["padded_positions"]
            prompts = 1 - prof["useful_tokens"] / prof["real_tokens"]
            result["sft_profile"].update(padding_share=padding, prompt_share_of_real=prompts)
        if "rm" in only:
            from bench_rm_vs_sft import run_rm

            from rlhf.common import load_tokenizer, seed_everything
            from rlhf.data import load_preference_pairs

            seed_everything(C.SEED)
            tps, per_step = run_rm(C.SFT_DIR, load_tokenizer(C.SFT_DIR), load_preference_pairs(C.RM_TRAIN_FILE),
                                   own["warmup"] + own["rm_steps"], own["warmup"], out)
            n = _common.flop_params(AutoModelForSequenceClassification.from_pretrained(C.SFT_DIR, num_labels=1))
            result["rm"] = {"real_tokens_per_second": tps, "tokens_per_step": per_step, "flop_params": n,
                            "model": C.SFT_DIR}
        if "ppo" in only:
            # the critic path (gae): the FLOP count below includes the critic's forwards and updates
            history = _common.run_train_ppo(out, own["ppo_steps"], [f"--SFT_DIR={C.SFT_DIR}", f"--RM_DIR={C.RM_DIR}",
                                                                    "--PPO_ADVANTAGE=gae", *rest])
            timed = history[1:] or history  # the first iteration warms up
            n_pol = _common.flop_params(AutoModelForCausalLM.from_pretrained(C.SFT_DIR))
            n_crit = _common.flop_params(AutoModelForSequenceClassification.from_pretrained(C.RM_DIR))
            tokens = sum(h["response_length"] * C.PPO_BATCH_SIZE for h in timed)
            seconds = sum(h["seconds"] for h in timed)
            gen_seconds = sum(h["generate_seconds"] for h in timed)
            update_seconds = sum(h["update_seconds"] for h in timed)
            per_token = 2 * n_pol + 2 * (2 * n_pol + n_crit) + 6 * (n_pol + n_crit) * C.PPO_EPOCHS
            result["ppo"] = {"iterations_timed": len(timed), "seconds": seconds, "response_tokens": tokens,
                             "episodes_per_second": len(timed) * C.PPO_BATCH_SIZE / seconds,
                             "response_tokens_per_second": tokens / seconds, "generate_seconds": gen_seconds,
                             "rollout_tokens_per_second": tokens / gen_seconds, "generate_share": gen_seconds / seconds,
                             "update_share": update_seconds / seconds, "flop_params": [n_pol, n_crit],
                             "flops_per_response_token": per_token, "history": history}
    if "ceiling" in only and "sft" in result:  # the SFT step's own matrix products, timed alone
        sft = result["sft"]
        rows = round(sft["mean_padded_length"] * C.BATCH_SIZE)
        answer_rows = round(sft["useful_tokens"] / sft["steps"])
        load_base = sft_setup()[-1]  # the base model, loaded as train_sft.py loads it
        seconds, flops = gemm_ceiling(load_base(), rows, answer_rows)
        result["sft_gemm_ceiling"] = {"rows": rows, "answer_rows": answer_rows, "seconds": seconds, "flops": flops,
                                      "gemm_flops_per_second": flops / seconds,
                                      "useful_tokens_per_second": answer_rows / seconds}
    peak_after, _ = _common.matmul_peak(torch.get_num_threads())
    peak = result["peak_flops_used"] = max(peak, peak_after)
    result["peak_flops_after"] = peak_after
    print(f"fp32 matmul peak after the stages: {peak_after / 1e9:.1f} GFLOP/s; MFU against {peak / 1e9:.1f}")
    result["load_average_1min_after"] = os.getloadavg()[0]
    rows = []
    if "sft" in result:
        sft = result["sft"]
        sft["mfu_useful"] = 6 * sft["flop_params"] * sft["useful_tokens_per_second"] / peak
        sft["mfu_real"] = 6 * sft["flop_params"] * sft["real_tokens_per_second"] / peak
        rows.append(["SFT", f"{sft['useful_tokens_per_second']:,.0f} loss-bearing ({sft['real_tokens_per_second']:,.0f} real)",
                     f"{sft['flop_params'] / 1e6:.2f}M", f"{100 * sft['mfu_useful']:.1f}%",
                     f"{100 * sft['mfu_real']:.1f}% on real tokens"])
    if "sft_gemm_ceiling" in result:
        ceiling = result["sft_gemm_ceiling"]
        ceiling["mfu_useful"] = 6 * result["sft"]["flop_params"] * ceiling["useful_tokens_per_second"] / peak
        ceiling["gemm_share_of_peak"] = ceiling["gemm_flops_per_second"] / peak
        rows.append(["SFT bound: its matrix products alone", f"{ceiling['useful_tokens_per_second']:,.0f} loss-bearing",
                     "", f"{100 * ceiling['mfu_useful']:.1f}%",
                     f"{ceiling['rows']} positions x every linear layer, head on {ceiling['answer_rows']} answer "
                     f"positions, forward + 2 gradients: {100 * ceiling['gemm_share_of_peak']:.0f}% of the peak"])
    if "rm" in result:
        rm = result["rm"]
        rm["mfu"] = 6 * rm["flop_params"] * rm["real_tokens_per_second"] / peak
        rows.append(["RM", f"{rm['real_tokens_per_second']:,.0f} real", f"{rm['flop_params'] / 1e6:.2f}M",
                     f"{100 * rm['mfu']:.1f}%", ""])
    if "ppo" in result:
        ppo = result["ppo"]
        ppo["mfu"] = ppo["flops_per_response_token"] * ppo["response_tokens_per_second"] / peak
        rest_share = 1 - ppo["generate_share"] - ppo["update_share"]
        rows.append(["PPO", f"{ppo['response_tokens_per_second']:,.0f} response ({ppo['episodes_per_second']:.2f} episodes/s)",
                     " + ".join(f"{n / 1e6:.2f}M" for n in ppo["flop_params"]), f"{100 * ppo['mfu']:.1f}%",
                     f"time: generation {100 * ppo['generate_share']:.0f}% ({ppo['rollout_tokens_per_second']:,.0f} tokens/s), "
                     f"updates {100 * ppo['update_share']:.0f}%, rest (rollout forwards, RM, tests) {100 * rest_share:.0f}%"])
    print("\n".join(_common.table(["stage", "useful tokens/s", "N (FLOP params)", "MFU", "note"], rows)))
    for name, fixed in result.get("sft_fixes", {}).items():
        print(f"SFT fix {name}: " + (fixed.get("error") or f"{fixed['speedup']:.2f}x (median of per-round ratios; rounds "
                                     f"{', '.join(f'{t:,.0f}' for t in fixed['rounds'])} vs "
                                     f"{', '.join(f'{t:,.0f}' for t in result['sft']['rounds'])} useful tokens/s)"))
    if "sft_profile" in result:
        p = result["sft_profile"]
        print(f"SFT profile over {p['steps']} steps, {p['wall_seconds']:.1f} s wall; padding {100 * p['padding_share']:.0f}% "
              f"of positions, prompts {100 * p['prompt_share_of_real']:.0f}% of real tokens")
        for name, s in sorted(p["buckets"].items(), key=lambda kv: -kv[1]):
            print(f"  {name}: {s:.2f} s ({100 * s / p['wall_seconds']:.0f}%)")
    _common.save_results("mfu", result)


if __name__ == "__main__":
    main(sys.argv[1:])
