"""rlhf.generation: the sampling loop whose ended rows leave the batch gives what generate()
gives, samples the distribution it says, and keeps ended rows ended."""

from types import SimpleNamespace

import pytest
import torch

import rlhf.generation as G
from rlhf.generation import draw, generate_tokens, next_tokens


@pytest.fixture(scope="module")
def model_and_prompts(tiny_base):
    from rlhf.common import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_base, torch.float32).eval(), load_tokenizer(tiny_base)
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: answers that vary (a fresh model repeats one token)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    texts = ["def add(a, b):", "写一个函数 add_3(x)，返回 x 加 3。 Then some more words of a longer prompt", "x", "return x + 1"]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return model, tok, enc["input_ids"], enc["attention_mask"]


def greedy_stop_tokens(model, ids, mask, pad_id):
    """Tokens that end the greedy answers of different rows at different steps: the tokens two rows
    write at steps of their own (the model never learnt to write its EOS)."""
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=pad_id, eos_token_id=None)[:, ids.shape[1]:]
    return sorted({int(full[0, 2]), int(full[1, 7])})


def test_greedy_answers_equal_generate_while_rows_leave_the_batch(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    stops = greedy_stop_tokens(model, ids, mask, tok.pad_token_id)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=stops)[:, ids.shape[1]:]
    for shrink_at in (0.75, 1.0, 0.0):  # 1.0: a row leaves as soon as it ends; 0.0: none leaves early
        got = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id, shrink_at=shrink_at)
        assert torch.equal(got, expected), shrink_at
    ended = [row.tolist().index(s) for row in got for s in stops if s in row.tolist()]
    assert len(set(ended)) > 1  # rows did end at different steps (else nothing left the batch)


def test_one_row_alone_answers_as_in_a_batch_and_row_steps_count_the_rows_computed(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    stops = greedy_stop_tokens(model, ids, mask, tok.pad_token_id)
    batch = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id)
    for i in range(len(ids)):
        keep = mask[i].bool()  # without the left padding the batch gave it
        alone = generate_tokens(model, ids[i:i + 1, keep], mask[i:i + 1, keep], 12, stops, tok.pad_token_id)
        assert alone.shape[1] > 0 and torch.equal(alone[0], batch[i, :alone.shape[1]]), i
    lengths = [next((t + 1 for t, x in enumerate(row.tolist()) if x in stops), 12) for row in batch]
    _, steps = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id, shrink_at=0.0, count_rows=True)
    assert steps == len(ids) * max(lengths)  # no row leaves: every row every step
    _, steps = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id, shrink_at=1.0, count_rows=True)
    assert steps == sum(lengths)  # each row until its end
    every_token = list(range(model.config.vocab_size))  # every row ends at its first token
    assert generate_tokens(model, ids, mask, 12, every_token, tok.pad_token_id).shape == (len(ids), 1)


def test_sampling_by_default_draws_from_the_whole_distribution(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    answers = []
    for kwargs in ({}, {"top_k": 0, "top_p": 1.0}):
        torch.manual_seed(3)
        answers.append(generate_tokens(model, ids, mask, 12, [], tok.pad_token_id, temperature=1.0, **kwargs))
    assert torch.equal(*answers)
    torch.manual_seed(3)
    assert not torch.equal(answers[0], generate_tokens(model, ids, mask, 12, [], tok.pad_token_id, temperature=1.0,
                                                       top_k=1))  # a cut there would show


def test_a_prompt_asked_several_times_is_read_once_and_each_copy_answers_as_it_alone_would(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    stops = greedy_stop_tokens(model, ids, mask, tok.pad_token_id)
    alone = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id)
    widths = []  # rows of each forward: the prompt pass first
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        copies = generate_tokens(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 12, stops,
                                 tok.pad_token_id)
    finally:
        hook.remove()
    assert widths[0] == ids.shape  # 4 distinct prompts read once, not 12 rows
    assert torch.equal(copies, alone.repeat_interleave(3, 0)[:, :copies.shape[1]])
    assert widths[1][0] == 12  # then every copy writes its own answer


def test_rows_after_their_end_hold_only_padding_and_length_is_the_longest_row(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    stops = greedy_stop_tokens(model, ids, mask, tok.pad_token_id)
    torch.manual_seed(0)
    got = generate_tokens(model, ids.repeat(4, 1), mask.repeat(4, 1), 20, stops, tok.pad_token_id, temperature=1.0)
    assert got.shape[0] == 16 and got.shape[1] <= 20
    longest = 0
    for row in got.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            assert all(t == tok.pad_token_id for t in row[end + 1:])
            longest = max(longest, end + 1)
        else:
            longest = len(row)
    assert got.shape[1] == longest


def test_sampling_draws_from_softmax_over_temperature_and_the_top_k_top_p_set(monkeypatch):
    seen = []
    monkeypatch.setattr(G, "draw", lambda probs: seen.append(probs) or probs.argmax(-1))
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 0.0]])
    next_tokens(logits, 0.7, 1.0)
    torch.testing.assert_close(seen[-1], torch.softmax(logits / 0.7, -1))
    # top_p 0.8 of [0.61, 0.22, 0.14, 0.03] (T = 1): the two most likely reach it; of [0.04, 0.87, ...] one
    next_tokens(logits, 1.0, 0.8)
    probs = torch.softmax(logits, -1)
    kept = torch.tensor([[True, True, False, False], [False, True, False, False]])
    expected = torch.where(kept, probs, 0.0)
    torch.testing.assert_close(seen[-1], expected / expected.sum(-1, keepdim=True))
    # top_k 2: the two largest logits; ties with the second stay (as in transformers)
    next_tokens(logits, 1.0, 1.0, top_k=2)
    kept = torch.tensor([[True, True, False, False], [True, True, True, True]])
    expected = torch.where(kept, probs, 0.0)
    torch.testing.assert_close(seen[-1], expected / expected.sum(-1, keepdim=True))
    # top_k 3 and top_k 1 (only the most likely token left, as greedy)
    next_tokens(logits, 1.0, 1.0, top_k=3)
    kept = torch.tensor([[True, True, True, False], [True, True, True, True]])
    expected = torch.where(kept, probs, 0.0)
    torch.testing.assert_close(seen[-1], expected / expected.sum(-1, keepdim=True))
    next_tokens(logits, 1.0, 1.0, top_k=1)
    torch.testing.assert_close(seen[-1], torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    # top_p on a tie: 0.5 of [0.5, 0.25, 0.25] is reached by the first token alone (transformers'
    # TopPLogitsWarper keeps just it too)
    next_tokens(torch.tensor([[2.0, 1.0, 1.0]]).log(), 1.0, 0.5)
    torch.testing.assert_close(seen[-1], torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(next_tokens(logits, None, 1.0), torch.tensor([0, 1]))  # greedy


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]).repeat(20000, 1)
    drawn = draw(probs).reshape(-1, 2)
    share = torch.stack([torch.bincount(drawn[:, i], minlength=5).float() / len(drawn) for i in range(2)])
    torch.testing.assert_close(share, probs[:2], atol=0.01, rtol=0)  # 20,000 draws: sd <= 0.0035
    assert share[0, 1] == 0 and share[0, 4] == 0 and share[1, 3] == 1


