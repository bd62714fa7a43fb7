"""The training run: validate, build data and state (fresh, resumed or fine-tuned), train with
progress, metrics, evals and checkpoints; stop cleanly on SIGTERM or repeated non-finite steps.

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

from dsv3_jax import config as model_configs
from dsv3_jax.checkpoints import load_variables
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import api, flops, implementations
from dsv3_jax.parallel import pipeline, sharding
from dsv3_jax.train import optim
from dsv3_jax.train import workdir as workdirs
from dsv3_jax.train.checkpointer import Checkpointer
from dsv3_jax.train.data import DataSpec, TokenData
from dsv3_jax.train.step import Hyper, Trainer

log = logging.getLogger("dsv3_jax.train")


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


def model_config(cfg: config_dict.ConfigDict) -> ModelConfig:
    """The preset named by cfg.model.preset with every set field of cfg.model over it."""
    overrides = {k: v for k, v in cfg.model.items() if k != "preset" and v is not None}
    return model_configs.preset(cfg.model.preset, **overrides)


def validate(cfg: config_dict.ConfigDict, model: ModelConfig) -> None:
    """Refuse impossible run settings before anything is compiled."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"config: {msg}")

    for name in ("steps", "batch_size", "microbatches", "seq_len", "checkpoint_every",
                 "keep_checkpoints", "eval_every", "eval_batches", "log_every"):
        need(isinstance(cfg[name], int) and cfg[name] > 0,
             f"{name}={cfg[name]!r} must be a positive integer")
    unit = cfg.microbatches * jax.process_count()
    need(cfg.batch_size % unit == 0,
         f"batch_size={cfg.batch_size} must be divisible by microbatches={cfg.microbatches} x "
         f"processes={jax.process_count()}; e.g. batch_size="
         f"{unit * max(1, cfg.batch_size // unit)}")
    need(cfg.seq_len <= model.max_seq_len,
         f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    need(cfg.data.source in ("text", "tokens", "synthetic"),
         f"data.source={cfg.data.source!r} is not one of text, tokens, synthetic")
    need(cfg.data.eval_period >= 2, f"data.eval_period={cfg.data.eval_period} must be >= 2")
    try:
        optim.check_schedule(cfg.optimizer.start_lr, cfg.optimizer.schedule)
    except ValueError as e:
        need(False, f"optimizer.{e}")
    need(cfg.optimizer.clip_norm > 0, f"optimizer.clip_norm={cfg.optimizer.clip_norm} must be > 0")
    need(0 <= cfg.optimizer.b1 < 1 and 0 <= cfg.optimizer.b2 < 1,
         f"optimizer betas ({cfg.optimizer.b1}, {cfg.optimizer.b2}) must lie in [0, 1)")
    need(cfg.objective.max_nonfinite_steps > 0,
         f"objective.max_nonfinite_steps={cfg.objective.max_nonfinite_steps} must be > 0")
    if cfg.init_from:
        need(os.path.isdir(cfg.init_from), f"init_from={cfg.init_from!r} is not a directory")
    implementations.resolve(model, jax.default_backend())  # an explicit kernel that cannot run
    shape = sharding.resolve_mesh_shape(cfg.mesh.pipeline, cfg.mesh.data, cfg.mesh.expert,
                                        jax.device_count())
    sharding.check_fits(model, dict(zip(sharding.MESH_AXES, shape, strict=True)),
                        cfg.batch_size, cfg.microbatches)
    need(cfg.mesh.capacity_factor > 0,
         f"mesh.capacity_factor={cfg.mesh.capacity_factor} must be positive")
    if shape[0] > 1:
        spec = pipeline_spec(cfg, shape[0])
        pipeline.check(spec, model.n_moe_layers, cfg.batch_size // cfg.microbatches)
        per_microbatch = cfg.batch_size // cfg.microbatches // spec.microbatches
        need(per_microbatch % (shape[1] * shape[2]) == 0,
             f"pipeline microbatches of {per_microbatch} sequences do not divide over data x "
             f"expert = {shape[1] * shape[2]}; raise batch_size or lower "
             f"mesh.pipeline_microbatches")


def pipeline_spec(cfg: config_dict.ConfigDict, stages: int) -> pipeline.PipelineSpec:
    return pipeline.PipelineSpec(stages, cfg.mesh.pipeline_microbatches,
                                 cfg.mesh.pipeline_schedule, cfg.mesh.pipeline_repeats)


def parallel_layout(cfg: config_dict.ConfigDict) -> sharding.Parallel | None:
    """The mesh for this run, or None on a single device."""
    if jax.device_count() == 1:
        return None
    mesh = sharding.make_mesh(cfg.mesh.pipeline, cfg.mesh.data, cfg.mesh.expert)
    stages = mesh.shape["pipeline"]
    return sharding.Parallel(
        mesh, fsdp=cfg.mesh.fsdp, capacity_factor=cfg.mesh.capacity_factor,
        pipeline=pipeline_spec(cfg, stages) if stages > 1 else None,
        batch_axes=sharding.MESH_AXES if stages > 1 else sharding.BATCH_AXES)


def hyper(cfg: config_dict.ConfigDict) -> Hyper:
    o = cfg.optimizer
    return Hyper(
        batch_size=cfg.batch_size, microbatches=cfg.microbatches, seq_len=cfg.seq_len,
        schedule=tuple(tuple(p) for p in o.schedule), start_lr=o.start_lr, b1=o.b1, b2=o.b2,
        eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
        mtp_weight=tuple(tuple(p) for p in cfg.objective.mtp_weight),
        bias_rate=tuple(tuple(p) for p in cfg.objective.bias_rate),
        balance_alpha=cfg.objective.balance_alpha,
        inject_nonfinite_steps=tuple(cfg.get("inject_nonfinite_steps", ())))


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
    model = model_config(cfg)
    validate(cfg, model)
    workdirs.check_writable(workdir)
    data = TokenData(DataSpec(cfg.data.source, cfg.data.path, cfg.data.text_field,
                              cfg.data.tokenizer, cfg.seq_len, cfg.data.eval_period),
                     model.vocab_size)
    os.makedirs(workdir, exist_ok=True)
    lock = workdirs.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _train(cfg, workdir, model, data, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: config_dict.ConfigDict, workdir: str, model: ModelConfig, data: TokenData,
           progress: bool) -> dict[str, Any]:
    began = time.perf_counter()
    processes, process = jax.process_count(), jax.process_index()
    parallel = parallel_layout(cfg)
    trainer = Trainer(model, hyper(cfg), parallel)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    meta = {"model": dataclasses.asdict(model), "config": json.loads(cfg.to_json()),
            "tokenizer": data.tokenizer.to_json() if data.tokenizer else None}
    if process == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)

    per_process = cfg.batch_size // processes
    train_iter = iter(data.dataset("train", per_process, cfg.seed, process, processes))
    restored = checkpoints.restore_latest(trainer.abstract_state())
    if restored is not None:
        start, state, data_state, _ = restored
        train_iter.set_state(data_state)
        log.info("resumed from %s/%d", checkpoints.directory, start)
    else:
        unusable = checkpoints.set_aside or checkpoints.unusable_on_disk()
        if unusable and not cfg.allow_fresh_start:
            raise ValueError(
                f"no checkpoint in {checkpoints.directory} can be restored: "
                f"{', '.join(os.path.basename(u) for u in unusable)} were set aside as unusable "
                f"(renamed, not deleted); starting again from step 0 would replace this run. "
                f"Pass --config.allow_fresh_start=True to start over in this workdir, or use "
                f"another --workdir")
        start = 0
        state = trainer.init_state(jax.random.key(cfg.seed))
        if cfg.init_from:
            # Restored straight into this run's shardings: no process holds the whole model.
            abstract = trainer.abstract_state()
            variables, _ = load_variables(
                cfg.init_from, {"params": abstract.params, "router_bias": abstract.router_bias})
            state = trainer.state_from_variables(variables)
            log.info("initialized params and router bias from %s", cfg.init_from)

    counts = api.param_counts(model)
    flops_per_token = flops.train_flops_per_token(model, cfg.seq_len)
    peak = flops.device_peak_flops()
    devices = jax.device_count()
    say(f"dsv3-jax: {counts['main'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M "
          f"active per token), MTP {counts['mtp'] / 1e6:.1f}M as released; "
          f"{flops_per_token / 1e6:.1f} MFLOPs per trained token; {devices} x "
          f"{jax.devices()[0].device_kind}"
          f"{'' if parallel is None else f' as mesh {dict(parallel.mesh.shape)}'}"
          f"{pipeline_note(parallel)}; "
          f"steps {start} -> {cfg.steps}")
    say(f"kernels on {jax.default_backend()}: {trainer.implementations.describe()}")

    if process == 0:
        moved = workdirs.supersede_metrics(workdir, start)
        if moved:
            say(f"{moved} metrics records past step {start} (logged after the checkpoint this "
                f"run starts from) moved to {workdirs.SUPERSEDED}")
    writer = MetricsWriter(workdir)
    if start > 0:
        writer.write({"step": start, "event": "resumed"})
    stop = {"signal": None}

    def on_sigterm(signum, _frame):
        stop["signal"] = signum

    # One process: our own SIGTERM flag. Several: JAX's preemption sync point, which makes
    # every process stop (and save) at the same step.
    previous = signal.signal(signal.SIGTERM, on_sigterm) if processes == 1 else None

    def preempted(step: int) -> bool:
        if processes == 1:
            return stop["signal"] is not None
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    bar = None
    if progress and process == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)

    last: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    pending = None  # the previous step's metrics: checked one step late to keep dispatch async

    def save(step):
        checkpoints.save(step, state, train_iter.get_state(), meta)

    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = trainer.place_batch(next(train_iter))
            state, metrics = trainer.train_step(state, batch)
            window_steps += 1
            if pending is not None:
                check_finite(*pending, cfg.objective.max_nonfinite_steps, checkpoints)
            pending = (step, metrics)

            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite(*pending, cfg.objective.max_nonfinite_steps, checkpoints)
                pending = None
                host = to_host(metrics)
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = window_steps * cfg.batch_size * cfg.seq_len / elapsed
                last = {"step": step, **{k: v for k, v in host.items() if k != "expert_load"},
                        "expert_load_max_over_mean": host["expert_load"]["max_over_mean"],
                        "bias_spread": host["expert_load"]["bias_spread"],
                        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
                        "tokens_per_sec": tokens_per_sec,
                        "step_time": elapsed / window_steps}
                if peak:
                    last["mfu"] = tokens_per_sec * flops_per_token / (peak * devices)
                writer.write(last)
                if bar is not None:
                    bar.set_postfix(progress_fields(host, tokens_per_sec, model.mtp_depth))
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = {"step": step, **evaluate(trainer, state, data, cfg)}
                writer.write(last_eval)
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
            if bar is not None:
                bar.update(1)
            if preempted(step):
                if pending is not None:
                    check_finite(*pending, cfg.objective.max_nonfinite_steps, checkpoints)
                if step % cfg.checkpoint_every and step != cfg.steps:
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return last


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


def evaluate(trainer: Trainer, state, data: TokenData, cfg) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the held-out windows (each once, at most
    cfg.eval_batches batches of cfg.batch_size), for the main head and averaged over MTP depths."""
    processes, process = jax.process_count(), jax.process_index()
    sums = counts = 0.0
    for batch in data.eval_batches(cfg.batch_size // processes, cfg.eval_batches, process,
                                   processes):
        out = jax.device_get(trainer.eval_step(state, trainer.place_batch(batch)))
        sums, counts = sums + np.asarray(out["ce_sums"], np.float64), counts + out["counts"]
    per_depth = sums / np.maximum(counts, 1.0)
    return {"eval_loss": float(per_depth[0]),
            "eval_mtp_loss": float(per_depth[1:].mean()) if len(per_depth) > 1 else 0.0}
