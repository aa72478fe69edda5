"""PPO's math as pure functions on tensors, unit-tested against hand-worked numbers in
tests/test_ppo_math.py; train_ppo.py's loop calls them. Each trick names its source.

Conventions shared by every function below:
- B = batch of responses, T = response length (prompt tokens removed), right-padded.
- `mask` is a bool tensor (B, T), True on valid response tokens. It comes from the position of
  the first EOS only (first_eos_mask), never from the pad id: a token equal to pad_id before the
  first EOS is valid, and the mask stays right even where pad_id == eos_id.
- Every response has at least one valid token (an EOS at position 0 is a one-token response
  whose only action is stopping), so masked means over a batch never divide by zero.
- Padding positions of returned (B, T) tensors are 0.
"""

import torch


def first_eos_mask(response_ids, eos_id):
    """Valid-token mask of right-padded responses: every token up to and including the first EOS.

    eos_id: an int, or a list of ints for models with several stop tokens.
    Returns (mask (B, T) bool, ends_with_eos (B,) bool, last_index (B,) long). last_index is the
    position of the first EOS, or T - 1 for a response that never emitted EOS (cut at the length
    limit); it is always a valid token. Truncation after EOS as in Huang et al. 2024 (N+ details).
    """
    if response_ids.shape[1] == 0:
        raise ValueError("first_eos_mask: responses have length 0; generate at least one token")
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_id, device=response_ids.device))  # (B, T)
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # (B, T) number of EOS strictly before t
    mask = eos_before == 0  # (B, T)
    ends_with_eos = is_eos.any(1)  # (B,)
    last_index = mask.sum(1) - 1  # (B,)
    return mask, ends_with_eos, last_index


def truncate_after_eos(response_ids, eos_id, pad_id):
    """Copy of response_ids (B, T) with every token after the first EOS replaced by pad_id.

    The reward model must score exactly this truncated text (Huang et al. 2024, "truncate after EOS");
    `generate` already pads finished rows, this also covers samplers that keep going.
    """
    mask, _, _ = first_eos_mask(response_ids, eos_id)
    return torch.where(mask, response_ids, pad_id)  # (B, T)


def logprobs_from_logits(logits, tokens, temperature):
    """Log-probability (B, T) of each taken token under softmax(logits / temperature).

    logits (B, T, V) must already be aligned with tokens (B, T): for a causal LM over prompt +
    response, logits = output.logits[:, prompt_len - 1 : -1] (or (n, V) and (n,): the valid
    tokens only, response_forward with `keep`). The SAME temperature must be used for
    the rollout ("old") logprobs, the reference logprobs and the training forward, otherwise the
    PPO ratio and the KL are off from step 0 (TRL <= 1.10 PPOv2 and the N+ code divide all three).
    Memory: one float32 (B, T, V) copy, gather + logsumexp instead of a full log_softmax output.
    """
    scaled = logits.float() / temperature  # (B, T, V)
    taken = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return taken - torch.logsumexp(scaled, dim=-1)  # (B, T)


