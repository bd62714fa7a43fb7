"""Compile the real train step (or serving prefill and decode) for a TPU slice, on any host.

  python -m launch.compile --config=configs/deepseek_v3_671b.py --topology=v5p-1024
  python -m launch.compile --config=configs/small.py --topology=v5p:1x1x1
  python -m launch.compile --config=configs/moonlight_16b_a3b.py --topology=v6e-8 \
      --config.mesh.expert=8 --config.microbatches=8
  python -m launch.compile --config=configs/deepseek_v3_671b.py --topology=v5p-128 --decode \
      --batch=128 --prompt_len=4096 --max_len=8192

libtpu's compile-only devices of the slice (`dsv3_jax.parallel.tpu_targets`: every host's, no
`jax.distributed`, no TPU attached) stand in for the pod. The program is the one `launch.train`
runs, built the same way from the same `RunSpec` (model with the implementations `tpu` resolves
to, AdamW, ZeRO/fsdp shardings, pipeline, expert parallelism), lowered from abstract inputs
only (nothing the size of the model is allocated on the host) and compiled by XLA:TPU and
Mosaic TPU. With --decode: the prefill of `--batch` prompts of `--prompt_len` tokens into a
latent cache of `--max_len` rows and one decode step after it, as `dsv3_jax.generate` runs
them, with bf16 weights sharded by the same table (the serving slice's layout is the config's
mesh, without pipeline stages).

Printed, per device: the compiler's argument, output (less what aliases the donated
arguments), temporary and generated-code bytes, their total beside `launch.plan`'s estimate for
the same config and mesh, the step's FLOPs and bytes from XLA's cost analysis, and the
collectives of the compiled HLO by kind with their bytes per step and how many XLA scheduled
asynchronously (`dsv3_jax.parallel.collectives`).

Exit status: 0 it fits the chip's HBM, 1 it does not (followed by `launch.plan`'s single flag
changes that would lower it: compile the one you pick to confirm), 2 it cannot be built (a bad
flag, a topology libtpu does not know, a mesh that does not match the slice, a config that does
not divide), refused before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding
from ml_collections import config_dict, config_flags

from dsv3_jax.model import api, implementations
from dsv3_jax.model.flops import PEAK_BF16, train_flops_per_token
from dsv3_jax.parallel import collectives, gpu_targets, sharding, tpu_targets
from dsv3_jax.train.loop import parallel_layout
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer
from launch import cli, plan
from pallas_kernels import tpu_compile

GB = 1e9
Target = tpu_targets.Target | gpu_targets.Target


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's figures, per device."""

    name: str
    arguments: int
    outputs: int  # not aliased to an argument
    temporaries: int
    code: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, collectives.KindStats]
    seconds: float  # to lower and compile
    refusal: str = ""  # XLA's out-of-memory error: the program needs more than the chip has

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Report:
    target: Target
    spec: RunSpec
    programs: tuple[Program, ...]
    estimate: float  # bytes per device: launch.plan's total, or weights + cache for serving
    estimate_label: str
    plan: plan.Plan | None = None  # the train step's plan (None for serving)
    # The train step compiled again with XLA:TPU told the chip holds only the plan's estimate.
    # Given room, XLA's scheduler spends spare HBM on overlap (prefetches, early collectives),
    # so the compile above can exceed what the step needs; this says whether the plan suffices.
    plan_check: Program | None = None

    @property
    def peak(self) -> int:
        return max(p.total for p in self.programs)

    @property
    def fits(self) -> bool:
        return self.peak <= self.target.hbm_bytes and not any(p.refusal for p in self.programs)


# Building -----------------------------------------------------------------------------------
def run_spec(cfg: config_dict.ConfigDict, target: Target) -> RunSpec:
    """The run spec on the slice's chips; ValueError for what cannot run there."""
    return RunSpec.from_config(cfg, devices=target.device_count, backend=target.backend)


