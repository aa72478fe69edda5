"""The wiring of train_ppo.py's main(): what one run on the tiny models logs and trains on, checked
against a recomputation from the rollouts it recorded. The math itself is tested in
tests/test_ppo_math.py; here, whether main() hands each piece the right arguments. One run in
this process, recorded by wrapping the loop's own functions (update, optimizer_step,
length_grouped_order): nothing in the loop exists for the test."""

import contextlib
import io
import json
import types

import pytest
import torch

from conftest import in_process_runner, ppo_args, toy_tasks, write_jsonl

STEPS, EPOCHS, BATCH, MINI_BATCH, GROUP, LR, KL_COEF = 2, 2, 8, 4, 4, 1e-2, 0.05


@pytest.fixture(scope="module")
def recorded(ppo_inputs, tmp_path_factory):
    """A 2-iteration run, grpo (the default estimator), on prompts half of which have unit tests
    (the tiny model fails them all: those groups must not train) and half not (scored by the
    reward model: they train). Returns the run's history and, per iteration, the Rollout and
    normalizers update() got, each optimizer step's learning rates and loss, and each epoch's order."""
    import train_ppo

    out = tmp_path_factory.mktemp("wiring")
    tested = [{**t, "prompt": [{"role": "user", "content": t["prompt"]}]} for t in toy_tasks(4)]
    plain = [{"prompt": f"Say something about the number {k}."} for k in range(4)]
    prompts = write_jsonl(out / "prompts.jsonl", tested + plain)
    rec = types.SimpleNamespace(updates=[], steps=[], orders=[])

    def update(s, roll, normalizers, step, **kw):
        rec.updates.append((roll, normalizers))
        return original["update"](s, roll, normalizers, step, **kw)

    def optimizer_step(accelerator, model, optimizer, scheduler, loss, max_grad_norm):
        rec.steps.append(([g["lr"] for g in optimizer.param_groups], loss.item()))
        return original["optimizer_step"](accelerator, model, optimizer, scheduler, loss, max_grad_norm)

    def length_grouped_order(*args, **kw):
        rec.orders.append(original["length_grouped_order"](*args, **kw))
        return rec.orders[-1]

    original = {f.__name__: getattr(train_ppo, f.__name__) for f in (update, optimizer_step, length_grouped_order)}
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        for f in (update, optimizer_step, length_grouped_order):
            mp.setattr(train_ppo, f.__name__, f)
        run = in_process_runner(mp, lambda: types.SimpleNamespace(out=stdout.getvalue(), err=stderr.getvalue()))
        proc = run("train_ppo.py", *ppo_args(
            ppo_inputs, out, f"--PPO_PROMPTS_FILE={prompts}", f"--PPO_STEPS={STEPS}", f"--PPO_EPOCHS={EPOCHS}",
            f"--PPO_BATCH_SIZE={BATCH}", f"--PPO_MINI_BATCH_SIZE={MINI_BATCH}", f"--PPO_SAMPLES_PER_PROMPT={GROUP}",
            f"--PPO_LR={LR}", f"--PPO_KL_COEF={KL_COEF}", "--PPO_KL_TARGET=0", "--PPO_KL_ESTIMATOR=k1",
            "--PPO_ADVANTAGE=grpo", "--PPO_KL_LOSS=false", "--PPO_LOSS_NORM=batch", "--PPO_SIL_COEF=0",
            "--PPO_OVERSAMPLE=1", "--PPO_PENALIZE_MISSING_EOS=false", "--PRECISION=fp32", "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec.history = [h for h in json.load(open(out / "ppo_model" / "rlhf_stage.json"))["metrics"]["history"] if "kl" in h]
    assert len(rec.updates) == len(rec.history) == STEPS and len(rec.steps) == STEPS * EPOCHS * BATCH // MINI_BATCH
    return rec


def test_learning_rate_of_every_update_decays_linearly_to_zero_over_the_run(recorded):
    """From PPO_LR at the first update, linearly, to PPO_LR / n at the last of the run's n updates
    (a schedule whose length misses a factor reaches 0 early); the rate logged for an iteration
    is the one its last update used."""
    n = STEPS * EPOCHS * BATCH // MINI_BATCH
    lrs = [rates[0] for rates, _ in recorded.steps]  # the policy's group
    assert lrs == pytest.approx([LR * (n - k) / n for k in range(n)], rel=1e-9)
    assert lrs[0] == LR and lrs[n // 2] == pytest.approx(LR / 2)
    assert [h["lr"] for h in recorded.history] == pytest.approx(lrs[n // STEPS - 1::n // STEPS], rel=1e-9)


def test_logged_kl_is_the_summed_estimator_of_the_policy_against_the_reference(recorded):
    """ppo/kl of an iteration = the mean over its answers of the summed per-token k1 = logp - ref_logp,
    from the logprobs the rollout recorded (the answers are the policy's samples, so k1 with the
    arguments swapped is as large the other way). The policy has moved by the second iteration."""
    for (roll, _), h in zip(recorded.updates, recorded.history):
        k1 = torch.where(roll.mask, roll.old_logp - roll.ref_logp, 0.0).sum(1)  # (B,)
        assert h["kl"] == pytest.approx(k1.mean().item(), rel=1e-5, abs=1e-9)
        assert h["non_score_reward"] == pytest.approx(-KL_COEF * k1.mean().item(), rel=1e-5, abs=1e-9)
        assert torch.equal(roll.kl, torch.where(roll.mask, roll.old_logp - roll.ref_logp, 0.0))
    assert abs(recorded.history[-1]["kl"]) > 1e-3, recorded.history


def test_rows_that_train_are_the_groups_without_tests_or_with_mixed_results(recorded):
    """Groups of PPO_SAMPLES_PER_PROMPT answers in a row: a group whose unit tests all agree (the
    tiny model fails every one) gets advantage 0; a group without tests (the reward model's) trains."""
    for roll, _ in recorded.updates:
        groups = roll.passed.reshape(-1, GROUP)
        untested = groups.isnan().all(1)
        mixed = (groups.amax(1) > groups.amin(1)) & ~groups.isnan().any(1)
        assert torch.equal(roll.trains_policy, (untested | mixed).repeat_interleave(GROUP))
        assert not roll.advantages[~roll.trains_policy].any()
    trains = torch.cat([roll.trains_policy for roll, _ in recorded.updates])
    assert trains.any() and not trains.all(), trains  # both kinds of rows were drawn


def test_advantages_and_first_loss_equal_a_recomputation_from_the_rollout(recorded):
    """grpo: each answer's score minus KL_COEF x its summed KL, against its group (mean, unbiased
    std + 1e-4), on each of its tokens; 0 for rows that do not train. The first mini-batch's loss,
    where the policy is still the one that sampled (ratio 1): -(sum of its advantages) / (the
    batch's trained tokens / mini-batches per epoch), PPO_LOSS_NORM=batch."""
    for roll, normalizers in recorded.updates:
        sequence = (roll.score - KL_COEF * torch.where(roll.mask, roll.old_logp - roll.ref_logp, 0.0).sum(1))
        r = sequence.reshape(-1, GROUP)
        per_row = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()  # (B,)
        live = roll.mask & roll.trains_policy.unsqueeze(1)
        expected = torch.where(live, per_row.unsqueeze(1), 0.0)
        torch.testing.assert_close(roll.advantages, expected.expand_as(roll.advantages), rtol=1e-5, atol=1e-6)
        assert normalizers["policy"] == pytest.approx(max(1.0, live.sum().item() / (BATCH // MINI_BATCH)))

    roll, normalizers = recorded.updates[0]
    rows = recorded.orders[0][:MINI_BATCH]  # the first mini-batch of the first epoch
    live = roll.mask & roll.trains_policy.unsqueeze(1)
    expected = -torch.where(live, roll.advantages, 0.0)[rows].sum().item() / max(1.0, live.sum().item() / (BATCH // MINI_BATCH))
    scale = roll.advantages[rows].abs().sum().item() / normalizers["policy"]
    assert scale > 0, "the first mini-batch holds no row that trains: no loss to check"
    assert recorded.steps[0][1] == pytest.approx(expected, abs=1e-3 * scale)
