"""Rollouts for GRPO on the tiny config: the log-probabilities `generate` records while sampling
(temperature, top-p, EOS) equal the training forward pass's for the same tokens, so the first
inner update's ratio is 1; rewards that fail are reported, counted and given no advantage.

The model is random (init_std 0.2, so the distributions are far from uniform and a wrong
position or temperature would show)."""

import collections

import jax
import numpy as np
import pytest

from configs import base
from dsv3_jax.infer.generate import generate
from dsv3_jax.rl import loop as grpo_loop
from dsv3_jax.rl import rewards
from dsv3_jax.rl import step as rl_step
from dsv3_jax.rl.spec import GRPOSpec
from dsv3_jax.tokenizer import ByteTokenizer
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer

RECORDS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "a longer prompt:", "answer": "x"}]
# The absorbed decode form and the expanded training form of MLA round differently in float32;
# measured gap ~1e-5 on log-probs of size ~3.
LOGP_TOL = 1e-4


def make(microbatches=1, inject_nonfinite_steps=(), bias_rate=None, lr=None, **grpo):
    cfg = base.get_config()
    if lr is not None:
        cfg.optimizer.schedule = (("constant", 10, lr),)
    cfg.model.init_std = 0.2
    cfg.batch_size, cfg.seq_len, cfg.microbatches = 8, 32, microbatches
    cfg.inject_nonfinite_steps = inject_nonfinite_steps
    if bias_rate is not None:
        cfg.objective.bias_rate = ((0, bias_rate),)
    cfg.grpo.group_size, cfg.grpo.max_new_tokens = 4, 12
    cfg.grpo.temperature, cfg.grpo.top_p = 0.7, 0.9
    for k, v in grpo.items():
        cfg.grpo[k] = v
    spec = RunSpec.from_config(cfg, devices=1, backend="cpu")
    trainer = Trainer(spec.model, spec.hyper)
    return trainer, GRPOSpec.from_config(cfg, spec.model)


class EosTokenizer(ByteTokenizer):
    """Bytes, with an EOS the random model actually says (so some samples stop early)."""

    def __init__(self, eos_id):
        self.eos_id = eos_id


@pytest.fixture(scope="module")
def setup():
    trainer, spec = make()
    state = trainer.init_state(jax.random.key(0))
    variables = {"params": state.params, "router_bias": state.router_bias}
    free = generate(trainer.model, variables, [[256, 49, 43, 50, 61]] * 8, max_new_tokens=12,
                    temperature=0.7, top_p=0.9, seed=5)
    common = collections.Counter(t for seq in free.tokens for t in seq[2:]).most_common(1)
    tokenizer = EosTokenizer(common[0][0])
    ro = rl_step.rollout(trainer, state, spec, tokenizer, RECORDS, seed=5)
    return trainer, spec, state, tokenizer, ro


def test_recorded_logprobs_equal_the_training_forward(setup):
    trainer, spec, state, _, ro = setup
    assert np.sum(ro.response_lengths < spec.max_new_tokens) > 0  # some stopped at EOS
    updater = rl_step.Updater(trainer, spec)
    placed = updater.place(ro.batch)
    logp = np.asarray(updater.logprobs(state.params, state.router_bias, placed["tokens"],
                                       placed["segment_ids"]))
    mask = ro.batch["mask"] > 0
    assert mask.sum() == ro.response_lengths.sum()  # EOS included, every response token once
    np.testing.assert_allclose(logp[mask], ro.batch["old_logp"][mask], atol=LOGP_TOL)
    # At the wrong temperature they would differ by far more than the tolerance.
    assert np.abs(ro.batch["old_logp"][mask]).mean() > 100 * LOGP_TOL


def test_greedy_logprobs_are_at_temperature_one_and_speculative_ones_agree(setup):
    trainer, _, state, _, _ = setup
    variables = {"params": state.params, "router_bias": state.router_bias}
    prompts = [[256, 49, 43, 50, 61], [256, 97, 98]]
    plain = generate(trainer.model, variables, prompts, max_new_tokens=6)
    spec_out = generate(trainer.model, variables, prompts, max_new_tokens=6,
                        speculative="mtp")
    assert plain.tokens == spec_out.tokens
    for a, b in zip(plain.logprobs, spec_out.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=LOGP_TOL)
    _, spec = make(temperature=1.0)
    updater = rl_step.Updater(trainer, spec)
    for prompt, new, logps in zip(prompts, plain.tokens, plain.logprobs, strict=True):
        seq = np.zeros((1, 32), np.int32)
        seq[0, :len(prompt) + len(new)] = prompt + new
        seg = (np.arange(32) < len(prompt) + len(new)).astype(np.int32)[None]
        logp = np.asarray(updater.logprobs(state.params, state.router_bias, seq, seg))[0]
        np.testing.assert_allclose(logp[len(prompt) - 1:len(prompt) - 1 + len(new)], logps,
                                   atol=LOGP_TOL)