def logprobs_and_entropy(logits, tokens, temperature):
    """logprobs_from_logits(logits, tokens, temperature) and, without gradient, the entropy of
    softmax(logits / temperature) (pass the sampling temperature, so it is the entropy of the
    distribution sampled from): H = logsumexp(x) - sum(softmax(x) * x), as TRL <= 1.10 PPOv2, with
    softmax(x) = exp(x - logsumexp(x)) from the logsumexp the logprobs need. Expects finite logits."""
    scaled = logits.float() / temperature  # (..., V)
    lse = torch.logsumexp(scaled, dim=-1)
    logp = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (torch.exp(scaled - lse.unsqueeze(-1)) * scaled).sum(-1)
    return logp, entropy


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate (B, T) of KL(policy || reference) from logprobs of sampled tokens.

    Schulman, "Approximating KL divergence" (2020), with r = p_ref / p_policy = exp(ref_logp - logp):
      k1 = -log r = logp - ref_logp      unbiased, can be negative per token (TRL, N+ default)
      k2 = 0.5 * (log r)^2               biased, low variance, >= 0
      k3 = (r - 1) - log r               unbiased, low variance, >= 0 (OpenRLHF, GRPO)
    k3 clamps log r to [-10, 10] before exp so one outlier token cannot give inf (OpenRLHF does the same).
    """
    log_ratio = ref_logp - logp  # (B, T) log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = log_ratio.clamp(-10.0, 10.0)
        return torch.expm1(log_ratio) - log_ratio  # expm1 keeps k3 exactly 0 when equal
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; use 'k1', 'k2' or 'k3'")


def per_token_rewards(score, kl, mask, last_index, kl_coef):
    """Per-token reward (B, T): -kl_coef * kl on valid tokens, plus the sequence score (B,) added
    at the last valid token (Ziegler et al. 2019 KL-shaped reward; InstructGPT). 0 on padding.

    Where the score lands: on last_index, the EOS (or the final token when cut), as the N+ code and
    OpenRLHF do. TRL <= 1.10 PPOv2 puts it one position later when it fits (on the first pad) and
    trains the value there, so the score reaches the EOS only through that extra value estimate, and
    lands on a different place for responses that fill T. The last token is the action that ended
    the episode: the score belongs to it, in one place for every response.
    (Reading the score from the RM at the position it was trained on is the caller's job.)
    """
    rewards = torch.where(mask, -kl_coef * kl, 0.0)  # (B, T)
    return rewards.scatter_add(1, last_index.unsqueeze(1), score.unsqueeze(1).to(rewards.dtype))


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where the bool mask is True (all of them, or along dim).
    Padding values never enter, not even NaN or inf."""
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum()
    return x.sum(dim) / mask.sum(dim)


def masked_total(x, mask, normalizer=None):
    """The sum of x over the valid positions divided by `normalizer`, a constant of the whole rollout
    batch (loss_normalizers); None: the masked mean of this tensor alone (a token mean per
    mini-batch)."""
    return masked_mean(x, mask) if normalizer is None else torch.where(mask, x, 0.0).sum() / normalizer


def loss_normalizers(counts, mini_batches, num_processes=1, total=None):
    """Each loss term's denominator for one rollout batch: the tokens that term trains on in the
    whole batch, over every process (`total`: a function that sums a tensor over processes),
    divided by the number of mini-batches (per process). So every token weighs the same in the
    epoch's gradient, whatever mini-batch it lands in; with a token mean per mini-batch, and
    mini-batches grouped by length, a token of a short-answer mini-batch would weigh several times
    one of a long-answer mini-batch, the per-answer normalisation Dr. GRPO removes (Liu et al. 2025), and
    rows that train nothing (advantage 0) would dilute their mini-batch. counts: {term: (B, T) bool
    or a count}; returns {term: float >= 1}."""
    out = {}
    for term, count in counts.items():
        n = torch.as_tensor(count).sum().float().reshape(1)
        n = total(n) if total is not None else n
        out[term] = max(1.0, float(n) / num_processes / mini_batches)
    return out


def masked_var(x, mask, unbiased=True):
    """Variance of x over valid positions; unbiased divides by n - 1 (as TRL's masked_var)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var: unbiased variance needs at least 2 valid tokens")
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over valid tokens only; padding set to 0.

    shift_mean=True for advantages (mean 0, var 1; Ziegler et al. 2019, N+, TRL). shift_mean=False
    for rewards: scale only, keep the mean, so the sign of the reward survives (TRL's
    `whiten_rewards`). Statistics are over this tensor only (per process under multi-GPU, like TRL).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    rewards, values (B, T); rewards and values outside the mask are treated as 0, so the state after
    the last valid token is terminal (V = 0). Returns (advantages, returns), both (B, T), 0 on
    padding; returns = advantages + values (the value target, as in TRL, N+, OpenRLHF).
    """
    rewards = torch.where(mask, rewards, 0.0)  # (B, T)
    values = torch.where(mask, values, 0.0)  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) TD error
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]  # (B,)
        advantages[:, t] = last_gae
    return advantages, advantages + values


def group_advantages(rewards, group, kind):
    """Critic-free advantage (N,) of each answer from its sequence reward (N,), measured against
    the other answers to the same prompt (`group` consecutive answers per prompt, group >= 2):
      grpo     (r - mean) / (std + 1e-4)   DeepSeekMath (Shao et al. 2024); std unbiased, as TRL and OpenRLHF
      dr_grpo  r - mean                    Dr. GRPO (Liu et al. 2025): dividing by the group's std
                                           up-weights prompts the policy almost always passes or fails
      rloo     r - mean of the OTHER answers = group / (group - 1) * (r - mean)   (Ahmadian et al. 2024)
    A group whose answers all score the same gets 0 from each. The caller gives every token of an
    answer its answer's advantage. Dr. GRPO's other fix, no division by each answer's own length,
    holds for every estimator here: policy_loss averages over all tokens of the mini-batch.
    """
    r = rewards.float().reshape(-1, group)  # (N / group, group)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        advantages = centred / (r.std(1, keepdim=True) + 1e-4)
    elif kind == "dr_grpo":
        advantages = centred
    elif kind == "rloo":
        advantages = centred * group / (group - 1)
    else:
        raise ValueError(f"group_advantages: unknown kind {kind!r}; use 'grpo', 'dr_grpo' or 'rloo'")
    return advantages.flatten()  # (N,)


