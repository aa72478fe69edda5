"""Rollout speed of PPO: generated tokens per second of the policy's sampling alone, with the
generation options transformers offers, on the batches train_ppo.py samples.

Each variant generates the same PPO_BATCH_SIZE-response batches (prompts picked as train_ppo.py
picks them, PPO_SAMPLES_PER_PROMPT answers each, same seed per batch) with PPO_RESPONSE_LEN new
tokens at most and PPO_TEMPERATURE; variants run alternately (A, B, C, A, B, C, ...) and the
median over rounds is reported. Tokens counted: response tokens up to and including the first
EOS (what PPO trains on); "row-steps" are all positions computed (generate(): B x longest;
train_ppo.py's own loop: the rows still in the batch at each step).
The no-cache contrast runs in the first round only (it is an order of magnitude slower).

    python bench/bench_rollout.py                        # ./sft_model, all variants
    python bench/bench_rollout.py --rounds=5 --batches=2
    python bench/bench_rollout.py --SFT_DIR=/tmp/x/sft_model --PPO_BATCH_SIZE=64

Variants: train_ppo.py's sampling (rlhf.generation: a row that has ended leaves the batch and
its KV cache), the same with tokens drawn by torch.multinomial (before rlhf.generation.draw), the
same with transformers' KV cache grown by concatenation (before rlhf.generation.preallocate), the
same with every copy of a prompt read in the prompt pass (before rlhf.generation.distinct_rows), and
transformers' generate() with its dynamic KV cache (its default), a static KV cache, no KV cache
(contrast), and prompts sorted by length then generated in two halves (less left padding per
call, half the batch per call).
"""

import statistics
import sys
import time

import _common
import config as C
from rlhf.settings import apply_overrides

VARIANTS = {  # name -> (generate() keyword arguments, or None for rlhf.generation; calls the batch is split into; sort by length)
    "ended rows leave the batch (train_ppo.py)": (None, 1, False),
    "ended rows leave the batch, torch.multinomial draws": (None, 1, False),
    "ended rows leave the batch, KV cache grown by concatenation": (None, 1, False),
    "ended rows leave the batch, each copy of a prompt read (before rlhf.generation.distinct_rows)": (None, 1, False),
    "generate(), dynamic cache": (dict(), 1, False),
    "static cache": (dict(cache_implementation="static"), 1, False),
    "no cache (contrast)": (dict(use_cache=False), 1, False),
    "static cache, sorted, 2 calls": (dict(cache_implementation="static"), 2, True),
}


def multinomial_draw(probs):
    """How rlhf.generation drew tokens before its inverse-CDF `draw` (the same distribution)."""
    import torch

    return torch.multinomial(probs, 1).squeeze(-1)


def ppo_batch(prompts, step):
    """The prompts of PPO step `step` on process 0, as train_ppo.py picks them (without oversampling)."""
    from train_ppo import step_prompts

    return step_prompts(prompts, step, 0, C.PPO_BATCH_SIZE // C.PPO_SAMPLES_PER_PROMPT, seed=C.SEED,
                        samples_per_prompt=C.PPO_SAMPLES_PER_PROMPT)


