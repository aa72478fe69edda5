"""Unit tests for the PPO math (rlhf/ppo_math.py). Expected numbers are worked out by hand in the
comments, never by calling the code under test."""

import math
import types

import pytest
import torch
from torch.testing import assert_close

from rlhf import ppo_math as P
from rlhf import reward as R

EOS, PAD = 2, 0
T_, F_ = True, False


# ---- masks and truncation ----


def test_first_eos_mask_cases():
    ids = torch.tensor([
        [5, 2, 7, 0],  # EOS in the middle        -> valid up to and including it
        [2, 5, 2, 0],  # EOS at position 0        -> only the EOS is valid (one-token response)
        [5, 6, 7, 2],  # EOS at the last position -> all valid
        [5, 6, 7, 8],  # no EOS (cut at the limit) -> all valid, ends_with_eos False
        [0, 5, 2, 0],  # pad id before EOS        -> still valid: we mask by EOS position only
    ])
    mask, ends, last = P.first_eos_mask(ids, EOS)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [T_, T_, F_, F_],
        [T_, F_, F_, F_],
        [T_, T_, T_, T_],
        [T_, T_, T_, T_],
        [T_, T_, T_, F_],
    ]
    assert ends.tolist() == [True, True, True, False, True]
    assert last.tolist() == [1, 0, 3, 3, 2]


def test_first_eos_mask_pad_equal_to_eos_and_several_eos_ids():
    # pad == eos: the first EOS is valid, the padding copies after it are not
    mask, ends, last = P.first_eos_mask(torch.tensor([[5, 2, 2, 2]]), eos_id=2)
    assert mask.tolist() == [[T_, T_, F_, F_]] and ends.tolist() == [True] and last.tolist() == [1]
    # two stop tokens (e.g. <|im_end|> and <|endoftext|>): whichever comes first ends the response
    mask, ends, last = P.first_eos_mask(torch.tensor([[5, 3, 2, 0], [5, 6, 2, 0]]), eos_id=[2, 3])
    assert mask.tolist() == [[T_, T_, F_, F_], [T_, T_, T_, F_]]
    assert last.tolist() == [1, 2]


def test_first_eos_mask_rejects_empty_responses():
    with pytest.raises(ValueError):
        P.first_eos_mask(torch.zeros(2, 0, dtype=torch.long), EOS)


def test_truncate_after_eos():
    ids = torch.tensor([[5, 2, 7, 9], [5, 6, 7, 8], [2, 7, 2, 7]])
    before = ids.clone()
    out = P.truncate_after_eos(ids, EOS, PAD)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert torch.equal(ids, before)  # input left alone


# ---- logprobs, entropy ----


def test_logprobs_from_logits_manual_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])  # (1, 2, 3)
    tokens = torch.tensor([[2, 0]])
    # temperature 1, token 2: 3 - ln(e + e^2 + e^3) = 3 - ln(30.1928748) = 3 - 3.4076060 = -0.4076060
    # token 0: 1 - 3.4076060 = -2.4076060
    assert_close(P.logprobs_from_logits(logits, tokens, 1.0), torch.tensor([[-0.4076060, -2.4076060]]))
    # temperature 2 -> logits [0.5, 1, 1.5]; token 0: 0.5 - ln(1.6487213 + 2.7182818 + 4.4816891)
    # = 0.5 - ln(8.8486922) = 0.5 - 2.1802697 = -1.6802697
    out = P.logprobs_from_logits(logits[:, :1], tokens[:, 1:], 2.0)
    assert_close(out, torch.tensor([[-1.6802697]]))


def test_logprobs_from_logits_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(P.logprobs_from_logits(logits, tokens, 0.7), expected)