def compute_advantages(kind, score, kl, values, mask, last_index, kl_coef, group, trains_policy, gamma, lam):
    """Advantages (B, T) of one rollout batch, and the critic's targets (B, T) (None without a critic).

    score (B,) sequence scores; kl (B, T) per-token KL estimate, paid as reward at kl_coef (pass 0
    when the KL is a loss term instead); values (B, T) the critic's, or None; trains_policy (B,)
    bool, False for answers whose group all passed or all failed its unit tests: their advantage
    is 0, so they cannot move the policy (they still train the critic). kind:
      gae          critic, GAE(gamma, lam) over KL-shaped per-token rewards, then whitened (N+, TRL)
      reinforce++  no critic, the return-to-go of the same rewards, whitened over the batch (Hu 2025,
                   OpenRLHF's "reinforce++")
      grpo, dr_grpo, rloo   no critic, the group baseline of group_advantages on score - kl_coef * KL
    """
    live = mask & trains_policy.unsqueeze(1)  # (B, T) tokens whose advantage can move the policy
    returns = None
    if kind in ("gae", "reinforce++"):
        rewards = per_token_rewards(score, kl, mask, last_index, kl_coef)  # (B, T)
        if kind == "gae":
            advantages, returns = gae(rewards, values, mask, gamma, lam)
        else:  # returns-to-go: GAE with no critic and lambda 1
            advantages = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]
        if live.sum() < 2:  # nothing to learn from in this batch
            return torch.zeros_like(advantages), returns
        advantages = masked_whiten(advantages, live)  # Ziegler et al. 2019; over trained tokens only
    else:
        sequence = score - kl_coef * torch.where(mask, kl, 0.0).sum(1)  # (B,)
        advantages = group_advantages(sequence, group, kind).unsqueeze(1).expand_as(kl)  # (B, T)
    return torch.where(live, advantages, 0.0), returns


