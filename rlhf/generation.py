"""Sampling for a batch of prompts whose answers end at different lengths.

transformers' generate() keeps every row of the batch to the end, writing padding after each
row's EOS, so a call costs as many positions as rows x the longest answer. Code answers vary a
lot: on the embedded default at temperature 1 most positions that generate() computed were such
padding (bench/README.md, "Rollout (generation) speed"). `generate_tokens` takes a row that has
ended out of the batch and out of its KV cache, so later steps cost only the rows still writing.
It samples from softmax(logits / temperature) with optional top-k and top-p (nucleus) cuts, or
greedily, and reads nothing from the checkpoint's generation_config.

One process, DDP, ZeRO-1/2: each process runs its own loop. Under DeepSpeed ZeRO-3 and FSDP every
forward is a collective that all processes must run together, so callers use generate() with
synced_gpus there: `generate` picks the path.
"""

import inspect

import torch
from transformers.cache_utils import DynamicLayer


def positions(attention_mask):
    """Position ids that skip the left padding, as generate() computes them (B, L)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def next_tokens(logits, temperature, top_p=1.0, top_k=0):
    """One token per row of logits (B, V): argmax when temperature is falsy, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens (0: all), then to the
    smallest set whose probability reaches top_p (the most likely token always stays): the order
    in which transformers applies them."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return draw(logits.softmax(-1))


def draw(probs):
    """One index per row of probs (B, V), drawn with those probabilities by inverting the
    cumulative sum at a uniform draw: the same distribution as torch.multinomial(probs, 1), whose
    CPU kernel draws an exponential variate per vocabulary entry and took a fifth of a sampled
    generation call on the embedded default (bench/README.md, "Rollout (generation) speed").
    An entry of probability 0 is never drawn: the draw is kept below the total, and the first
    entry whose cumulative sum exceeds it has a positive share."""
    cumulative = probs.float().cumsum(-1)
    total = cumulative[:, -1:]
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)


def hf_model(model):
    """The transformers model itself: a peft model's base (where generate() reads its config)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model):
    """The name the model's forward takes its KV cache by: transformers 5 renamed past_key_values
    to cache (the old name still works, with a warning per process)."""
    return "cache" if "cache" in inspect.signature(hf_model(model).forward).parameters else "past_key_values"


def generate(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, temperature=None, top_p=1.0, top_k=0,
             logprobs=False):
    """New tokens (B, T) after left-padded prompts, as generate_tokens returns them; under
    DeepSpeed ZeRO-3 or FSDP through transformers' generate(), which keeps every process stepping
    until the last has finished (synced_gpus), drawing each token with next_tokens as the own loop
    does (generate() picks it greedily) and reading nothing from the checkpoint's generation_config
    (repetition_penalty, top_k, ... of public instruct models would change the distribution).
    logprobs: (tokens, logprobs (B, T) as generate_tokens gives them, or None on that path)."""
    from rlhf.common import launched_with_sharded_weights

    if not launched_with_sharded_weights():
        return generate_tokens(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k,
                               logprobs=logprobs)
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class DrawnToken(LogitsProcessor):
        """generate()'s greedy step then picks the token next_tokens draws: the same sampling (and
        the same random numbers, while no row has left the own loop's batch) as generate_tokens."""

        def __call__(self, ids, scores):
            token = next_tokens(scores, temperature, top_p, top_k)
            return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)

    base = hf_model(model)
    saved, base.generation_config = base.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([DrawnToken()] if temperature else []),
                             pad_token_id=pad_id, eos_token_id=list(eos_ids))
    finally:
        base.generation_config = saved
    return (out[:, input_ids.shape[1]:], None) if logprobs else out[:, input_ids.shape[1]:]


class PreallocatedLayer(DynamicLayer):
    """transformers' DynamicLayer with keys and values that are views of buffers with room for the
    answer: each step writes its position in place, where DynamicLayer concatenates, copying the
    whole cache every step (a tenth of a sampled call on the embedded default: bench/README.md,
    "Rollout (generation) speed"). Dropping rows (reorder_cache) copies the kept rows' buffers."""

    def update(self, key_states, value_states, *args, **kwargs):
        n, new = self.keys.shape[-2], key_states.shape[-2]
        if n + new > self.key_buffer.shape[-2]:  # past the room reserved: concatenate from here on
            self.__class__ = DynamicLayer
            return self.update(key_states, value_states, *args, **kwargs)
        self.key_buffer[:, :, n:n + new] = key_states
        self.value_buffer[:, :, n:n + new] = value_states
        self.keys, self.values = self.key_buffer[:, :, :n + new], self.value_buffer[:, :, :n + new]
        return self.keys, self.values

    def reorder_cache(self, rows):
        n = self.keys.shape[-2]
        self.key_buffer = self.key_buffer.index_select(0, rows.to(self.key_buffer.device))
        self.value_buffer = self.value_buffer.index_select(0, rows.to(self.value_buffer.device))
        self.keys, self.values = self.key_buffer[:, :, :n], self.value_buffer[:, :, :n]


