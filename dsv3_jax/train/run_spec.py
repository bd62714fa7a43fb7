"""The run spec: one frozen description of a training run, built and validated once from the
ml_collections config (`RunSpec.from_config`). `launch.train` (through `loop.run`),
`launch.plan` and `benchmarks.train_step` read the run through it; nothing else reads the
config's fields, so no field has a second default anywhere.

  spec = RunSpec.from_config(cfg, devices=jax.device_count(), backend=jax.default_backend())
  spec.model      ModelConfig (the preset with cfg.model's fields over it)
  spec.hyper      what the jitted step needs (batch, schedule, optimizer, objective)
  spec.data       DataSpec (source, path, tokenizer, seq_len, eval split)
  spec.mesh       MeshSpec (the mesh shape for `devices`, fsdp, capacity, the pipeline)
  spec.run        RunSchedule (steps, logging, evals, checkpoints, seed, init_from)

Everything a config can get wrong is refused here with a ValueError naming the field and what
would be right, before any array is allocated or any step compiled. `launch.plan` sizes layouts
the trainer would refuse (a pipeline it cannot run), so it asks for `sizable`, which returns that
refusal instead of raising it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ml_collections import config_dict

from dsv3_jax import config as model_configs
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import implementations
from dsv3_jax.parallel import pipeline, sharding
from dsv3_jax.train import optim
from dsv3_jax.train.data import DataSpec
from dsv3_jax.train.step import Hyper

DATA_SOURCES = ("text", "tokens", "synthetic")
POSITIVE_INTS = ("steps", "batch_size", "microbatches", "seq_len", "checkpoint_every",
                 "keep_checkpoints", "eval_every", "eval_batches", "log_every")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The device layout for a device count: mesh axis sizes (pipeline, data, expert)."""

    shape: tuple[int, int, int]
    fsdp: bool
    capacity_factor: float
    pipeline: pipeline.PipelineSpec | None  # None: the MoE stack is not pipelined

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(sharding.MESH_AXES, self.shape, strict=True))

    @property
    def devices(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


@dataclasses.dataclass(frozen=True)
class RunSchedule:
    """When the loop logs, evaluates, checkpoints and stops; where it starts from."""

    steps: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    max_nonfinite_steps: int
    seed: int
    init_from: str
    allow_fresh_start: bool


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: ModelConfig
    hyper: Hyper
    data: DataSpec
    mesh: MeshSpec
    run: RunSchedule
    config: dict[str, Any]  # the config as JSON, recorded in each checkpoint's meta

    @classmethod
    def from_config(cls, cfg: config_dict.ConfigDict, *, devices: int, backend: str,
                    processes: int = 1) -> RunSpec:
        """The validated spec of `cfg` on `devices` devices of `backend` over `processes`
        processes; ValueError for anything that cannot run."""
        spec, refusal = cls.sizable(cfg, devices=devices, backend=backend, processes=processes)
        if refusal:
            raise ValueError(f"config: {refusal}")
        return spec

    @classmethod
    def sizable(cls, cfg: config_dict.ConfigDict, *, devices: int, backend: str,
                processes: int = 1) -> tuple[RunSpec, str | None]:
        """The spec, and why the trainer would refuse its pipeline (None when it would not).
        Raises ValueError for what cannot even be sized."""
        model = model_config(cfg)
        _check_run(cfg, model, processes)
        implementations.resolve(model, backend)  # an explicit kernel that cannot run here
        mesh = _mesh_spec(cfg, model, devices)
        refusal = None
        if mesh.pipeline is not None:
            try:
                pipeline.check(mesh.pipeline, model.n_moe_layers, cfg.batch_size //
                               cfg.microbatches)
            except ValueError as e:
                refusal = str(e)
        spec = cls(model=model, hyper=_hyper(cfg), data=_data(cfg), mesh=mesh,
                   run=_schedule(cfg), config=json.loads(cfg.to_json()))
        return spec, refusal


def model_config(cfg: config_dict.ConfigDict) -> ModelConfig:
    """The preset named by cfg.model.preset with every set field of cfg.model over it."""
    overrides = {k: v for k, v in cfg.model.items() if k != "preset" and v is not None}
    return model_configs.preset(cfg.model.preset, **overrides)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"config: {msg}")


