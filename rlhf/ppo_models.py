"""PPO's networks: the policy and critic trained as one module, and the one forward the loop
calls for the log-probabilities, entropy and values of an answer (response_forward), whichever
model it runs (the policy with its critic, the frozen reference, the critic alone); and the
Rollout, one iteration's answers and what the update learns from them, cut to what a forward reads."""

import contextlib
import dataclasses
from typing import NamedTuple

import torch

from rlhf.common import head_scales_logits, launched_with_sharded_weights
from rlhf.generation import hf_model, positions
from rlhf.ppo_math import first_eos_mask, logprobs_and_entropy, logprobs_from_logits


@dataclasses.dataclass
class Rollout:
    """One iteration's answers on this process, a row each (B), and what the update learns from
    them, filled in train_ppo.py's order: rollout(), rollout_forwards(), then scores and advantages.
    (B, T) tensors are right-padded: 0 (False) after each answer's end."""
    batch: list  # (B,) prompt rows {"messages", "problem"}, each PPO_SAMPLES_PER_PROMPT times in a row
    texts: list  # (B,) the answers as text, up to their first EOS
    passed: torch.Tensor  # (B,) unit-test reward (rlhf.reward.exec_rewards); NaN without tests
    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, T) answer ids, padded after the first EOS
    last_index: torch.Tensor  # (B,) the first EOS, or T - 1 where the answer was cut (first_eos_mask)
    sampled_logp: torch.Tensor | None  # (B, T) the sampler's logprobs (fp32 only: sample), else None
    mask: torch.Tensor | None = None  # (B, T) bool: the answer's tokens up to its first EOS
    ends_with_eos: torch.Tensor | None = None  # (B,) bool: not cut at PPO_RESPONSE_LEN
    old_logp: torch.Tensor | None = None  # (B, T) logprobs under the policy that sampled
    ref_logp: torch.Tensor | None = None  # (B, T) logprobs under the frozen reference
    values: torch.Tensor | None = None  # (B, T) the critic's V(s_t) (gae), else None
    score: torch.Tensor | None = None  # (B,) sequence score (rlhf.reward.sequence_scores)
    rm_score: torch.Tensor | None = None  # (B,) normalised RM score, NaN where the RM was not asked
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate to the reference
    trains_policy: torch.Tensor | None = None  # (B,) bool: its advantage may move the policy (policy_rows)
    imitate: torch.Tensor | None = None  # (B,) bool: self-imitation pushes it up (imitation_rows)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (gae), else None

    def select(self, rows):
        """The sampled rollout's rows `rows`, without the columns that are padding in all of them."""
        query_mask = self.query_mask[rows]
        width, answer_width = int(query_mask.sum(1).max()), int(self.last_index[rows].max()) + 1
        cut = lambda x: None if x is None else x[rows][:, :answer_width]  # noqa: E731
        return Rollout([self.batch[i] for i in rows], [self.texts[i] for i in rows], self.passed[rows],
                       self.query[rows][:, -width:], query_mask[:, -width:], cut(self.response),
                       self.last_index[rows], cut(self.sampled_logp))

    def padded(self, width, pad_id, eos_ids):
        """The sampled rollout with its answers padded to `width` columns, and their masks."""
        response = torch.nn.functional.pad(self.response, (0, width - self.response.shape[1]), value=pad_id)
        mask, ends_with_eos, last_index = first_eos_mask(response, eos_ids)  # (B, T), (B,), (B,)
        sampled_logp = self.sampled_logp
        if sampled_logp is not None:  # to the same width; 0 after each answer
            sampled_logp = torch.nn.functional.pad(sampled_logp, (0, width - sampled_logp.shape[1]))
            sampled_logp = torch.where(mask, sampled_logp, 0.0)
        return dataclasses.replace(self, response=response, last_index=last_index, sampled_logp=sampled_logp,
                                   mask=mask, ends_with_eos=ends_with_eos)

    def lengths(self):
        return self.query_mask.sum(1) + self.mask.sum(1)  # (B,) tokens of each row

    def minibatch(self, rows):
        """Rows `rows`, cut to the columns some of them use: prompts are left-padded (leading
        columns), answers padded after their EOS (trailing). Every loss and statistic is a masked
        mean, so the figures are the same with fewer positions through the network."""
        query_mask = self.query_mask[rows]
        start = int((query_mask.cumsum(1) == 0).all(0).sum())  # columns that are padding in every prompt
        T = max(1, int(self.mask[rows].sum(1).max()))  # the longest answer among the rows
        tokens = lambda x: None if x is None else x[rows, :T]  # noqa: E731
        answers = lambda x: None if x is None else x[rows]  # noqa: E731
        listed = rows.tolist()
        return Rollout([self.batch[i] for i in listed], [self.texts[i] for i in listed],
                       answers(self.passed), self.query[rows][:, start:], query_mask[:, start:],
                       self.response[rows][:, :T], answers(self.last_index), tokens(self.sampled_logp),
                       tokens(self.mask), answers(self.ends_with_eos), tokens(self.old_logp), tokens(self.ref_logp),
                       tokens(self.values), answers(self.score), answers(self.rm_score), tokens(self.kl),
                       answers(self.trains_policy), answers(self.imitate), tokens(self.advantages),
                       tokens(self.returns))


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic (None with a critic-free estimator) in one module, so accelerate (DDP,
    DeepSpeed, FSDP) prepares, clips and checkpoints them together with one optimizer (as TRL's
    PolicyAndValueWrapper)."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        # the decoder block classes: FSDP's transformer-based wrap (accelerate) shards each block apart
        self._no_split_modules = sorted({*(getattr(policy, "_no_split_modules", None) or []),
                                         *(getattr(critic, "_no_split_modules", None) or [])})

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, keep):
        """(logits (n, V) at the n True positions of `keep` (B, T), values (B, L) or None)."""
        logits = answer_logits(self.policy, input_ids, attention_mask, position_ids, logits_to_keep, keep)
        if self.critic is None:
            return logits, None
        return logits, token_values(self.critic, input_ids, attention_mask, position_ids)


