"""The training run: build the run spec (`run_spec.RunSpec`), data and state (fresh, resumed or
fine-tuned), train with progress, metrics, evals and checkpoints; stop cleanly on SIGTERM or
repeated non-finite steps.

`run(config, workdir)` is what `python -m launch.train` calls; the notebook calls it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from dsv3_jax.checkpoints import load_variables
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import api, flops
from dsv3_jax.parallel import sharding
from dsv3_jax.train import workdir as workdirs
from dsv3_jax.train.checkpointer import Checkpointer
from dsv3_jax.train.data import TokenData
from dsv3_jax.train.run_spec import MeshSpec, RunSpec
from dsv3_jax.train.step import Trainer

log = logging.getLogger("dsv3_jax.train")


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


def parallel_layout(mesh: MeshSpec, devices=None) -> sharding.Parallel | None:
    """The mesh of this run over `devices` (default: the real devices, and None on a single
    device; given devices, compile-only ones for a TPU target, always a layout, so every array
    is placed on them)."""
    if devices is None and mesh.devices == 1:
        return None
    pipe = mesh.pipeline
    return sharding.Parallel(
        sharding.make_mesh(*mesh.shape, devices=devices), fsdp=mesh.fsdp,
        capacity_factor=mesh.capacity_factor, pipeline=pipe,
        batch_axes=sharding.MESH_AXES if pipe else sharding.BATCH_AXES)


def pipeline_note(parallel) -> str:
    if parallel is None or parallel.pipeline is None:
        return ""
    p = parallel.pipeline
    return (f", {p.schedule} pipeline of {p.stages} stages x {p.microbatches} microbatches "
            f"(bubble {p.bubble_fraction():.1%})")


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step, appended) and TensorBoard events."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self.tb = None

    @classmethod
    def continuing(cls, workdir: str, start: int) -> MetricsWriter:
        """The writer of a run starting at `start`: records an earlier attempt logged past it
        move to metrics.superseded.jsonl first, so each step is in metrics.jsonl once."""
        if jax.process_index() == 0:
            moved = workdirs.supersede_metrics(workdir, start)
            if moved:
                say(f"{moved} metrics records past step {start} (logged after the checkpoint "
                    f"this run starts from) moved to {workdirs.SUPERSEDED}")
        writer = cls(workdir)
        if start > 0:
            writer.write({"step": start, "event": "resumed"})
        return writer

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def to_host(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(tree))


def run(cfg: config_dict.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Train until cfg.steps; resume from the latest good checkpoint in workdir. Returns the
    last logged metrics. Everything about the config, the workdir and the data is checked
    before the workdir is created, and the workdir is held by this run alone."""
    spec = RunSpec.from_config(cfg, devices=jax.device_count(), backend=jax.default_backend(),
                               processes=jax.process_count())
    if spec.run.init_from and not os.path.isdir(spec.run.init_from):
        raise ValueError(f"config: init_from={spec.run.init_from!r} is not a directory")
    workdirs.check_writable(workdir)
    data = TokenData(spec.data, spec.model.vocab_size)
    os.makedirs(workdir, exist_ok=True)
    lock = workdirs.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _train(spec, workdir, data, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(spec: RunSpec, workdir: str, data: TokenData, progress: bool) -> dict[str, Any]:
    began = time.perf_counter()
    processes, process = jax.process_count(), jax.process_index()
    model, hyper, run = spec.model, spec.hyper, spec.run
    parallel = parallel_layout(spec.mesh)
    trainer = Trainer(model, hyper, parallel)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
    meta = {"model": dataclasses.asdict(model), "config": spec.config,
            "tokenizer": data.tokenizer.to_json() if data.tokenizer else None}
    if process == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)

    per_process = hyper.batch_size // processes
    train_iter = iter(data.dataset("train", per_process, run.seed, process, processes))
    start, state = starting_state(trainer, checkpoints, train_iter, run)
    say_start_up(trainer, hyper.seq_len, parallel, start, run.steps)
    writer = MetricsWriter.continuing(workdir, start)
    preemption = Preemption(processes)
    bar = None
    if progress and process == 0:
        from tqdm import tqdm

        bar = tqdm(total=run.steps, initial=start, unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)

    rate = Throughput(model, hyper)
    last: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    pending = None  # the previous step's metrics: checked one step late to keep dispatch async

    def save(step):
        checkpoints.save(step, state, train_iter.get_state(), meta)

    try:
        for step in range(start + 1, run.steps + 1):
            state, metrics = trainer.train_step(state, trainer.place_batch(next(train_iter)))
            logged = step % run.log_every == 0 or step == run.steps
            rate.stepped(logged)
            if pending is not None:
                check_finite(*pending, run.max_nonfinite_steps, checkpoints)
            pending = (step, metrics)
            if logged:
                check_finite(*pending, run.max_nonfinite_steps, checkpoints)
                pending = None
                host = to_host(metrics)
                last = rate.record(step, host)
                writer.write(last)
                if bar is not None:
                    bar.set_postfix(progress_fields(host, last["tokens_per_sec"],
                                                    model.mtp_depth))
            if step % run.eval_every == 0 or step == run.steps:
                last_eval = {"step": step, **evaluate(trainer, state, data, hyper.batch_size,
                                                      run.eval_batches)}
                writer.write(last_eval)
                rate.restart()
            if step % run.checkpoint_every == 0 or step == run.steps:
                save(step)
            if bar is not None:
                bar.update(1)
            if preemption.reached(step):
                if pending is not None:
                    check_finite(*pending, run.max_nonfinite_steps, checkpoints)
                if step % run.checkpoint_every and step != run.steps:
                    save(step)
                log.warning("SIGTERM: saved a checkpoint at step %d; exiting", step)
                say(f"stopped by SIGTERM: checkpoint saved at step {step}")
                break
        checkpoints.wait()
        say(summary(last, last_eval, checkpoints, time.perf_counter() - began))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        checkpoints.close()
        preemption.close()
    return last