def test_logprobs_and_entropy():
    # uniform over V = 7: H = ln 7 = 1.9459101, whatever the logit value and temperature
    logits = torch.full((2, 3, 7), 5.0, requires_grad=True)
    logp, entropy = P.logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long), 0.7)
    assert_close(entropy, torch.full((2, 3), 1.9459101))
    assert_close(logp, torch.full((2, 3), -1.9459101))
    assert logp.requires_grad and not entropy.requires_grad  # a statistic: no gradient through it
    # p = [1/4, 3/4] (logits [0, ln 3]): H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert_close(P.logprobs_and_entropy(two, torch.tensor([[1]]), 1.0)[1], torch.tensor([[0.5623351]]))
    # the logprobs are logprobs_from_logits'
    g = torch.Generator().manual_seed(1)
    logits, tokens = torch.randn(4, 9, generator=g) * 3, torch.randint(0, 9, (4,), generator=g)
    assert_close(P.logprobs_and_entropy(logits, tokens, 0.7)[0], P.logprobs_from_logits(logits, tokens, 0.7))


# ---- KL estimators ----


def test_kl_estimators_values_and_signs():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -1.0])
    # k1 = logp - ref: positive where the policy likes the token more than the reference
    assert_close(P.kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    # k2 = 0.5 (log r)^2 = 0.5 * 1
    assert_close(P.kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    # k3 = (r - 1) - log r, log r = ref - logp = [-1, 1]:
    # [e^-1 - 1 + 1, e - 1 - 1] = [0.3678794, 0.7182818]
    assert_close(P.kl_estimate(logp, ref, "k3"), torch.tensor([0.3678794, 0.7182818]))


def test_k3_non_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(4, 9, generator=g) * 5, -torch.rand(4, 9, generator=g) * 5
    assert (P.kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(P.kl_estimate(logp, logp, "k3"), torch.zeros(4, 9))
    assert torch.isfinite(P.kl_estimate(torch.tensor([-100.0]), torch.tensor([0.0]), "k3")).all()
    # log r clamped to [-10, 10]: beyond it, the value at the bound
    far = P.kl_estimate(torch.tensor([-30.0, 0.0]), torch.tensor([0.0, -30.0]), "k3")
    assert_close(far, torch.tensor([math.expm1(10.0) - 10.0, math.expm1(-10.0) + 10.0]))
    with pytest.raises(ValueError):
        P.kl_estimate(logp, ref, "k4")


# ---- rewards ----


def test_score_lands_on_last_valid_token():
    score = torch.tensor([1.0, 2.0])
    kl = torch.full((2, 4), 0.5)
    kl[0, 2:] = 100.0  # garbage on padding must not leak into the reward
    mask = torch.tensor([[T_, T_, F_, F_], [T_, T_, T_, T_]])
    last = torch.tensor([1, 3])  # row 0 ends with EOS at 1, row 1 has no EOS: its last token
    # -0.1 * 0.5 = -0.05 per valid token; score added on the last valid token
    expected = torch.tensor([[-0.05, 0.95, 0.0, 0.0], [-0.05, -0.05, -0.05, 1.95]])
    assert_close(P.per_token_rewards(score, kl, mask, last, kl_coef=0.1), expected)


def test_score_position_from_real_ids():
    ids = torch.tensor([[2, 0, 0, 0], [5, 6, 2, 0], [5, 6, 7, 8]])
    mask, _, last = P.first_eos_mask(ids, EOS)
    rewards = P.per_token_rewards(torch.tensor([3.0, 4.0, 5.0]), torch.zeros(3, 4), mask, last, 0.05)
    assert rewards.tolist() == [[3.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 5.0]]


def test_missing_eos_penalty_replaces_score():
    score = torch.tensor([0.5, 3.0, -2.0])
    ends = torch.tensor([True, False, False])
    # replace semantics: -2.0 becomes -1.0 (subtracting 1 would give -3.0)
    assert_close(R.apply_missing_eos_penalty(score, ends, -1.0), torch.tensor([0.5, -1.0, -1.0]))


def test_the_reward_model_refuses_a_tokenizer_without_its_own_pad_token():
    """Padding with EOS (or with nothing) would pool the score at the wrong token: refused before any
    forward, whatever the model."""
    for pad in (None, 2):
        with pytest.raises(ValueError, match="pad token distinct from EOS"):
            R.score_conversations(None, types.SimpleNamespace(pad_token_id=pad, eos_token_id=2), [], device="cpu")


def test_rm_scores_are_normalised_by_the_rm_stages_statistics():
    # (score - mean) / std: (1 - 1) / 2 = 0, (5 - 1) / 2 = 2, (-3 - 1) / 2 = -2
    assert_close(R.normalize_rewards(torch.tensor([1.0, 5.0, -3.0]), {"mean": 1.0, "std": 2.0}),
                 torch.tensor([0.0, 2.0, -2.0]))


# ---- masked statistics ----


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[T_, T_], [T_, F_]])
    assert_close(P.masked_mean(x, mask), torch.tensor(2.0))  # (1 + 2 + 3) / 3
    assert_close(P.masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    m = torch.tensor([[T_, T_, T_, T_, F_]])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> unbiased 5/3, biased 5/4
    assert_close(P.masked_var(y, m), torch.tensor(5.0 / 3.0))
    assert_close(P.masked_var(y, m, unbiased=False), torch.tensor(1.25))
    with pytest.raises(ValueError):
        P.masked_var(y, torch.tensor([[T_, F_, F_, F_, F_]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0], [4.0, 5.0, 6.0, float("nan")]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, T_, F_]])
    # valid values 1..6: mean 3.5, unbiased var 17.5 / 5 = 3.5, std 1.8708287
    # (x - 3.5) / 1.8708287 = -1.3363062, -0.8017837, -0.2672612, 0.2672612, 0.8017837, 1.3363062
    expected = torch.tensor([
        [-1.3363062, -0.8017837, -0.2672612, 0.0],
        [0.2672612, 0.8017837, 1.3363062, 0.0],
    ])
    out = P.masked_whiten(x, mask)
    assert_close(out, expected)  # padding zeroed, even NaN
    assert_close(P.masked_mean(out, mask), torch.tensor(0.0))
    assert_close(P.masked_var(out, mask), torch.tensor(1.0))
    # shift_mean=False (rewards): scaled but the mean 3.5 is kept
    expected_no_shift = torch.tensor([
        [2.1636938, 2.6982163, 3.2327388, 0.0],
        [3.7672612, 4.3017837, 4.8363062, 0.0],
    ])
    assert_close(P.masked_whiten(x, mask, shift_mean=False), expected_no_shift)


# ---- GAE ----


def test_gae_gamma_1_lam_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 7.0], [0.0, 0.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[T_, T_, T_, F_], [T_, T_, T_, T_]])
    adv, ret = P.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0 reward-to-go [6, 5, 3] (the 7.0 and 9.0 on padding are ignored) minus V [0.5, 1, 1.5]
    # row 1 reward-to-go [2, 2, 2, 1] minus V [1, 1, 1, 1]
    assert_close(adv, torch.tensor([[5.5, 4.0, 1.5, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0], [2.0, 2.0, 2.0, 1.0]]))