def _check_run(cfg: config_dict.ConfigDict, model: ModelConfig, processes: int) -> None:
    for name in POSITIVE_INTS:
        _need(isinstance(cfg[name], int) and cfg[name] > 0,
              f"{name}={cfg[name]!r} must be a positive integer")
    unit = cfg.microbatches * processes
    _need(cfg.batch_size % unit == 0,
          f"batch_size={cfg.batch_size} must be divisible by microbatches={cfg.microbatches} x "
          f"processes={processes}; e.g. batch_size={unit * max(1, cfg.batch_size // unit)}")
    _need(cfg.seq_len <= model.max_seq_len,
          f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    _need(cfg.data.source in DATA_SOURCES,
          f"data.source={cfg.data.source!r} is not one of {', '.join(DATA_SOURCES)}")
    _need(cfg.data.eval_period >= 2, f"data.eval_period={cfg.data.eval_period} must be >= 2")
    try:
        optim.check_schedule(cfg.optimizer.start_lr, cfg.optimizer.schedule)
    except ValueError as e:
        _need(False, f"optimizer.{e}")
    try:
        optim.check_moments_dtype(cfg.optimizer.moments_dtype)
    except ValueError as e:
        _need(False, str(e))
    _need(cfg.optimizer.clip_norm > 0,
          f"optimizer.clip_norm={cfg.optimizer.clip_norm} must be > 0")
    _need(0 <= cfg.optimizer.b1 < 1 and 0 <= cfg.optimizer.b2 < 1,
          f"optimizer betas ({cfg.optimizer.b1}, {cfg.optimizer.b2}) must lie in [0, 1)")
    _need(cfg.objective.max_nonfinite_steps > 0,
          f"objective.max_nonfinite_steps={cfg.objective.max_nonfinite_steps} must be > 0")


def _mesh_spec(cfg: config_dict.ConfigDict, model: ModelConfig, devices: int) -> MeshSpec:
    m = cfg.mesh
    _need(m.capacity_factor > 0, f"mesh.capacity_factor={m.capacity_factor} must be positive")
    shape = sharding.resolve_mesh_shape(m.pipeline, m.data, m.expert, devices)
    sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
    sharding.check_fits(model, sizes, cfg.batch_size, cfg.microbatches)
    pipe = None
    if shape[0] > 1:
        pipe = pipeline.PipelineSpec(shape[0], m.pipeline_microbatches, m.pipeline_schedule,
                                     m.pipeline_repeats)
        per_step = cfg.batch_size // cfg.microbatches
        if per_step % (pipe.microbatches * shape[1] * shape[2]):
            raise ValueError(
                f"batch_size={cfg.batch_size} / microbatches={cfg.microbatches} / "
                f"mesh.pipeline_microbatches={pipe.microbatches} sequences do not divide over "
                f"data x expert = {shape[1] * shape[2]}; raise batch_size or lower "
                "mesh.pipeline_microbatches")
    return MeshSpec(shape=shape, fsdp=bool(m.fsdp), capacity_factor=m.capacity_factor,
                    pipeline=pipe)


def _hyper(cfg: config_dict.ConfigDict) -> Hyper:
    o = cfg.optimizer
    return Hyper(
        batch_size=cfg.batch_size, microbatches=cfg.microbatches, seq_len=cfg.seq_len,
        schedule=tuple(tuple(p) for p in o.schedule), start_lr=o.start_lr, b1=o.b1, b2=o.b2,
        eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
        moments_dtype=o.moments_dtype,
        mtp_weight=tuple(tuple(p) for p in cfg.objective.mtp_weight),
        bias_rate=tuple(tuple(p) for p in cfg.objective.bias_rate),
        balance_alpha=cfg.objective.balance_alpha,
        inject_nonfinite_steps=tuple(cfg.get("inject_nonfinite_steps", ())))


def _data(cfg: config_dict.ConfigDict) -> DataSpec:
    d = cfg.data
    return DataSpec(d.source, d.path, d.text_field, d.tokenizer, cfg.seq_len, d.eval_period)


def _schedule(cfg: config_dict.ConfigDict) -> RunSchedule:
    return RunSchedule(
        steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches, checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        max_nonfinite_steps=cfg.objective.max_nonfinite_steps, seed=cfg.seed,
        init_from=cfg.init_from, allow_fresh_start=bool(cfg.allow_fresh_start))