def preallocate(cache, extra):
    """Turn the layers of a filled transformers DynamicCache into PreallocatedLayers with room for
    `extra` more positions (in place). A cache of another kind (sliding windows, static, a model's
    own) is left as it is."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return
    for layer in layers:
        (b, h, n, _), dv = layer.keys.shape, layer.values.shape[-1]
        layer.key_buffer = torch.cat([layer.keys, layer.keys.new_empty((b, h, extra, layer.keys.shape[-1]))], 2)
        layer.value_buffer = torch.cat([layer.values, layer.values.new_empty((b, h, extra, dv))], 2)
        layer.keys, layer.values = layer.key_buffer[:, :, :n], layer.value_buffer[:, :, :n]
        layer.__class__ = PreallocatedLayer


def distinct_rows(input_ids, attention_mask):
    """(first, copy_of): the first row of each distinct prompt (D,) and, per row, which of them
    it repeats (B,), so that a prompt asked several times (pass@k, PPO's answers per prompt) is
    read once and its KV cache copied; the prompt pass was a fifth of a sampled call at 8 answers
    a prompt (bench/README.md, "Rollout (generation) speed"). Every row distinct: both are 0..B-1."""
    rows = torch.arange(len(input_ids), device=input_ids.device)
    _, copy_of = torch.unique(torch.cat([input_ids, attention_mask], 1), dim=0, return_inverse=True)
    if int(copy_of.max()) + 1 == len(rows):
        return rows, rows
    first = torch.full((int(copy_of.max()) + 1,), len(rows), device=rows.device).scatter_reduce(0, copy_of, rows, "amin")
    return first, copy_of


@torch.no_grad()
def generate_tokens(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id,
                    temperature=None, top_p=1.0, top_k=0, shrink_at=0.75, count_rows=False, logprobs=False):
    """New tokens (B, T) for left-padded prompts (B, P): each row up to and including its first
    EOS (any of eos_ids), then pad_id; T <= max_new_tokens is the longest row's length, as
    generate() returns it after the prompt. Rows that have ended leave the batch once the rows
    still writing are at most `shrink_at` of the batch (copying the cache every step would cost
    more than it saves). count_rows: also return the row-steps computed (bench/bench_rollout.py).
    logprobs: also return each drawn token's log-probability (B, T) under the whole
    softmax(logits / temperature) (no top-k or top-p cut: PPO's ratio assumes that distribution),
    0 after each row's end: PPO's "old" logprobs, without a second forward over the answers."""
    device = input_ids.device
    batch = input_ids.shape[0]
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((batch, max_new_tokens), device=device) if logprobs else None
    if batch == 0 or max_new_tokens <= 0:
        return finish(out[:, :0], None if out_logp is None else out_logp[:, :0], 0, count_rows)
    eos = torch.tensor(list(eos_ids), device=device)
    rows = torch.arange(batch, device=device)  # the original row of each row still in the batch
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # per row still in the batch
    cache_name = cache_argument(model)
    mask = attention_mask
    position = positions(mask)
    first, copy_of = distinct_rows(input_ids, mask)
    result = model(input_ids=input_ids[first], attention_mask=mask[first], position_ids=position[first],
                   use_cache=True, logits_to_keep=1)
    cache, logits, position = getattr(result, cache_name), result.logits[copy_of, -1], position[:, -1:]
    if len(first) < batch:
        cache.reorder_cache(copy_of)
    preallocate(cache, max_new_tokens)
    steps = row_steps = 0
    for t in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_p, top_k)
        live = ~ended
        out[rows[live], t] = token[live]
        if out_logp is not None:
            scaled = logits.float() / temperature if temperature else logits.float()
            out_logp[rows[live], t] = torch.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1)[live]
        row_steps += len(rows)
        ended |= torch.isin(token, eos)
        steps = t + 1
        if ended.all() or t + 1 == max_new_tokens:
            break
        if (~ended).sum() <= shrink_at * len(rows):  # drop the rows that have ended
            keep = (~ended).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            rows, ended, token, mask, position = rows[keep], ended[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        position = position + 1
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                       use_cache=True, logits_to_keep=1, **{cache_name: cache}).logits[:, -1]
    return finish(out[:, :steps], None if out_logp is None else out_logp[:, :steps], row_steps, count_rows)


def finish(tokens, logprobs, row_steps, count_rows):
    """generate_tokens' result: the tokens, then the logprobs when asked for, then the row-steps
    when counted."""
    extra = ([] if logprobs is None else [logprobs]) + ([row_steps] if count_rows else [])
    return (tokens, *extra) if extra else tokens