def test_gae_hand_computed_gamma_09_lam_095():
    # 3 valid tokens, r = [0, 0, 1], V = [0.5, 0.6, 0.7]; position 3 is padding with junk in it
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 5.0]])
    mask = torch.tensor([[T_, T_, T_, F_]])
    # gamma * lam = 0.855
    # t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3              A2 = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03           A1 = 0.03 + 0.855 * 0.3 = 0.2865
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04           A0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    # returns = A + V = [0.7849575, 0.8865, 1.0]
    adv, ret = P.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert_close(adv, torch.tensor([[0.2849575, 0.2865, 0.3, 0.0]]))
    assert_close(ret, torch.tensor([[0.7849575, 0.8865, 1.0, 0.0]]))


# ---- losses ----


def _policy_case():
    # ratios 1.1 (inside clip), 1.5 (above), 0.5 (below), 0.5 (below); position 4 is padding
    old = torch.full((1, 5), -1.0)
    log_ratio = torch.log(torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.0]]))
    logp = (old + log_ratio).clone()
    logp[0, 4] = 1000.0  # junk on padding: exp would overflow if it were not masked
    logp.requires_grad_(True)
    adv = torch.tensor([[2.0, 1.0, -1.0, 1.0, 3.0]])
    mask = torch.tensor([[T_, T_, T_, T_, F_]])
    return logp, old, adv, mask


