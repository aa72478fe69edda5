"""The parts of train_ppo.py and rlhf/ppo_models.py around the math that a wrong line would
silently break: the distribution the rollout samples from, the critic's starting scale, which
parameters are clipped, the forward that reads only the answers' valid tokens."""

import pytest
import torch

import config as C
import rlhf.generation as G
import rlhf.ppo_models as M
import train_ppo as P
from rlhf.ppo_math import first_eos_mask


@pytest.fixture
def policy_and_tokenizer(tiny_base):
    from rlhf.common import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_base, torch.float32).eval(), load_tokenizer(tiny_base)


def test_rollout_samples_plain_softmax_whatever_the_checkpoint_generation_config(policy_and_tokenizer, monkeypatch):
    """A checkpoint's generation_config (repetition_penalty 1.05-1.1 in public Qwen instruct models,
    top_k, ...) must not reach the rollout: the logprobs of the loop assume softmax(logits / T)."""
    policy, tok = policy_and_tokenizer
    query, query_mask = P.encode_prompts(tok, [{"messages": [{"role": "user", "content": "add add add add"}]}] * 4, "cpu")
    drawn = []  # the distribution of every draw
    draw = G.draw
    monkeypatch.setattr(G, "draw", lambda probs: drawn.append(probs) or draw(probs))

    def rollout():
        torch.manual_seed(0)
        drawn.clear()
        with torch.no_grad():
            response, logp = P.sample(policy, query, query_mask, [tok.eos_token_id], tok.pad_token_id, max_tokens=8,
                                      temperature=0.7, own_logprobs=True)
            return response, logp, list(drawn)

    plain, _, plain_draws = rollout()
    policy.generation_config.repetition_penalty = 1.5
    policy.generation_config.top_k = 3
    policy.generation_config.no_repeat_ngram_size = 1
    configured, logp, configured_draws = rollout()
    assert torch.equal(plain, configured) and len(plain_draws) == plain.shape[1]
    # the logprobs the sampler hands back are those of the distribution it drew from
    first = configured_draws[0].gather(1, configured[:, :1]).log().squeeze(1)
    torch.testing.assert_close(logp[:, 0], first)
    # the first draw: softmax of the last prompt position's logits / 0.7, all of the vocabulary
    with torch.no_grad():
        logits = policy(input_ids=query, attention_mask=query_mask, position_ids=G.positions(query_mask)).logits[:, -1]
    torch.testing.assert_close(configured_draws[0], torch.softmax(logits / 0.7, -1))
    assert policy.generation_config.repetition_penalty == 1.5  # the checkpoint's own config is left as it was


def test_critic_starts_at_zero_and_the_reward_model_keeps_its_head(tiny_base):
    from peft import get_peft_model

    from rlhf.common import lora_config
    from rlhf.reward import load_reward_model

    ids = torch.tensor([[5, 6, 7, 8]])
    mask, pos = torch.ones_like(ids), torch.arange(4).unsqueeze(0)
    critic = load_reward_model(tiny_base)
    assert M.token_values(critic, ids, mask, pos).abs().sum() > 0
    M.zero_value_head(critic)
    assert M.token_values(critic, ids, mask, pos).abs().sum() == 0

    # LoRA: the critic's trained copy of the head starts at 0, the reward model (adapter off) is untouched
    critic = load_reward_model(tiny_base)
    rm_before = critic(input_ids=ids, attention_mask=mask).logits
    cfg = lora_config("SEQ_CLS", C)
    cfg.modules_to_save = ["score"]
    critic = get_peft_model(critic, cfg)
    M.zero_value_head(critic)
    assert M.token_values(critic, ids, mask, pos).abs().sum() == 0
    with critic.disable_adapter():
        torch.testing.assert_close(critic(input_ids=ids, attention_mask=mask).logits, rm_before)


def test_gradient_clipping_acts_on_the_prepared_parameters():
    """FSDP2's prepare replaces the parameter objects: clipping a list taken before it clips tensors
    that never get a gradient. optimizer_step must clip the prepared model's own parameters."""
    model = torch.nn.Linear(4, 1)
    before = list(model.parameters())
    model.weight = torch.nn.Parameter(model.weight.detach().clone())  # what fully_shard does, in place
    model.bias = torch.nn.Parameter(model.bias.detach().clone())

    class Accelerator:  # the two calls optimizer_step makes, as accelerate does them on one process
        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, parameters, max_norm):
            self.clipped = list(parameters)
            return torch.nn.utils.clip_grad_norm_(self.clipped, max_norm)

    acc, optimizer = Accelerator(), torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    weight = model.weight.detach().clone()
    P.optimizer_step(acc, model, optimizer, scheduler, (model(torch.ones(2, 4)) * 100).sum(), 0.01)
    assert [id(p) for p in acc.clipped] == [id(p) for p in model.parameters()]
    assert not any(p is q for p in acc.clipped for q in before)
    # the step moved the weights by lr x the clipped gradient: at most the clip norm
    assert 0 < (model.weight.detach() - weight).norm() <= 0.01 + 1e-6


