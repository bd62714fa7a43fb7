"""The trainer end to end on the tiny config: learning, accumulation, balancing, non-finite
steps, checkpoints (SIGTERM, SIGKILL-and-resume, corruption) and invalid settings."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from dsv3_jax.train import loop as train_loop
from dsv3_jax.train import optim
from dsv3_jax.train.data import DataSpec, TokenData
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One small shape for every run here, so the compiled step is shared (persistent cache).
FAST = dict(batch_size=4, seq_len=64, log_every=1, eval_every=1000, eval_batches=1,
            checkpoint_every=4, keep_checkpoints=3)


def config(**overrides):
    c = tiny.get_config()
    for key, value in {**FAST, **overrides}.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def spec_of(cfg):
    """The run spec a run of `cfg` on this machine builds (validated)."""
    return RunSpec.from_config(cfg, devices=jax.device_count(), backend=jax.default_backend())


def losses(workdir):
    """step -> loss; a resumed run moves the records it logs again aside, so each step is in
    metrics.jsonl once."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                assert record["step"] not in out, f"step {record['step']} logged twice"
                out[record["step"]] = record["loss"]
    return out


def batch_from(cfg, seed=0):
    data = TokenData(
        DataSpec("text", "", "text", "bytes", cfg.seq_len, 50), 320)
    return next(iter(data.dataset("train", cfg.batch_size, seed)))