def test_policy_loss_value_and_stats():
    logp, old, adv, mask = _policy_case()
    loss, stats = P.policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)):
    #   r 1.1, A  2: max(-2.2, -2.2) = -2.2  (not clipped)
    #   r 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped)
    #   r 0.5, A -1: max( 0.5,  0.8) =  0.8  (clipped)
    #   r 0.5, A  1: max(-0.5, -0.8) = -0.5  (not clipped)
    # mean = (-2.2 - 1.2 + 0.8 - 0.5) / 4 = -0.775; clipfrac = 2 / 4
    assert_close(loss, torch.tensor(-0.775))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    # ratio mean (1.1 + 1.5 + 0.5 + 0.5) / 4 = 0.9; var (0.04 + 0.36 + 0.16 + 0.16) / 4 = 0.18
    assert_close(stats["ratio_mean"], torch.tensor(0.9))
    assert_close(stats["ratio_var"], torch.tensor(0.18))
    # k3 = (r - 1) - ln r: 0.0046898 + 0.0945349 + 2 * 0.1931472 = 0.4855191, / 4 = 0.1213798
    assert_close(stats["approx_kl"], torch.tensor(0.1213798))


def test_policy_loss_gradient_signs():
    logp, old, adv, mask = _policy_case()
    loss, _ = P.policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 where the unclipped term is active, 0 where the clip holds:
    #   token 0: -2 * 1.1 / 4 = -0.55 (descent raises logp of a positive-advantage token)
    #   token 1: ratio above 1 + clip with A > 0 -> 0
    #   token 2: ratio below 1 - clip with A < 0 -> 0
    #   token 3: -1 * 0.5 / 4 = -0.125 (below the clip but A > 0: not clipped, as in PPO)
    #   token 4: padding -> 0, and finite
    assert_close(logp.grad, torch.tensor([[-0.55, 0.0, 0.0, -0.125, 0.0]]))


def test_self_imitation_loss_averages_the_passing_answers_tokens_only():
    logp = torch.tensor([[-0.5, -1.5, -9.0], [-2.0, -4.0, -6.0], [-1.0, -7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_], [T_, F_, F_]])
    imitate = torch.tensor([True, False, True])
    loss = P.self_imitation_loss(logp, mask, imitate)
    # rows 0 and 2, valid tokens only: -(-0.5 - 1.5 - 1.0) / 3 = 1.0
    assert_close(loss, torch.tensor(1.0))
    loss.backward()
    # descent raises the logprob of each imitated valid token by the same 1/3; nothing else moves
    assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [0.0, 0.0, 0.0], [-1 / 3, 0.0, 0.0]]))
    none = P.self_imitation_loss(logp, mask, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and torch.isfinite(none)


def test_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.1, 0.5, 0.5, 0.0, 100.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_, T_, F_]])
    loss, stats = P.value_loss(values, old, returns, mask, clip=0.2)
    # V_clip = old + clamp(V - old, +-0.2) = [0.1, 0.2, 0.2, 0.8]
    #   (0.1-1)^2 = 0.81 vs 0.81 -> 0.81 (tie, not clipped)
    #   (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #   (0.5-0)^2 = 0.25 vs (0.2-0)^2 = 0.04 -> 0.25
    #   (0.0-1)^2 = 1.00 vs (0.8-1)^2 = 0.04 -> 1.00
    # loss = 0.5 * (0.81 + 0.64 + 0.25 + 1.0) / 4 = 0.3375; vf_clipfrac = 1 / 4
    assert_close(loss, torch.tensor(0.3375))
    assert_close(stats["vf_clipfrac"], torch.tensor(0.25))
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 4 = (V - R) / 4 where unclipped wins: [-0.225, 0 (clipped), 0.125, -0.25, 0]
    assert_close(values.grad, torch.tensor([[-0.225, 0.0, 0.125, -0.25, 0.0]]))