def starting_state(trainer: Trainer, checkpoints: Checkpointer, train_iter, run):
    """(start step, state): the latest good checkpoint (and the data iterator's position), else
    a fresh state (from run.init_from's weights when given); refuses a silent restart of a run
    whose every checkpoint was unusable."""
    restored = checkpoints.restore_latest(trainer.abstract_state())
    if restored is not None:
        start, state, data_state, _ = restored
        train_iter.set_state(data_state)
        log.info("resumed from %s/%d", checkpoints.directory, start)
        return start, state
    unusable = checkpoints.set_aside or checkpoints.unusable_on_disk()
    if unusable and not run.allow_fresh_start:
        raise ValueError(
            f"no checkpoint in {checkpoints.directory} can be restored: "
            f"{', '.join(os.path.basename(u) for u in unusable)} were set aside as unusable "
            f"(renamed, not deleted); starting again from step 0 would replace this run. "
            f"Pass --config.allow_fresh_start=True to start over in this workdir, or use "
            f"another --workdir")
    state = trainer.init_state(jax.random.key(run.seed))
    if run.init_from:
        # Restored straight into this run's shardings: no process holds the whole model.
        abstract = trainer.abstract_state()
        variables, _ = load_variables(
            run.init_from, {"params": abstract.params, "router_bias": abstract.router_bias})
        state = trainer.state_from_variables(variables)
        log.info("initialized params and router bias from %s", run.init_from)
    return 0, state


def say_start_up(trainer: Trainer, seq_len: int, parallel, start: int, steps: int) -> None:
    """The two start-up lines: the model, the devices and mesh, the steps; what runs."""
    model = trainer.model
    counts = api.param_counts(model)
    flops_per_token = flops.train_flops_per_token(model, seq_len)
    say(f"dsv3-jax: {counts['main'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M "
        f"active per token), MTP {counts['mtp'] / 1e6:.1f}M as released; "
        f"{flops_per_token / 1e6:.1f} MFLOPs per trained token; {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}"
        f"{'' if parallel is None else f' as mesh {dict(parallel.mesh.shape)}'}"
        f"{pipeline_note(parallel)}; "
        f"steps {start} -> {steps}")
    say(f"kernels on {jax.default_backend()}: {trainer.implementations.describe()}")