def compile_program(name: str, jitted, args, mesh, hbm_cap: float | None = None) -> Program:
    """Lower and compile `jitted` for `args` (ShapeDtypeStructs with shardings on `mesh`); with
    `hbm_cap` (bytes, TPU) XLA:TPU is told the chip has only that much HBM."""
    began = time.perf_counter()
    print(f"{name}: lowering and compiling for {mesh.devices.size} devices (minutes for the "
          "largest models)...", file=sys.stderr, flush=True)
    options = {} if hbm_cap is None else {"xla_tpu_max_hbm_size_mib": int(hbm_cap // 2**20)}
    # The Mosaic TPU kernels read the chip version while tracing: from the abstract mesh here.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return out_of_memory(name, str(e), time.perf_counter() - began)
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    flops, bytes_accessed = tpu_compile.cost_of(compiled)
    return Program(
        name=name, arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes, code=memory.generated_code_size_in_bytes,
        flops=flops, bytes_accessed=bytes_accessed,
        collectives=collectives.of_hlo(compiled.as_text()), seconds=seconds)


def out_of_memory(name: str, error: str, seconds: float) -> Program:
    """The Program of a compile XLA refused for memory, with what the error states it needs
    (GiB in the message)."""
    # Two forms: "...required for HLO temporaries (115.87G) exceeds available HBM (95.73G)" and
    # "CompileTimeHbmOom: ... Used 31.25G of 31.24G hbm" (from a later stage of the compile).
    found = (re.search(r"temporaries \(([\d.]+)([KMGT])\)", error)
             or re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", error))
    temps = int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024) if found \
        else 0
    line = next((ln for ln in error.splitlines() if "RESOURCE_EXHAUSTED" in ln), error)
    return Program(name, 0, 0, temps, 0, 0.0, 0.0, {k: collectives.KindStats()
                                                  for k in collectives.KINDS}, seconds,
                   refusal=line.split("RESOURCE_EXHAUSTED: ")[-1].strip())


def train_report(cfg: config_dict.ConfigDict, target: Target, check_plan: bool = True) -> Report:
    """The train step of `cfg` compiled for `target`, beside launch.plan's estimate; with
    `check_plan` (TPU) compiled once more on a chip of only the plan's bytes (`plan_check`)."""
    spec = run_spec(cfg, target)
    estimate = plan.make_plan(cfg, target.device_count, target.hbm_bytes / GB,
                              backend=target.backend)
    parallel = parallel_layout(spec.mesh, target.devices)
    trainer = Trainer(spec.model, spec.hyper, parallel, backend=target.backend)
    rows = (spec.hyper.batch_size, spec.hyper.seq_len + 1)
    batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=s)
             for k, s in trainer.batch_sharding.items()}
    args = (trainer.abstract_state(), batch)
    program = compile_program("train step", trainer.train_step, args, parallel.mesh)
    checked = None
    if check_plan and target.backend == "tpu" and not program.refusal:
        checked = compile_program("train step in launch.plan's estimate", trainer.train_step,
                                  args, parallel.mesh, hbm_cap=estimate.total)
    return Report(target, spec, (program,), estimate.total, "launch.plan's estimate", estimate,
                  plan_check=checked)


@dataclasses.dataclass(frozen=True)
class Serving:
    batch: int
    prompt_len: int
    max_len: int


def check_serving(serving: Serving, spec: RunSpec) -> None:
    """Refuse a serving shape that cannot run on the config's mesh, naming what would."""
    rows = spec.mesh.sizes["data"] * spec.mesh.sizes["expert"]
    if spec.mesh.sizes["pipeline"] > 1:
        raise ValueError(f"--decode serves without pipeline stages: set --config.mesh.pipeline=1 "
                         f"(got {spec.mesh.sizes['pipeline']})")
    if serving.batch < 1 or serving.batch % rows:
        raise ValueError(f"--batch={serving.batch} must be a positive multiple of data x expert "
                         f"= {rows} (every device decodes its own rows), e.g. {rows * 8}")
    if not 1 <= serving.prompt_len < serving.max_len:
        raise ValueError(f"--prompt_len={serving.prompt_len} must be at least 1 and below "
                         f"--max_len={serving.max_len} (the cache must hold the new tokens)")
    if serving.max_len > spec.model.max_seq_len:
        raise ValueError(f"--max_len={serving.max_len} exceeds the model's max_seq_len "
                         f"{spec.model.max_seq_len}")