# ---- KL controller ----


def test_adaptive_kl_controller_direction_and_state():
    ctl = P.KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=1000)  # error 12/6 - 1 = 1 -> clipped to 0.2: x(1 + 0.2 * 0.1) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, n_steps=1000)  # error -0.5 -> -0.2: x 0.98 -> 0.09996
    assert ctl.value == pytest.approx(0.09996)
    ctl.update(6.6, n_steps=1000)  # error 0.1 (inside the clip): x 1.01 -> 0.1009596
    assert ctl.value == pytest.approx(0.1009596)

    resumed = P.KLController(0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(9.0, 500)
    resumed.update(9.0, 500)
    assert resumed.value == ctl.value != pytest.approx(0.1009596)


def test_fixed_kl_controller_does_not_move():
    ctl = P.KLController(0.05)
    ctl.update(100.0, n_steps=10**6)
    assert ctl.value == 0.05


def test_mixed_groups_and_informative_groups():
    nan = float("nan")
    # 4 prompts x 2 answers: all fail, mixed, all pass, no tests; then 2 more prompts: mixed, partial credit equal
    passed = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0, nan, nan, 0.0, 0.5, 0.5, 0.5])
    assert P.mixed_groups(passed, 2).tolist() == [False, True, False, False, True, False]
    # keep 3 groups: the two mixed ones (1 and 4) first, then the first uniform one (0); sampled order
    assert P.informative_groups(passed, 2, 3).tolist() == [0, 1, 2, 3, 8, 9]
    # no mixed group: the first `keep` groups, i.e. what an unfiltered batch would have been
    assert P.informative_groups(torch.ones(8), 4, 1).tolist() == [0, 1, 2, 3]
    # more mixed groups than needed: the earliest sampled ones
    assert P.informative_groups(torch.tensor([0.0, 1.0] * 3), 2, 2).tolist() == [0, 1, 2, 3]


def test_prompts_without_tests_keep_the_share_they_were_drawn_with():
    """Oversampling keeps mixed groups first, but the prompts the tests say nothing about (scored
    by the reward model) keep the share a plain draw gives them, instead of becoming filler that
    vanishes as more groups turn mixed."""
    nan = float("nan")
    # 8 groups of 2 drawn in this order: untested, mixed, untested, mixed, mixed, mixed, untested, all fail
    passed = torch.tensor([nan, nan, 0, 1, nan, nan, 1, 0, 0, 1, 1, 0, nan, nan, 0, 0])
    # keep 4: the untested groups among the first 4 drawn (0 and 2), then the mixed ones (1, 3)
    assert P.informative_groups(passed, 2, 4).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # half the prompt file untested, every tested group mixed: the kept share stays about a half
    gen = torch.Generator().manual_seed(0)
    kept, drawn = 0, 0
    for _ in range(200):
        untested = torch.rand(16, generator=gen) < 0.5  # 4 kept of 16 drawn (PPO_OVERSAMPLE 4)
        passed = torch.where(untested.repeat_interleave(2), nan, torch.tensor([0.0, 1.0]).repeat(16))
        rows = P.informative_groups(passed, 2, 4)
        kept += int(passed[rows].isnan().sum()) // 2
        drawn += int(untested[:4].sum())
    assert kept == drawn  # exactly the plain draw's untested groups (mixed_groups-first kept none of them)