class Throughput:
    """Tokens/s (and MFU where the device's peak is known) over the steps since the last
    record, and the record of a logged step. The first step's compile is left out: the window
    starts when the first step has been dispatched (unless that step is itself logged)."""

    def __init__(self, model: ModelConfig, hyper):
        self.hyper = hyper
        self.flops_per_token = flops.train_flops_per_token(model, hyper.seq_len)
        self.peak = flops.device_peak_flops()
        self.compiled = False
        self.restart()

    def stepped(self, logged: bool) -> None:
        """Count a dispatched step; after the first (which compiled), start the window again."""
        if self.compiled or logged:
            self.steps += 1
        else:
            self.restart()
        self.compiled = True

    def restart(self) -> None:
        """Leave what ran since (an eval) out of the next rate."""
        self.since, self.steps = time.perf_counter(), 0

    def record(self, step: int, host: dict) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.since
        tokens = self.hyper.batch_size * self.hyper.seq_len
        tokens_per_sec = self.steps * tokens / elapsed
        record = {"step": step, **{k: v for k, v in host.items() if k != "expert_load"},
                  "expert_load_max_over_mean": host["expert_load"]["max_over_mean"],
                  "bias_spread": host["expert_load"]["bias_spread"],
                  "tokens_seen": step * tokens, "tokens_per_sec": tokens_per_sec,
                  "step_time": elapsed / self.steps}
        if self.peak:
            record["mfu"] = (tokens_per_sec * self.flops_per_token
                             / (self.peak * jax.device_count()))
        self.restart()
        return record


class Preemption:
    """SIGTERM as a stop request. One process: our own flag (the previous handler is put back
    on close). Several: JAX's preemption sync point, so every process stops (and saves) at the
    same step."""

    def __init__(self, processes: int):
        self.processes, self.signal = processes, None
        self.previous = (signal.signal(signal.SIGTERM, self._on_sigterm) if processes == 1
                         else None)

    def _on_sigterm(self, signum, _frame):
        self.signal = signum

    def reached(self, step: int) -> bool:
        if self.processes == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def progress_fields(host: dict, tokens_per_sec: float, mtp_depth: int) -> dict[str, str]:
    """The progress bar's fields: the cross-entropies (as the plots show them), not the total
    objective (which adds the weighted MTP and balance terms)."""
    fields = {"ce": f"{host['ce_loss']:.3f}"}
    if mtp_depth:
        fields["mtp"] = f"{host['mtp_loss']:.3f}"
    return {**fields, "tok/s": f"{tokens_per_sec:,.0f}"}


def summary(last: dict, last_eval: dict, checkpoints: Checkpointer, seconds: float) -> str:
    """The end-of-run lines: final cross-entropy and eval loss, tokens seen, wall time, and the
    latest checkpoint."""
    if not last:
        return "no step was run (the run had already reached config.steps)"
    lines = [f"done: step {last['step']}, train cross-entropy {last['ce_loss']:.4f}"
             + (f" (MTP {last['mtp_loss']:.4f})" if last.get("mtp_loss") else "")
             + (f", eval loss {last_eval['eval_loss']:.4f} at step {last_eval['step']}"
                if last_eval else "")]
    steps = checkpoints.steps()
    lines.append(f"  {last['tokens_seen']:,} tokens seen; wall time "
                 f"{time.strftime('%H:%M:%S', time.gmtime(seconds))}; latest checkpoint "
                 f"{os.path.join(checkpoints.directory, str(steps[-1])) if steps else 'none'}")
    return "\n".join(lines)


def say(message: str) -> None:
    """Print once per job (process 0)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def check_finite(step: int, metrics: dict, max_in_a_row: int, checkpoints) -> None:
    finite = bool(jax.device_get(metrics["finite"]))
    if finite:
        return
    in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    say(f"step {step}: non-finite loss {loss} / gradient norm {grad_norm}; update skipped "
        f"({in_a_row} in a row)")
    if in_a_row >= max_in_a_row:
        checkpoints.wait()
        good = checkpoints.steps()
        raise NonFiniteError(
            f"stopping at step {step}: {in_a_row} consecutive non-finite steps "
            f"(objective.max_nonfinite_steps={max_in_a_row}); the last good checkpoint is "
            f"{good[-1] if good else 'none'} in {checkpoints.directory}")


def evaluate(trainer: Trainer, state, data: TokenData, batch_size: int,
             max_batches: int) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the held-out windows (each once, at most
    max_batches batches of batch_size), for the main head and averaged over MTP depths."""
    processes, process = jax.process_count(), jax.process_index()
    sums = counts = 0.0
    for batch in data.eval_batches(batch_size // processes, max_batches, process,
                                   processes):
        out = jax.device_get(trainer.eval_step(state, trainer.place_batch(batch)))
        sums, counts = sums + np.asarray(out["ce_sums"], np.float64), counts + out["counts"]
    per_depth = sums / np.maximum(counts, 1.0)
    return {"eval_loss": float(per_depth[0]),
            "eval_mtp_loss": float(per_depth[1:].mean()) if len(per_depth) > 1 else 0.0}