def test_padding_columns_cut_from_a_mini_batch_leave_its_logprobs(policy_and_tokenizer):
    """Rollout.minibatch drops the prompt columns every row pads and the answer columns after every
    row's EOS; the logprobs of the valid tokens must not move."""
    policy, tok = policy_and_tokenizer
    prompts = [{"messages": [{"role": "user", "content": text}]} for text in ("add 1", "add two to x please", "add 3")]
    query, query_mask = P.encode_prompts(tok, prompts, "cpu")  # left-padded
    query, query_mask = torch.cat([torch.full((3, 2), tok.pad_token_id), query], 1), torch.cat(
        [torch.zeros(3, 2, dtype=query_mask.dtype), query_mask], 1)  # two more all-padding columns
    eos, pad = tok.eos_token_id, tok.pad_token_id
    response = torch.tensor([[5, 6, eos, pad, pad, pad, pad], [7, eos, pad, pad, pad, pad, pad],
                             [8, 9, 10, 11, eos, pad, pad]])
    mask, _, last = first_eos_mask(response, [eos])
    roll = P.Rollout(prompts, ["a", "b", "c"], torch.zeros(3), query, query_mask, response, last, None, mask=mask)
    mb = roll.minibatch(torch.tensor([0, 1, 2]))
    assert mb.response.shape == (3, 5) and mb.mask.shape == (3, 5) and mb.query_mask[:, 0].any()
    assert mb.query.shape[1] == query.shape[1] - 2 and mb.texts == ["a", "b", "c"]
    with torch.no_grad():
        full = M.response_forward(policy, query, query_mask, response, mask, 1.0).logp
        cut = M.response_forward(policy, mb.query, mb.query_mask, mb.response, mb.mask, 1.0).logp
    torch.testing.assert_close(cut[mb.mask], full[mask], rtol=1e-5, atol=1e-5)


def test_logits_of_the_valid_response_tokens_only_give_the_same_logprobs_values_and_gradients(tiny_base,
                                                                                           policy_and_tokenizer,
                                                                                           monkeypatch):
    """response_forward sends only the answers' valid tokens through the LM head (the reference,
    the policy with its critic, the policy with LoRA): their logprobs, entropies, the values and the
    policy's gradient must be those of the model's own forward over every position."""
    from peft import get_peft_model

    from rlhf.common import load_causal_lm, lora_config
    from rlhf.reward import load_reward_model

    policy, tok = policy_and_tokenizer
    prompts = [{"messages": [{"role": "user", "content": text}]} for text in ("add 1", "add two to x please")]
    query, query_mask = P.encode_prompts(tok, prompts, "cpu")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    response = torch.tensor([[5, 6, eos, pad], [7, 8, 9, eos]])
    mask = first_eos_mask(response, [eos])[0]
    lora = get_peft_model(load_causal_lm(tiny_base, torch.float32), lora_config("CAUSAL_LM", C))
    M.disable_dropout(lora)  # as train_ppo does: LoRA's dropout would make the two passes differ
    head_apart = M.head_apart
    for name, model in [("reference", policy), ("policy + critic", M.PolicyAndCritic(policy, load_reward_model(tiny_base))),
                        ("LoRA policy", M.PolicyAndCritic(lora))]:
        head = (model.policy if name != "reference" else model).get_output_embeddings()
        rows = []  # what went through the LM head
        hook = head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[:-1]))
        outs, grads = [], []
        for apart in (False, True):  # the model's own forward, then the head on the valid tokens only
            monkeypatch.setattr(M, "head_apart", head_apart if apart else lambda m: None)
            model.zero_grad()
            out = M.response_forward(model, query, query_mask, response, mask, 0.7, entropy=True)
            out.logp.sum().backward()
            outs.append(out)
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        hook.remove()
        assert rows == [(2, 5), (int(mask.sum()),)], (name, rows)  # T + 1 positions of each row, then the n tokens
        full, apart = outs
        torch.testing.assert_close(apart.logp, full.logp, rtol=1e-5, atol=1e-5)
        assert (apart.logp[~mask] == 0).all() and apart.entropy.shape == (int(mask.sum()),)
        torch.testing.assert_close(apart.entropy, full.entropy, rtol=1e-5, atol=1e-5)
        assert (apart.values is None) == (name != "policy + critic") and (full.values is None) == (apart.values is None)
        if apart.values is not None:
            assert apart.values.shape == response.shape
            torch.testing.assert_close(apart.values, full.values)
        assert grads[0] and len(grads[0]) == len(grads[1]), name
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_head_is_called_apart_only_on_a_plain_transformers_model(policy_and_tokenizer, monkeypatch):
    """Anything else (a DeepSpeed engine holding a frozen model, weights sharded by ZeRO-3/FSDP, a
    head that scales its logits) keeps its own forward."""
    policy, _ = policy_and_tokenizer
    assert M.head_apart(policy) is policy
    assert M.head_apart(torch.nn.Sequential(policy)) is None  # a wrapper that is not a transformers model
    monkeypatch.setattr(policy.config, "final_logit_softcapping", 30.0, raising=False)
    assert M.head_apart(policy) is None
    monkeypatch.delattr(policy.config, "final_logit_softcapping", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert M.head_apart(policy) is None


def test_a_batch_of_reward_scores_is_each_conversations_own_score(tiny_base):
    """score_conversations pads a batch, longest first, and puts the scores back in order: each
    equals the score of its conversation read alone, without padding (a row left unscored or
    scored for another would differ)."""
    from rlhf.common import load_tokenizer
    from rlhf.reward import conversation_ids, load_reward_model, score_conversations

    rm, tok = load_reward_model(tiny_base), load_tokenizer(tiny_base)
    convs = [[{"role": "user", "content": "add " * n}, {"role": "assistant", "content": "x + 1"}] for n in (1, 7, 3, 12, 5)]
    with torch.no_grad():
        alone = torch.stack([rm(input_ids=torch.tensor([conversation_ids(tok, c)])).logits[0, 0] for c in convs])
    assert len(set(alone.tolist())) == len(convs), alone  # distinct: a mix-up cannot hide
    torch.testing.assert_close(score_conversations(rm, tok, convs, batch_size=2), alone, rtol=1e-4, atol=1e-5)