def decode_report(cfg: config_dict.ConfigDict, target: Target,
                  serving: Serving) -> Report:
    """Prefill and one decode step of `dsv3_jax.generate`'s programs compiled for `target`."""
    spec = run_spec(cfg, target)
    check_serving(serving, spec)
    parallel = parallel_layout(spec.mesh, target.devices)
    mesh = parallel.mesh
    model = implementations.resolved(spec.model, target.backend)
    variables = serving_variables(model, mesh, spec.mesh.fsdp)
    rows = NamedSharding(mesh, parallel.spec("batch"))
    cache = jax.eval_shape(lambda: api.init_cache(model, serving.batch, serving.max_len))
    cache_sharding = jax.tree.map(
        lambda a: NamedSharding(mesh, parallel.spec(*([None] * (a.ndim - 3)), "batch", None, None))
        if a.ndim >= 3 else rows, cache)
    cache = _abstract(cache, cache_sharding)
    tokens = jax.ShapeDtypeStruct((serving.batch, serving.prompt_len), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((serving.batch,), jnp.int32, sharding=rows)
    step_tokens = jax.ShapeDtypeStruct((serving.batch, 1), jnp.int32, sharding=rows)
    prefill = jax.jit(lambda v, t, n, c: api.prefill(model, v, t, n, c, parallel=parallel),
                      donate_argnums=3)
    decode = jax.jit(lambda v, t, c: api.decode(model, v, t, c, parallel=parallel),
                     donate_argnums=2)
    programs = (compile_program("prefill", prefill, (variables, tokens, lengths, cache), mesh),
                compile_program("decode step", decode, (variables, step_tokens, cache), mesh))
    return Report(target, spec, programs, device_bytes(variables) + device_bytes(cache),
                  f"weights ({model.dtype}) + latent cache")


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree))


def serving_variables(model, mesh, fsdp: bool):
    """Abstract variables for serving: matmul weights in model.dtype (the released bf16 form),
    the router bias fp32, each sharded by the logical-axis table."""
    boxed = api.abstract_variables(model)
    shardings = sharding.variable_shardings(boxed, mesh, fsdp)
    abstract = nn.meta.unbox(boxed)
    dtype = jnp.dtype(model.dtype)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), abstract["params"])
    return _abstract({"params": params, "router_bias": abstract["router_bias"]}, shardings)


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


# Report -------------------------------------------------------------------------------------
def layout(spec: RunSpec) -> str:
    m = spec.mesh.sizes
    pipe = spec.mesh.pipeline
    stages = f", {pipe.schedule} pipeline x {pipe.microbatches} microbatches" if pipe else ""
    return (f"mesh pipeline={m['pipeline']} x data={m['data']} x expert={m['expert']}, "
            f"fsdp={spec.mesh.fsdp}{stages}; batch {spec.hyper.batch_size} x "
            f"{spec.hyper.seq_len} in {spec.hyper.microbatches} microbatch(es), "
            f"remat={spec.model.remat}")


def format_report(report: Report) -> str:
    t = report.target
    lines = [t.describe(), layout(report.spec), ""]
    for p in report.programs:
        if p.refusal:
            lines += [f"{p.name}: XLA:TPU refused it for memory (after {p.seconds:.0f} s): "
                      f"{p.refusal}", ""]
            continue
        lines += [f"{p.name} (compiled in {p.seconds:.0f} s), per device:",
                  *_memory_rows(p, t.hbm_bytes),
                  f"  XLA cost analysis: {p.flops / 1e12:.4g} TFLOP, {p.bytes_accessed / GB:.4g}"
                  " GB accessed (each loop body once; Pallas kernels count 0)",
                  *collectives.format_table(p.collectives), ""]
    if report.programs[0].name == "train step":
        s = report.spec
        analytic = train_flops_per_token(s.model, s.hyper.seq_len) * s.hyper.batch_size * \
            s.hyper.seq_len / t.device_count
        peak = PEAK_BF16.get(t.devices[0].device_kind)
        bound = f"; at the chip's bf16 peak {analytic / peak:.2f} s per step" if peak else ""
        lines.append(f"model FLOPs per device and step (dsv3_jax.model.flops, 6N + attention): "
                     f"{analytic / 1e12:.4g} TFLOP{bound}")
    ratio = report.peak / report.estimate if report.estimate else float("nan")
    if any(p.refusal for p in report.programs):
        lines.append(f"does NOT fit: XLA states {report.peak / GB:.2f} GB required on a "
                     f"{t.hbm_bytes / GB:.1f} GB chip; "
                     f"{report.estimate_label}: {report.estimate / GB:.2f} GB in all")
        return "\n".join(lines)
    lines.append(f"compiled {report.peak / GB:.2f} GB vs {report.estimate_label} "
                 f"{report.estimate / GB:.2f} GB per device (compiled / estimate {ratio:.2f})")
    c = report.plan_check
    if c is not None and c.refusal:
        lines.append(f"launch.plan's estimate is too small: on a chip of only "
                     f"{report.estimate / GB:.2f} GB XLA:TPU refuses the step ({c.refusal})")
    elif c is not None:
        lines.append(f"launch.plan's estimate suffices: XLA:TPU compiles the step for a chip "
                     f"of only {report.estimate / GB:.2f} GB (in {c.seconds:.0f} s); the "
                     f"{report.peak / GB:.2f} GB above is its memory analysis on the whole "
                     "chip, where its scheduler spends spare HBM, and counts more than XLA holds "
                     "against the chip's size")
    share = report.peak / t.hbm_bytes
    lines.append(f"fits: {share:.0%} of {t.hbm_bytes / GB:.1f} GB HBM" if report.fits else
                 f"does NOT fit: {report.peak / GB:.1f} GB is {share:.0%} of "
                 f"{t.hbm_bytes / GB:.1f} GB HBM")
    return "\n".join(lines)