def generate_batch(policy, tokenizer, batch, kwargs, calls, sort):
    """Sample responses for `batch`; returns (seconds, valid response tokens, row-steps)."""
    import torch

    from rlhf.generation import generate_tokens
    from rlhf.ppo_math import first_eos_mask
    from train_ppo import encode_prompts

    if sort:  # shortest prompts together: less left padding in each call
        batch = sorted(batch, key=lambda r: len(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True)))
    size = -(-len(batch) // calls)
    seconds, valid, computed = 0.0, 0, 0
    for i in range(0, len(batch), size):
        query, query_mask = encode_prompts(tokenizer, batch[i:i + size], "cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            if kwargs is None:
                response, computed_now = generate_tokens(policy, query, query_mask, C.PPO_RESPONSE_LEN,
                                                         [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                                         temperature=C.PPO_TEMPERATURE, count_rows=True)
            else:
                gen = policy.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=C.PPO_RESPONSE_LEN,
                                      do_sample=True, temperature=C.PPO_TEMPERATURE, top_k=0, top_p=1.0,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id],
                                      **kwargs)
                response = gen[:, query.shape[1]:]
                computed_now = response.numel()
        seconds += time.perf_counter() - t0
        valid += int(first_eos_mask(response, [tokenizer.eos_token_id])[0].sum())
        computed += computed_now
    return seconds, valid, computed


def main(argv):
    own, rest = _common.own_options(argv, {"rounds": 3, "batches": 2, "variants": ""})
    apply_overrides(rest)
    import torch
    from transformers import AutoModelForCausalLM

    import rlhf.generation as G
    from rlhf.common import load_tokenizer, seed_everything
    from rlhf.ppo_setup import load_prompts

    tokenizer = load_tokenizer(C.SFT_DIR)
    policy = AutoModelForCausalLM.from_pretrained(C.SFT_DIR, dtype=torch.float32).eval()
    prompts = load_prompts(C.PPO_PROMPTS_FILE, tokenizer, C.MAX_LEN - C.PPO_RESPONSE_LEN)
    names = [n for n in VARIANTS if not own["variants"] or any(v in n for v in own["variants"].split(","))]
    result = _common.header("python bench/bench_rollout.py " + " ".join(argv))
    result.update(model=C.SFT_DIR, batch_size=C.PPO_BATCH_SIZE, response_len=C.PPO_RESPONSE_LEN,
                  batches_per_round=own["batches"], rounds=own["rounds"], variants={n: [] for n in names})
    cdf_draw, preallocate, distinct_rows = G.draw, G.preallocate, G.distinct_rows
    every_row = lambda ids, mask: (torch.arange(len(ids)), torch.arange(len(ids)))  # noqa: E731
    generate_batch(policy, tokenizer, ppo_batch(prompts, 0), {}, 1, False)  # warm-up
    for r in range(own["rounds"]):
        for name in names:
            if r and "contrast" in name:  # slow and far off: one round is enough
                continue
            kwargs, calls, sort = VARIANTS[name]
            G.draw = multinomial_draw if "multinomial" in name else cdf_draw
            G.preallocate = (lambda cache, extra: None) if "concatenation" in name else preallocate
            G.distinct_rows = every_row if "each copy" in name else distinct_rows
            totals = [0.0, 0, 0]
            for b in range(own["batches"]):
                seed_everything(C.SEED + b)  # the same samples for every variant where the math is equal
                for k, v in enumerate(generate_batch(policy, tokenizer, ppo_batch(prompts, b + 1), kwargs, calls, sort)):
                    totals[k] += v
            seconds, valid, computed = totals
            result["variants"][name].append({"seconds": seconds, "tokens": valid, "row_steps": computed,
                                             "tokens_per_second": valid / seconds})
            print(f"round {r + 1} | {name} | {valid / seconds:,.0f} tokens/s | {computed / seconds:,.0f} row-steps/s "
                  f"| {seconds:.1f} s", flush=True)
    base_name = next((n for n in names if n.startswith("generate()")), names[0])
    base = statistics.median(x["tokens_per_second"] for x in result["variants"][base_name])
    rows = []
    for name in names:
        runs = result["variants"][name]
        tps = statistics.median(x["tokens_per_second"] for x in runs)
        rows.append([name, f"{tps:,.0f}", ", ".join(f"{x['tokens_per_second']:,.0f}" for x in runs), f"{tps / base:.2f}x"])
    result["load_average_1min_after"] = __import__("os").getloadavg()[0]
    print("\n".join(_common.table(["variant", "tokens/s (median)", "rounds", f"vs {base_name}"], rows)))
    _common.save_results("rollout", result)


if __name__ == "__main__":
    main(sys.argv[1:])