def policy_loss(logp, old_logp, advantages, mask, clip, normalizer=None):
    """Clipped surrogate loss of PPO (Schulman et al. 2017) over valid tokens (masked_total: their
    mean, or their sum / normalizer).

    logp (B, T) from the current forward (with grad); old_logp, advantages (B, T) from the rollout.
    Returns (loss, stats) with detached tensor stats: clipfrac (share of valid tokens where the
    clipped term is active), approx_kl (k3 of old vs new, as CleanRL; TRL logs 0.5 * logratio^2),
    ratio_mean, ratio_var. The log ratio is zeroed on padding before exp, so garbage logprobs there
    can give neither inf nor a NaN gradient.
    """
    log_ratio = torch.where(mask, logp - old_logp, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_unclipped = -advantages * ratio  # (B, T)
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_total(torch.max(loss_unclipped, loss_clipped), mask, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def self_imitation_loss(logp, mask, imitate, normalizer=None):
    """Negative logprob over the valid tokens (mask (B, T)) of the answers to imitate (B,)
    (imitation_rows), pushed up without PPO's clip (self-imitation learning, Oh et al. 2018; the
    same idea as rejection-sampling fine-tuning): their mean, or their sum / normalizer. 0 when
    none is in the mini-batch."""
    good = mask & imitate.unsqueeze(1)  # (B, T)
    if normalizer is None:
        normalizer = good.sum().clamp(min=1)  # masked_mean, 0 when empty
    return -torch.where(good, logp, 0.0).sum() / normalizer


def value_loss(values, old_values, returns, mask, clip, normalizer=None):
    """Clipped value loss (PPO2 baselines; TRL, N+): 0.5 * max((V - R)^2, (V_clip - R)^2), masked mean,
    where V_clip = old_V + clamp(V - old_V, -clip, clip). values (B, T) with grad, the rest from the
    rollout. Returns (loss, stats) with vf_clipfrac (share of valid tokens where the clipped term wins).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    loss_unclipped = (values - returns) ** 2  # (B, T)
    loss_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_total(torch.max(loss_unclipped, loss_clipped), mask, normalizer)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def mixed_groups(passed, group):
    """(N / group,) bool: True for each group of `group` consecutive responses (the answers to one
    prompt) whose unit-test rewards `passed` (N,) differ. NaN (no tests) counts as not mixed."""
    groups = passed.reshape(-1, group)
    return (groups.amax(1) > groups.amin(1)) & ~groups.isnan().any(1)


def informative_groups(passed, group, keep):
    """Indices (keep * group,) of the responses to train on, out of a larger sampled batch of
    groups in the order they were drawn: first the groups without tests among the first `keep`
    (the share a plain draw of `keep` prompts gives the prompts scored by the reward model or a
    function of the user's: the tests say nothing about them), then the groups with mixed test
    results, then the others to fill up, so the count and every shape stay fixed; returned in
    sampled order.

    A group whose answers all pass or all fail teaches little: its advantages are mostly the
    critic's error on one outcome. Training on the prompts with mixed outcomes is DAPO's "dynamic
    sampling" (Yu et al. 2025, arXiv 2503.14476); here sampling cost is small next to the update.
    """
    untested = passed.reshape(-1, group).isnan().all(1)  # (G,)
    own_share = untested & (torch.arange(len(untested), device=passed.device) < keep)
    mixed = mixed_groups(passed, group)
    rank = torch.where(own_share, 0, torch.where(mixed, 1, 2))  # (G,) kept in this order, ties in draw order
    chosen = torch.argsort(rank, stable=True)[:keep].sort().values
    return (chosen.unsqueeze(1) * group + torch.arange(group, device=passed.device)).flatten()


def policy_rows(passed, group):
    """(B,) bool: the answers whose advantage may move the policy. With several answers per prompt,
    every answer of a group whose test results differ, and every answer to a prompt without tests
    (scored by the reward model); a group whose answers all pass or all fail gets advantage 0 (it
    still trains the critic). With one answer per prompt there is no group to compare: every
    answer trains, against the critic's values (gae) or the batch's whitening (reinforce++)."""
    if group == 1:
        return torch.ones_like(passed, dtype=torch.bool)
    groups = passed.reshape(-1, group)
    return (mixed_groups(passed, group) | groups.isnan().all(1)).repeat_interleave(group)


def imitation_rows(passed, ends_with_eos, trains, group):
    """(B,) bool: the answers self-imitation pushes up (PPO_SIL_COEF): those that passed every test
    in a group where some failed, and ended. An answer cut at PPO_RESPONSE_LEN can still pass (its
    first code block is complete) but gets the missing-EOS penalty: imitating it would teach the
    rambling the penalty punishes. None with one answer per prompt (no group to compare)."""
    if group == 1:
        return torch.zeros_like(ends_with_eos)
    return trains & (passed == 1) & ends_with_eos


class KLController:
    """KL coefficient beta: fixed when target is None, else adaptive (Ziegler et al. 2019):
    beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.

    current_kl: mean per-response KL (sum over tokens of k1, averaged over the batch);
    n_steps, horizon: counted in episodes (responses), as Ziegler et al. and OpenRLHF (horizon 10000).
    state_dict() holds only the coefficient; target and horizon come from the settings of the run.
    """

    def __init__(self, init_coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = float(init_coef), target, horizon

    def update(self, current_kl, n_steps):
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


def length_grouped_order(lengths, mini_batch, generator, jitter=16.0):
    """One epoch's order of the rows: shuffled, then sorted by length (prompt + answer tokens, plus
    a random jitter of up to `jitter` tokens, so the groups change from epoch to epoch), cut into
    mini-batches of similar length whose order is shuffled again. Every row is visited once per
    epoch as before; a mini-batch's forward is only as wide as its longest row, so fewer padding
    positions go through the network. (B,) lengths -> (B,) permutation."""
    perm = torch.randperm(len(lengths), generator=generator)
    key = lengths.cpu()[perm].float() + jitter * torch.rand(len(lengths), generator=generator)
    perm = perm[torch.argsort(key, stable=True)]
    groups = perm.reshape(-1, mini_batch)
    return groups[torch.randperm(len(groups), generator=generator)].reshape(-1)