def test_rows_that_train_the_policy_and_rows_to_imitate():
    nan = float("nan")
    passed = torch.tensor([1.0, 0.0, 1.0, 1.0, nan, nan])  # mixed, all pass, untested
    ended = torch.tensor([True, True, True, True, True, False])
    trains = P.policy_rows(passed, 2)
    assert trains.tolist() == [True, True, False, False, True, True]
    assert P.imitation_rows(passed, ended, trains, 2).tolist() == [True, False, False, False, False, False]
    # a passing answer cut at the length limit (no EOS) gets the missing-EOS penalty: never imitated
    cut = torch.tensor([False, True, True, True, True, True])
    assert not P.imitation_rows(passed, cut, trains, 2).any()
    # one answer per prompt (gae, reinforce++): no group to compare, every answer trains, none is imitated
    one = torch.tensor([1.0, 0.0, nan])
    assert P.policy_rows(one, 1).tolist() == [True, True, True]
    assert not P.imitation_rows(one, torch.ones(3, dtype=torch.bool), P.policy_rows(one, 1), 1).any()


def test_batch_normalisation_weighs_every_token_the_same_across_mini_batches():
    """PPO_LOSS_NORM=batch: summed over the mini-batches of an epoch, each token's loss enters
    with the same weight, n_mini_batches / tokens of the batch, whatever the length of the answers
    it shares a mini-batch with; a token mean per mini-batch weighs the tokens of a short-answer
    mini-batch more (here 1/2 against 1/6)."""
    x = torch.arange(16.0).reshape(2, 8)  # per-token losses of 2 mini-batches of 1 row each
    mask = torch.tensor([[True] * 2 + [False] * 6, [True] * 6 + [False] * 2])  # 2 and 6 valid tokens
    norm = P.loss_normalizers({"policy": mask}, mini_batches=2)["policy"]
    assert norm == 4.0  # 8 tokens / 2 mini-batches
    batch = sum(P.masked_total(x[i:i + 1], mask[i:i + 1], norm) for i in range(2))
    assert_close(batch, 2 * P.masked_mean(x, mask))  # 2 mini-batches x the token mean over the batch
    per_mini_batch = sum(P.masked_total(x[i:i + 1], mask[i:i + 1]) for i in range(2))
    assert_close(per_mini_batch, torch.tensor((0 + 1) / 2 + (8 + 9 + 10 + 11 + 12 + 13) / 6))
    # over processes: the counts are summed and shared out, so every process divides by the same number
    total = P.loss_normalizers({"v": 10}, mini_batches=5, num_processes=2, total=lambda n: n * 2)["v"]
    assert total == 2.0  # (10 + 10) / 2 processes / 5 mini-batches
    assert P.loss_normalizers({"sil": torch.zeros(3, dtype=torch.bool)}, 2)["sil"] == 1.0  # nothing to imitate: no 0


def test_losses_with_a_batch_normaliser_are_sums_over_it():
    logp, old, adv, mask = _policy_case()
    loss, _ = P.policy_loss(logp, old, adv, mask, clip=0.2, normalizer=2.0)
    assert_close(loss, torch.tensor((-2.2 - 1.2 + 0.8 - 0.5) / 2))
    sil = P.self_imitation_loss(torch.tensor([[-1.0, -3.0]]), torch.tensor([[True, True]]), torch.tensor([True]), 8.0)
    assert_close(sil, torch.tensor(0.5))
    v, _ = P.value_loss(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[True]]),
                        clip=0.2, normalizer=4.0)
    assert_close(v, torch.tensor(0.125))