class ResponseOutputs(NamedTuple):
    logp: torch.Tensor | None  # (B, T) log-probability of each answer token, 0 where mask is False
    entropy: torch.Tensor | None  # (n,) entropy of the n valid tokens' distributions (no gradient)
    values: torch.Tensor | None  # (B, T) the critic's V(s_t) of the state before token t; None without one


def response_forward(model, query, query_mask, response, mask, temperature, entropy=False, logprobs=True):
    """One forward over prompt + answer: the answer tokens' log-probabilities under
    softmax(logits / temperature), with `entropy` their distributions' entropy, and the critic's
    values where `model` has a critic.

    model: the prepared PolicyAndCritic (through its own forward: DDP synchronises gradients
    there), or a causal LM (the frozen reference); with logprobs=False the unwrapped
    PolicyAndCritic, of which only the critic runs (the sampler gave the logprobs). query (B, P)
    left-padded; response, mask (B, T), mask True on the answer's valid tokens. Position P-1+t
    predicts answer token t, and V(s_t) is read there too. Only the valid tokens' positions go
    through the LM head when the head can be called apart from the backbone (answer_logits): the
    padding after each answer's end, a large share of a mini-batch's columns, never does.
    """
    T = response.shape[1]
    ids = torch.cat([query, response], 1)  # (B, P + T)
    attention = torch.cat([query_mask, torch.ones_like(response)], 1)
    if not logprobs:
        values = token_values(model.critic, ids, attention, positions(attention))  # (B, P + T)
        return ResponseOutputs(None, None, values[:, -T - 1:-1])
    if isinstance(getattr(model, "module", model), PolicyAndCritic):
        logits, values = model(input_ids=ids, attention_mask=attention, position_ids=positions(attention),
                               logits_to_keep=T + 1, keep=mask)  # (n, V), (B, P + T)
        values = None if values is None else values[:, -T - 1:-1]
    else:
        logits, values = answer_logits(model, ids, attention, positions(attention), T + 1, mask), None
    if entropy:
        logp, ent = logprobs_and_entropy(logits, response[mask], temperature)  # (n,), (n,)
    else:
        logp, ent = logprobs_from_logits(logits, response[mask], temperature), None
    return ResponseOutputs(logp.new_zeros(mask.shape).masked_scatter(mask, logp), ent, values)


def head_apart(model):
    """The transformers model whose backbone and LM head can be called one after the other, or
    None: under ZeRO-3/FSDP a sharded module's parameters are gathered in its own (or its root's)
    forward, and a head that scales or caps its logits is more than the linear layer."""
    from transformers import PreTrainedModel

    base = hf_model(model)  # a DeepSpeed engine (PPO_SHARD_FROZEN_MODELS) is none: its own forward is used
    if launched_with_sharded_weights() or not isinstance(base, PreTrainedModel) or base.get_output_embeddings() is None:
        return None
    return None if head_scales_logits(base) else base


def answer_logits(model, input_ids, attention_mask, position_ids, logits_to_keep, keep):
    """A causal LM's (n, V) logits that predict the n True tokens of `keep` (B, T) among the last T
    (position t predicts token t + 1): only those positions through the LM head where head_apart
    allows it, else its whole forward over the last logits_to_keep positions."""
    base = head_apart(model)
    if base is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=logits_to_keep).logits
        return logits[:, -keep.shape[1] - 1:-1][keep]
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return base.get_output_embeddings()(hidden[:, -keep.shape[1] - 1:-1][keep])


def token_values(critic, input_ids, attention_mask, position_ids):
    """Per-token values (B, L): the reward model's scalar head applied at every position instead
    of only the last one (critic initialised from the RM: DeepSpeed-Chat, OpenRLHF, N+)."""
    base = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return critic.score(hidden).squeeze(-1).float()  # (B, L); peft routes `score` to its trained copy


def zero_value_head(critic):
    """Start the critic at V = 0 everywhere. Its head comes from the RM, whose raw scores (never
    trained on answer prefixes) are on another scale than the returns built from normalised
    scores; N+ subtracts the RM bias, OpenRLHF normalises the critic's output. With LoRA only the
    trained copy of the head is zeroed: the original stays the reward model's."""
    head = critic.score
    head = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
    params = list(head.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned it at load: gather, zero, re-partition
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        for p in params:
            p.zero_()


def disable_dropout(model):
    """Dropout off in every model during RL: with it the ratio is not 1 at the first update and
    the KL is noise (N+ implementation details; TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def frozen(copy, trained):
    """A frozen role (the reference policy, the reward model): `copy`, its model of its own, when it
    has one, else (LoRA) the network `trained()` returns with its adapter disabled: four roles, two
    networks (TRL, LLaMA-Factory, verl)."""
    if copy is not None:
        yield copy
        return
    network = trained()
    with network.disable_adapter():
        yield network
