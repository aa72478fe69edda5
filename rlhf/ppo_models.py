"""PPO's networks: the policy and critic trained as one module, and the one forward the loop
calls for the log-probabilities, entropy and values of an answer (response_forward), whichever
model it runs (the policy with its critic, the frozen reference, the critic alone)."""

import contextlib
from typing import NamedTuple

import torch

from rlhf.common import head_scales_logits, launched_with_sharded_weights
from rlhf.generation import hf_model, positions
from rlhf.ppo_math import logprobs_and_entropy, logprobs_from_logits


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