def test_the_first_inner_update_has_ratio_one(setup):
    trainer, spec, state, _, ro = setup
    updater = rl_step.Updater(trainer, spec)
    ro.batch["advantages"] = np.linspace(-1, 1, len(ro.records)).astype(np.float32)
    state = jax.tree.map(lambda x: x.copy(), state)  # the update donates its state
    placed = updater.place(ro.batch)
    placed["ref_logp"] = updater.logprobs(state.params, state.router_bias, placed["tokens"],
                                          placed["segment_ids"])
    new_state, metrics = updater.update(state, placed)
    assert float(metrics["ratio_max_deviation"]) < 10 * LOGP_TOL
    assert float(metrics["clip_fraction"]) == 0
    assert abs(float(metrics["kl"])) < 1e-6  # the reference is the policy itself
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    assert int(new_state.step) == 1
    # The router bias is frozen during RL by default.
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new_state.router_bias), jax.tree.leaves(setup[2].router_bias),
        strict=True))


def test_a_failing_reward_is_reported_counted_and_gets_no_advantage(setup, caplog):
    trainer, _, state, tokenizer, _ = setup
    calls = []

    def flaky(record, completion):
        calls.append(completion)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return float("nan") if len(calls) == 5 else float(len(completion))

    spec = make()[1]
    spec = spec.__class__(**{**spec.__dict__, "rewards": (rewards.Reward("flaky", flaky, 1.0),)})
    with caplog.at_level("WARNING", logger="dsv3_jax.rl"):
        ro = rl_step.rollout(trainer, state, spec, tokenizer, RECORDS, seed=5)
    reports = [r.getMessage() for r in caplog.records]
    assert ro.scored.failures == 2 and len(reports) == 2
    assert "RuntimeError: boom" in reports[0] and repr(ro.completions[1]) in reports[0]
    assert "returned nan" in reports[1]
    for n in (1, 4):
        assert ro.batch["advantages"][n] == 0 and ro.batch["mask"][n].sum() == 0
    assert ro.batch["mask"][0].sum() == ro.response_lengths[0]