def test_draw_at_the_top_of_the_uniform_range_stays_on_a_positive_entry(monkeypatch):
    """A uniform draw just below 1 times the total can round up to the total itself (here: a
    draw of 1.0); the entries after the last positive one (top-k or top-p cut) must still never
    be drawn, nor an index past the end."""
    monkeypatch.setattr(torch, "rand_like", lambda x: torch.ones_like(x))
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]])
    assert draw(probs).tolist() == [1, 2]
    monkeypatch.setattr(torch, "rand_like", lambda x: torch.zeros_like(x))
    assert draw(torch.tensor([[0.0, 0.0, 0.5, 0.5]])).tolist() == [2]


def test_sampled_logprobs_are_those_a_whole_forward_gives_and_zero_after_the_end(model_and_prompts):
    model, tok, ids, mask = model_and_prompts
    stops = greedy_stop_tokens(model, ids, mask, tok.pad_token_id)
    ids, mask = ids.repeat(3, 1), mask.repeat(3, 1)
    torch.manual_seed(0)
    tokens, logp = generate_tokens(model, ids, mask, 12, stops, tok.pad_token_id, temperature=0.7, logprobs=True)
    assert logp.shape == tokens.shape
    whole = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():  # the answers read again in one forward, as PPO's loop would
        logits = model(input_ids=torch.cat([ids, tokens], 1), attention_mask=whole,
                       position_ids=G.positions(whole)).logits[:, ids.shape[1] - 1:-1]
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ended = torch.isin(tokens, torch.tensor(stops))
    valid = (ended.cumsum(1) - ended.long()) == 0  # up to and including the first stop token
    assert not valid.all() and valid.any(1).all()  # some rows ended early (they left the batch)
    assert torch.allclose(logp[valid], expected[valid], atol=1e-5)
    assert (logp[~valid] == 0).all()


def test_a_preallocated_cache_writes_in_place_then_concatenates_past_its_room():
    """preallocate's layers hold what DynamicLayer would, the keys and values of every position so
    far, in place while the reserved room lasts and by concatenation after it; other kinds of
    cache are left as they are."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from rlhf.generation import PreallocatedLayer, preallocate

    steps = [torch.randn(2, 3, n, 4) for n in (2, 1, 1, 1)]  # (B, heads, new positions, head dim)
    layer = DynamicLayer()
    layer.update(steps[0], -steps[0])
    preallocate(SimpleNamespace(layers=[layer]), 2)  # room for 2 more positions
    for i, new in enumerate(steps[1:], 2):
        keys, values = layer.update(new, -new)
        torch.testing.assert_close(keys, torch.cat(steps[:i], 2))
        torch.testing.assert_close(values, -torch.cat(steps[:i], 2))
        assert type(layer) is (PreallocatedLayer if i <= 3 else DynamicLayer), i
    # a cache with a layer of another kind (Gemma 2, Mistral: sliding windows beside full layers) is left alone
    full, window = DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8)
    for layer in (full, window):
        layer.update(steps[0], -steps[0])
    preallocate(SimpleNamespace(layers=[full, window]), 2)
    assert (type(full), type(window)) == (DynamicLayer, DynamicSlidingWindowLayer)