def test_loss_falls_on_the_default_corpus(tmp_path):
    cfg = config(steps=60, log_every=10, eval_every=60, eval_batches=2,
                 **{"optimizer.schedule": (("linear", 10, 3e-3), ("constant", 50, 3e-3))})
    last = train_loop.run(cfg, str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    first_ce = next(r["ce_loss"] for r in records if "ce_loss" in r)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    # Uniform guessing over 320 tokens costs ln(320) = 5.77 nats; bytes of Python source are
    # far more predictable, and 60 steps must show it clearly.
    assert first_ce > 4.5 and last["ce_loss"] < first_ce - 1.5
    assert evals and evals[-1] < 3.8
    assert last["tokens_per_sec"] > 0 and len(last["expert_load_max_over_mean"]) == 3


# The tiny config warms up from a learning rate of 0: a one-step comparison of parameters needs
# a schedule whose first step moves them, and an Adam epsilon that keeps that first update
# smooth in the gradient (with eps -> 0 it is lr * sign(g), which rounding noise flips where
# g is near 0).
MOVING = {"optimizer.schedule": (("constant", 1, 1e-3),), "optimizer.eps": 1e-4}


def test_gradient_accumulation_equals_the_large_batch():
    cfg = config(**MOVING)
    model = spec_of(cfg).model
    batch = batch_from(cfg)
    results = []
    for m in (1, 2):
        cfg.microbatches = m
        trainer = Trainer(model, spec_of(cfg).hyper)
        state = trainer.init_state(jax.random.key(0))
        init = jax.device_get(state.params)
        state, metrics = trainer.train_step(state, batch)
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (s1, m1), (s2, m2) = results
    moved = [float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(s1.params), jax.tree.leaves(init), strict=True)]
    # Every weight moved (the largest by about the learning rate), so the comparison below
    # means something.
    assert min(moved) > 0 and max(moved) > 5e-4
    # fp32 sums in another order: relative 1e-5 on the loss, 1e-4 on weights after one step.
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s1.router_bias), jax.tree.leaves(s2.router_bias),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_updates_bias_by_the_rule_and_skips_non_finite_steps():
    cfg = config(inject_nonfinite_steps=(1,), **MOVING)
    trainer = Trainer(spec_of(cfg).model, spec_of(cfg).hyper)
    state = trainer.init_state(jax.random.key(0))
    # The bias has no optimizer state: AdamW's moments mirror the params tree only.
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.params)
    batch = batch_from(cfg)
    s1, _ = trainer.train_step(state, batch)
    s1 = jax.device_get(s1)
    gamma = 1e-2  # configs/tiny.py bias rate
    for b in jax.tree.leaves(s1.router_bias):
        assert set(np.unique(np.round(np.abs(b) / gamma, 3))) <= {0.0, 1.0}
        assert np.abs(b).max() > 0
    s2, m2 = trainer.train_step(jax.device_put(s1), batch_from(cfg, seed=1))  # poisoned
    s2 = jax.device_get(s2)
    assert not bool(m2["finite"]) and int(s2.nonfinite) == 1 and int(s2.step) == 2
    for a, b in zip(jax.tree.leaves((s1.params, s1.router_bias, s1.opt_state)),
                    jax.tree.leaves((s2.params, s2.router_bias, s2.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    s3, m3 = trainer.train_step(jax.device_put(s2), batch_from(cfg, seed=2))
    assert bool(m3["finite"]) and int(s3.nonfinite) == 0


def test_repeated_non_finite_steps_stop_the_run_with_good_checkpoints(tmp_path, capsys):
    cfg = config(steps=20, inject_nonfinite_steps=(5, 6, 7), checkpoint_every=4)
    with pytest.raises(train_loop.NonFiniteError, match="3 consecutive non-finite steps"):
        train_loop.run(cfg, str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "step 6: non-finite loss" in out and "step 8: non-finite" in out
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [4]  # saved before the streak; step 8 was never saved
    # The run can restart from it (the fault injection off).
    train_loop.run(config(steps=6), str(tmp_path), progress=False)
    resumed = losses(tmp_path)
    assert np.isfinite(resumed[5]) and np.isfinite(resumed[6])


def _start(workdir, steps, *extra):
    args = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
            f"--workdir={workdir}", f"--config.steps={steps}"]
    args += [f"--config.{k}={v}" for k, v in FAST.items()] + list(extra)
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(proc, workdir, step, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()[-3000:]}")
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(
                losses(workdir), default=0) >= step:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("trainer too slow")


def test_sigkill_and_resume_gives_the_same_losses_and_sigterm_saves(tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    train_loop.run(config(steps=steps), str(reference), progress=False)
    want = losses(reference)

    killed = tmp_path / "killed"
    proc = _start(killed, steps)
    _wait_for_step(proc, killed, 10)  # past the checkpoint at 8, before the one at 12
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = _start(killed, steps)
    _wait_for_step(proc, killed, 13)
    proc.send_signal(signal.SIGTERM)  # saves wherever it is, checkpoint step or not
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    saved = int(re.search(r"stopped by SIGTERM: checkpoint saved at step (\d+)", output)[1])
    assert 13 <= saved < steps
    assert saved in {int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()}
    proc = _start(killed, steps)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    got = losses(killed)
    assert sorted(got) == sorted(want)
    # Same compiled program, same inputs: XLA on CPU is deterministic, so exactly equal.
    for step in sorted(want):
        assert got[step] == want[step], (step, got[step], want[step])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    train_loop.run(config(steps=12), str(tmp_path), progress=False)
    want = losses(tmp_path)
    ckpt = tmp_path / "checkpoints"
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [4, 8, 12]
    data_dir = ckpt / "12" / "state"
    for root, _, files in os.walk(data_dir):  # damage every array file of step 12
        for name in files:
            if name not in ("_METADATA", "_sharding", "commit_success.txt"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(max(os.path.getsize(os.path.join(root, name)) // 2, 1))
    with caplog.at_level("ERROR"):
        train_loop.run(config(steps=12), str(tmp_path), progress=False)
    assert "checkpoints/12 cannot be used" in caplog.text
    assert any(d.startswith("12.corrupt-") for d in os.listdir(ckpt))  # moved, not deleted
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [4, 8, 12]
    got = losses(tmp_path)
    for step in (9, 10, 11, 12):
        assert got[step] == want[step]


@pytest.mark.parametrize("overrides, message", [
    ({"model.preset": "huge"}, "unknown model preset 'huge'"),
    ({"batch_size": 6, "microbatches": 4}, "batch_size=6 must be divisible by microbatches=4"),
    ({"data.path": "/no/such/corpus"}, "data.path '/no/such/corpus' does not exist"),
    ({"model.vocab_size": 200}, "vocab_size is 200"),
    ({"seq_len": 1024}, "seq_len=1024 exceeds the model's max_seq_len=512"),
    ({"steps": 0}, "steps=0 must be a positive integer"),
    ({"model.n_activated_experts": 40}, "n_activated_experts"),
    ({"data.source": "web"}, "data.source='web'"),
    ({"optimizer.schedule": (("linear", 10, 1e-3), ("cosine", 90, -1e-4))},
     r"optimizer.schedule phase 1 \('cosine', 90, -0.0001\) ends at -0.0001; a learning rate "
     r"must be a finite value >= 0"),
    ({"optimizer.start_lr": -1e-3}, r"optimizer.schedule starts at -0.001 \(start_lr\)"),
    ({"optimizer.schedule": (("linear", 10, 0.0), ("constant", 90, 0.0))},
     "optimizer.schedule never rises above 0"),
    ({"optimizer.schedule": (("linear", 10, float("nan")),)}, "ends at nan"),
])
def test_invalid_settings_are_refused_before_compiling(tmp_path, monkeypatch, overrides,
                                                       message):
    def no_compiling(*args, **kwargs):
        raise AssertionError("a Trainer (and its compiled step) was built for a bad config")

    monkeypatch.setattr(train_loop, "Trainer", no_compiling)
    with pytest.raises(ValueError, match=message):
        train_loop.run(config(**overrides), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # nothing created for a run that cannot start


def test_schedules_may_start_and_end_at_zero():
    # A warmup from 0 and a decay to 0 are what schedules are for; only a peak of 0 is refused.
    optim.check_schedule(0.0, (("linear", 10, 1e-3), ("cosine", 90, 0.0)))
    optim.check_schedule(1e-3, (("constant", 10, 1e-3), ("linear", 10, 0.0)))


def test_matmul_weights_cast_once_give_the_same_loss_and_gradients():
    """The trainer casts the matmul weights to the compute dtype once per step; the loss and the
    fp32 gradients must be those of the model casting them itself at every use."""
    import jax.numpy as jnp

    import dsv3_jax
    from dsv3_jax.model.transformer import cast_matmul_weights
    from dsv3_jax.train import objective

    cfg = dsv3_jax.preset("tiny", dtype="bfloat16")
    variables = dsv3_jax.init(cfg, jax.random.key(0))
    params = variables["params"]
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 1, cfg.vocab_size)
    inputs, seg, targets, masks = objective.targets_and_masks(tokens, jnp.ones_like(tokens), 0)

    def loss(p):
        out = dsv3_jax.forward(cfg, {**variables, "params": p}, inputs, seg, return_hidden=True)
        return objective.cross_entropy_sum(p, out.hidden, targets[0], masks[0])

    def master_grads(p):  # gradients w.r.t. p, in the fp32 of the master weights
        value, grads = jax.value_and_grad(loss)(p)
        return value, jax.tree.map(lambda g, w: g.astype(w.dtype), grads, params)

    cast = cast_matmul_weights(cfg, params)
    kept = sorted(jax.tree_util.keystr(k) for k, w in jax.tree_util.tree_leaves_with_path(cast)
                  if w.dtype == jnp.float32)
    # Only norms, the router, the embedding and the head stay fp32; every projection is cast.
    assert all(re.search(r"\['(scale|router|embed|head)'\]$", k) for k in kept), kept
    assert any(w.dtype == jnp.bfloat16 for w in jax.tree.leaves(cast))
    want_loss, want = jax.jit(master_grads)(params)
    got_loss, got = jax.jit(master_grads)(cast)
    # The same bf16 operations in the same order: equal up to XLA's fusion choices (an fp32
    # rounding or two).
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_eval_is_the_token_weighted_mean_over_held_out_windows_with_padding_masked():
    cfg = config(eval_batches=3)
    trainer = Trainer(spec_of(cfg).model, spec_of(cfg).hyper)
    state = trainer.init_state(jax.random.key(0))
    data = TokenData(
        DataSpec("text", "", "text", "bytes", cfg.seq_len, 50), 320)
    held = data.split_indices("eval")
    windows = [data.window(int(i)) for i in held[:10]]
    data.split_indices = lambda split: held[:10]  # 10 windows: batches of 4, 4 and 2 + padding
    got = train_loop.evaluate(trainer, state, data, cfg.batch_size, cfg.eval_batches)
    # Reference: each window alone (a batch of one, no padding), weighted by its target count.
    one = Trainer(spec_of(cfg).model, spec_of(config(batch_size=1)).hyper)
    sums = np.zeros(2)
    counts = np.zeros(2)
    for w in windows:
        out = one.eval_step(state, {k: v[None] for k, v in w.items()})
        sums += np.asarray(out["ce_sums"], np.float64)
        counts += np.asarray(out["counts"])
    # fp32 sums over a few thousand tokens, in a different grouping: 1e-5 relative.
    np.testing.assert_allclose(got["eval_loss"], sums[0] / counts[0], rtol=1e-5)
    np.testing.assert_allclose(got["eval_mtp_loss"], sums[1] / counts[1], rtol=1e-5)