def _memory_rows(p: Program, hbm: float) -> list[str]:
    def row(name, value):
        return f"  {name:<44}{value / GB:9.3f} GB"

    return [row("arguments (state, batch)", p.arguments),
            row("outputs (not aliased to donated arguments)", p.outputs),
            row("temporaries (activations, XLA buffers)", p.temporaries),
            row("generated code", p.code),
            row("total", p.total) + f"  ({p.total / hbm:.0%} of HBM)"]


def make_target(name: str, num_slices: int = 1):
    """A TPU slice (`tpu_targets`) or, on a GPU host, a mock GPU cluster (`gpu_targets`)."""
    if name.startswith("gpu:"):
        if num_slices != 1:
            raise ValueError("--num_slices is for TPU slices; write a GPU cluster as gpu:SxHxD")
        return gpu_targets.target(name)
    return tpu_targets.target(name, num_slices)


# Command line -------------------------------------------------------------------------------
def main() -> None:
    """`python -m launch.compile`; flags defined here, not on import (as launch.plan)."""
    config = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", None, "TPU slice (v5p-1024, v6e-256, v5p:2x2x1) "
                                   "or, on a GPU host, a mock GPU cluster (gpu:1x8, gpu:16x8).")
    num_slices = flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-center network.")
    decode = flags.DEFINE_bool("decode", False, "Compile serving prefill + one decode step.")
    batch = flags.DEFINE_integer("batch", 64, "--decode: sequences decoded together.")
    prompt_len = flags.DEFINE_integer("prompt_len", 2048, "--decode: prompt tokens prefilled.")
    max_len = flags.DEFINE_integer("max_len", 4096, "--decode: latent cache rows per sequence.")
    check_plan = flags.DEFINE_bool(
        "check_plan", True, "TPU train step: compile it a second time on a chip of only "
        "launch.plan's estimate, to say whether the estimate suffices (--nocheck_plan: once).")
    flags.mark_flags_as_required(["config", "topology"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not topology.value.startswith("gpu:"):  # libtpu's compile-only devices, on any host
            jax.config.update("jax_platforms", "cpu")
        try:
            target = make_target(topology.value, num_slices.value)
            # Config, mesh and serving errors are raised by the reports before they compile.
            report = (decode_report(config.value, target, Serving(batch.value, prompt_len.value,
                                                                  max_len.value))
                      if decode.value else train_report(config.value, target,
                                                        check_plan.value))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(format_report(report))
        if report.fits:
            return
        if report.plan is not None:
            options = plan.alternatives(config.value, target.device_count, target.hbm_bytes / GB,
                                        target.backend)
            print("launch.plan's single flag changes (analytic; compile the one you pick):")
            print(plan.format_alternatives(report.plan, options))
        sys.exit(1)

    cli.run(run, config)


if __name__ == "__main__":
    main()