def test_router_bias_mtp_and_recomputed_old_logprobs_options(setup):
    _, _, state, tokenizer, _ = setup

    def one_step(**options):
        trainer_, spec = make(**options)
        fresh = jax.tree.map(lambda x: x.copy(), state)
        ro = rl_step.rollout(trainer_, fresh, spec, tokenizer, RECORDS, seed=5)
        return grpo_loop.rl_update(rl_step.Updater(trainer_, spec), fresh, ro, None)

    frozen, plain = one_step()
    moved, _ = one_step(update_router_bias=True)
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(frozen.router_bias), jax.tree.leaves(state.router_bias), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(moved.router_bias), jax.tree.leaves(state.router_bias), strict=True))
    _, with_mtp = one_step(mtp_weight=0.3)
    assert "mtp_loss" not in plain.metrics and with_mtp.metrics["mtp_loss"] > 1.0
    np.testing.assert_allclose(with_mtp.metrics["loss"], with_mtp.metrics["policy_loss"]
                               + 0.3 * with_mtp.metrics["mtp_loss"], rtol=1e-5)
    # Old log-probs from the training forward pass: the same program's rounding, ratio 1.
    _, recomputed = one_step(recompute_old_logprobs=True)
    assert recomputed.metrics["ratio_max_deviation"] < 1e-6


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_microbatches_give_the_whole_batch_update(setup, aggregation):
    """Both aggregations (the sequence count, per-sequence's normalizer, is one a piece cannot
    know alone), a failed sample (no loss tokens, in one piece only), the MTP loss, KL and the
    bias rule on."""
    _, _, state, tokenizer, _ = setup
    results = []
    for microbatches in (1, 2):
        trainer, spec = make(microbatches, aggregation=aggregation, mtp_weight=0.3,
                             update_router_bias=True)
        fresh = jax.tree.map(lambda x: x.copy(), state)
        ro = rl_step.rollout(trainer, fresh, spec, tokenizer, RECORDS, seed=5)
        ro.batch["advantages"] = np.linspace(-1, 1, len(ro.records)).astype(np.float32)
        # Sample 1 (piece 1 of 2) failed its reward: as rollout lays it out, no advantage and
        # no loss tokens.
        ro.batch["advantages"][1], ro.batch["mask"][1] = 0.0, 0.0
        updater = rl_step.Updater(trainer, spec)
        placed = updater.place(ro.batch)
        placed["ref_logp"] = placed["old_logp"] - 0.1
        results.append(updater.update(fresh, placed))
    (one, m1), (two, m2) = results
    # The same sums in another order (fp32): relative 1e-5, and 1e-6 absolute for the policy
    # loss, which cancels to ~1e-4 from terms of size ~1.
    for key in ("loss", "policy_loss", "mtp_loss", "kl", "entropy", "grad_norm",
                "ratio_max_deviation"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(m1["kl"]) > 0
    for a, b in zip(jax.tree.leaves((two.params, two.router_bias)),
                    jax.tree.leaves((one.params, one.router_bias)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_non_finite_update_is_skipped(setup):
    """Trainer.update's skip, through hyper.inject_nonfinite_steps (the update's loss at step 0
    made NaN): the state keeps its weights, bias and optimizer state, the step still counts."""
    _, _, state, tokenizer, _ = setup
    # A constant learning rate: the base warm-up starts at 0, and a skipped step leaves the
    # optimizer's own step count (which the schedule reads) where it was.
    trainer, spec = make(inject_nonfinite_steps=(0,), update_router_bias=True, lr=1e-3)
    fresh = jax.tree.map(lambda x: x.copy(), state)
    ro = rl_step.rollout(trainer, fresh, spec, tokenizer, RECORDS, seed=5)
    ro.batch["advantages"] = np.linspace(-1, 1, len(ro.records)).astype(np.float32)
    updater = rl_step.Updater(trainer, spec)
    placed = updater.place(ro.batch)
    new_state, metrics = updater.update(fresh, placed)
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    assert int(metrics["nonfinite_in_a_row"]) == 1 and int(new_state.step) == 1
    for a, b in zip(jax.tree.leaves((new_state.params, new_state.router_bias,
                                     new_state.opt_state)),
                    jax.tree.leaves((state.params, state.router_bias,
                                     trainer.init_state(jax.random.key(0)).opt_state)),
                    strict=True):
        assert np.array_equal(a, b)
    # Step 1 is not poisoned: the next update goes through.
    after, metrics = updater.update(new_state, placed)
    assert bool(metrics["finite"]) and int(metrics["nonfinite_in_a_row"]) == 0
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(after.params), jax.tree.leaves(state.params), strict=True))


def test_the_reference_keeps_its_own_router_bias(setup):
    """With update_router_bias the policy's bias moves each step; the reference's log-probs come
    from the starting params and bias, made by the trainer, and stay the same."""
    _, _, state, tokenizer, _ = setup
    trainer, spec = make(update_router_bias=True, bias_rate=0.5, beta=0.04)
    run = RunSpec.from_config(base.get_config(), devices=1, backend="cpu").run
    reference = grpo_loop.reference_variables(trainer, run)  # seed 0: the setup's state
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(
            {"params": state.params, "router_bias": state.router_bias}), strict=True):
        assert np.array_equal(a, b)
    updater = rl_step.Updater(trainer, spec)
    seen = []
    compiled = updater.compiled

    def spying(name, *args):
        fn, seconds = compiled(name, *args)
        if name != "logprobs":
            return fn, seconds

        def recorded(params, router_bias, *rest):
            out = fn(params, router_bias, *rest)
            if params is reference["params"]:
                seen.append((np.asarray(out), router_bias))
            return out
        return recorded, seconds

    updater.compiled = spying
    policy = jax.tree.map(lambda x: x.copy(), state)
    ro = rl_step.rollout(trainer, policy, spec, tokenizer, RECORDS, seed=5)
    for _ in range(2):
        policy, _ = grpo_loop.rl_update(updater, policy, ro, reference)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1][0], seen[0][0])
    # The policy's bias did move, and with it the reference params would give other log-probs.
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(policy.router_bias), jax.tree.leaves(state.router_bias), strict=True))
    placed = updater.place(ro.batch)
    live = np.asarray(updater.logprobs(reference["params"], policy.router_bias,
                                       placed["tokens"], placed["segment_ids"]))
    assert np.abs(live - seen[0][0]).max() > 1e-3