def test_reward_model_reads_as_many_answers_on_every_process_when_sharded(monkeypatch):
    """Under ZeRO-3/FSDP each RM forward is a collective: two processes whose batches hold
    different numbers of prompts without tests must still run the same forwards."""
    read = []
    monkeypatch.setattr(R, "score_responses", lambda rm, tok, prompts, texts, device=None: read.append(len(texts))
                        or torch.zeros(len(texts)))
    mix = R.RewardMix(rm_weight=1.0, exec_weight=1.0, exec_reward="all", rm_on_tested=False, missing_eos_penalty=-1.0)
    nan = float("nan")
    batch, texts, ended = [{"messages": []}] * 4, ["a"] * 4, torch.ones(4, dtype=torch.bool)
    norm = {"mean": 0.0, "std": 1.0}
    ranks = [torch.tensor([1.0, 0.0, nan, nan]), torch.tensor([1.0, 0.0, 1.0, 1.0])]  # 2 and 0 untested rows
    for every_row in (False, True):
        read.clear()
        scores = [R.sequence_scores(None, None, norm, batch, texts, ended, passed, "cpu", mix, every_row=every_row)
                  for passed in ranks]
        assert read == ([4, 4] if every_row else [2])
        # the tested answers' RM scores are read but not used: the tests decide there
        assert scores[0][1].isnan().tolist() == [True, True, False, False]
        assert_close(scores[0][0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


# ---- critic-free advantages (PPO_ADVANTAGE) ----


def test_group_advantages_hand_computed():
    # two prompts x 4 answers: one pass in the first group, all pass in the second
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, centred (0.75, -0.25, -0.25, -0.25); unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    assert_close(P.group_advantages(r, 4, "grpo"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (0.5 + 1e-4))
    assert_close(P.group_advantages(r, 4, "dr_grpo"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    # RLOO: each answer against the mean of the 3 others: 1 - 0 = 1, 0 - 1/3 = -1/3
    assert_close(P.group_advantages(r, 4, "rloo"), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        P.group_advantages(r, 4, "ppo")


def test_compute_advantages_group_kinds_broadcast_and_pay_kl_per_answer():
    mask = torch.tensor([[T_, T_], [T_, F_]])
    kl = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    score, last = torch.tensor([1.0, 0.0]), torch.tensor([1, 0])
    trains = torch.tensor([True, True])
    # sequence rewards 1 - 0.1 * (0.5 + 0.5) = 0.9 and 0; dr_grpo: 0.9 - 0.45 = 0.45 and -0.45 on every valid token
    adv, returns = P.compute_advantages("dr_grpo", score, kl, None, mask, last, 0.1, 2, trains, 1.0, 1.0)
    assert returns is None
    assert_close(adv, torch.tensor([[0.45, 0.45], [-0.45, 0.0]]))


def test_compute_advantages_answers_that_do_not_train_the_policy_get_zero():
    mask = torch.ones(4, 3, dtype=torch.bool)
    score, kl, last = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.rand(4, 3), torch.full((4,), 2)
    trains = torch.tensor([True, True, False, False])  # second group: all failed its tests
    for kind in ("grpo", "rloo", "dr_grpo", "reinforce++"):
        adv, _ = P.compute_advantages(kind, score, kl, None, mask, last, 0.05, 2, trains, 1.0, 1.0)
        assert adv[2:].abs().sum() == 0 and adv[:2].abs().sum() > 0, kind
    adv, returns = P.compute_advantages("gae", score, kl, torch.rand(4, 3), mask, last, 0.05, 2, trains, 1.0, 0.95)
    assert adv[2:].abs().sum() == 0 and returns[2:].abs().sum() > 0  # the critic still learns from them
    # whitened over the trained tokens only: mean 0 and unbiased variance 1 there
    assert_close(adv[:2].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(adv[:2].var(), torch.tensor(1.0), atol=1e-3, rtol=0)
    # nothing to train on: zeros, not NaN
    adv, _ = P.compute_advantages("reinforce++", score, kl, None, mask, last, 0.05, 2, torch.zeros(4, dtype=torch.bool), 1.0, 1.0)
    assert adv.abs().sum() == 0


def test_reinforce_pp_is_the_whitened_return_to_go():
    mask = torch.ones(2, 2, dtype=torch.bool)
    # no KL: rewards (0, 1) and (0, 0) -> returns-to-go (1, 1) and (0, 0); mean 0.5, unbiased var 4 * 0.25 / 3 = 1/3
    adv, _ = P.compute_advantages("reinforce++", torch.tensor([1.0, 0.0]), torch.zeros(2, 2), None, mask,
                                  torch.tensor([1, 1]), 0.0, 2, torch.tensor([True, True]), 1.0, 1.0)
    z = 0.5 / math.sqrt(1 / 3)
    assert_close(adv, torch.tensor([[z, z], [-z, -z]]), atol=1e-4, rtol=0)
    # two trained tokens are enough to whiten: +-1/sqrt(2) (unbiased variance of (1, 0) is 1/2)
    one = torch.tensor([[True, False], [True, False]])
    adv, _ = P.compute_advantages("reinforce++", torch.tensor([1.0, 0.0]), torch.zeros(2, 2), None, one,
                                  torch.tensor([0, 0]), 0.0, 2, torch.tensor([True, True]), 1.0, 1.0)
    assert_close(adv, torch.tensor([[math.sqrt(0.5), 0.0], [-math.sqrt(0.5), 0.0]]), atol=1e-4, rtol=0)


def test_length_grouped_order_visits_every_row_once_in_mini_batches_of_like_length():
    lengths = torch.tensor([90, 10, 50, 12, 88, 52, 11, 13])  # clusters of 4, 2 and 2 rows: ~10, ~50, ~90
    g = torch.Generator().manual_seed(0)
    orders = [P.length_grouped_order(lengths, 2, g, jitter=3.0) for _ in range(20)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(8))  # a permutation: every row once per epoch
        for pair in order.reshape(-1, 2):  # each mini-batch within one cluster (jitter 3 < the gaps)
            a, b = lengths[pair].tolist()
            assert abs(a - b) <= 3, order
    # the mini-batches' order and, within a cluster, their members change from epoch to epoch
    assert len({tuple(o.tolist()) for o in orders}) > 1
    assert len({tuple(o[:2].tolist()) for o in orders}) > 1


def test_rm_agreement_with_tests_counts_the_failed_answers_that_have_a_reference(monkeypatch):
    """agreement_with_tests: for each failed answer whose task has a reference program, does the RM
    score the reference higher? Per group: all failures, held-out and seen parameter values. Here
    the RM scores '+' (the references add, the wrong answers subtract) unless it is asked about t4."""
    from conftest import toy_tasks
    from rlhf.codeeval import problem_from_row

    monkeypatch.setattr(R, "score_responses", lambda rm, tok, prompts, texts, device=None: torch.tensor(
        [float("+" in text and "add_4" not in text) for text in texts]))
    rows = toy_tasks(5)
    rows[4].pop("solution")  # t5: no reference, left out
    problems = [problem_from_row(dict(r, heldout_params=k >= 2), "t.jsonl") for k, r in enumerate(rows)]
    results = [{"task_id": f"t{k}", "passed": k == 1, "raw": f"def add_{k}(x):\n    return x - {k}"} for k in range(1, 6)]
    results.append({"task_id": "t2", "passed": False})  # no answer text: left out
    out = R.agreement_with_tests(None, None, problems, results)
    # failed with a reference: t2 (seen), t3 and t4 (held out); the RM prefers the reference but on t4
    assert out == {"all failures": (pytest.approx(2 / 3), 3, pytest.approx(2 / 3), 0.0),
                   "held-out parameter values": (0.5, 2, 0.5, 0.0), "seen parameter values": (1.0, 1, 1.0, 0.0)}
    assert R.agreement_with_tests(None, None, problems, results[:1]) == {}  # t1 passed: nothing to compare
