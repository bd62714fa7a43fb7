"""Size a training job on a laptop: per-device memory for a config, a mesh and a device count.

  python -m launch.plan --config=configs/deepseek_v3_671b.py --devices=2048
  python -m launch.plan --config=configs/deepseek_v3_671b.py --devices=2048 \
      --config.mesh.pipeline=16 --config.mesh.expert=64 --config.mesh.data=-1 \
      --device_memory_gb=141

A layout that does not fit, or that the trainer refuses, is followed by the single flag changes
that lower its total (or that the trainer accepts), each with its total (`alternatives`).

Nothing is allocated and no accelerator is touched: shapes come from
`dsv3_jax.abstract_variables` (jax.eval_shape) with their logical axes, shardings from the one
logical-axis table (`dsv3_jax.parallel.sharding.spec`), and per-device shard shapes are plain
arithmetic over the mesh sizes (ZeRO-1 placement from `sharding.zero1` on a jax AbstractMesh).

Per device, in bytes (GB = 1e9):
  parameters   fp32 shards of every parameter, plus the router bias (fp32, not trained).
               A dimension is split over its mesh axes when they divide it, else replicated
               (as the trainer does), except the MoE layer axis over `pipeline`: each stage
               holds ceil(moe_layers / pipeline) layers. Dense layers, embedding, head, final
               norm and the MTP modules are not split by `pipeline` (every stage holds them).
  gradients    sharded like the parameters: fp32; with microbatches > 1 one microbatch's
               gradients as the backward makes them (the matmul weights, cast once per step by
               dsv3_jax.model.transformer.cast_matmul_weights, in model.dtype; the rest fp32)
               plus the
               accumulated fp32 sum, sharded like one of the optimizer's moments (ZeRO-2,
               dsv3_jax.train.step).
  optimizer    AdamW mu and nu in optimizer.moments_dtype (fp32 or bf16), sharded like the
               parameters plus ZeRO-1: `data` on the first free dimension it divides
               (dsv3_jax.parallel.sharding.zero1).
  activations  b = bytes of model.dtype; c = every intermediate of one layer per token;
               s = what the remat policy keeps of it (below). Without a pipeline (P = 1), each
               accumulation microbatch (`microbatches` of them) runs its forward and backward
               before the next; tokens = batch_size / microbatches / (data x expert) x seq_len
               per device, and with L_d dense and L_m MoE layers:
                 saved   = tokens x [L_d s_dense + L_m s_moe + X]
                 X       = mtp_depth (c_moe + 3 D b) + (2 + mtp_depth) D b: the MTP blocks are
                           not rematerialized; the embedding, final and head inputs are kept
                 working = tokens x max(2 c_dense, 2 c_moe + A) + one layer's weights in b
                           bytes + the loss chunk (2 x rows x 512 x vocab fp32)
               Both add to saved the fused loss's gradients, kept from its forward pass:
                 (1 + mtp_depth) x (D x vocab + tokens_out x D) fp32
               With a pipeline (dsv3_jax.parallel.pipeline: M = mesh.pipeline_microbatches, V
               repeats of a circular schedule, else 1), embedding, dense layers, MTP and head run
               outside the stages on rows split over every device; the MoE stack runs
               n = M V + P - 1 iterations of Lc = ceil(L_m / (P V)) layers on one pipeline
               microbatch, and the backward (JAX's reverse of the loop, GPipe order) keeps every
               iteration's values:
                 tokens_out = batch_size / microbatches / (P x data x expert) x seq_len
                 tokens_in  = batch_size / microbatches / M / (data x expert) x seq_len
                 saved   = tokens_out x [L_d s_dense + X] + n x tokens_in x (Lc s_moe + D b)
                 working = max(tokens_out x 2 c_dense, tokens_in x (2 c_moe + A)) + one layer's
                           weights in b bytes + the loss chunk; circular adds the stage's MoE
                           weights once more (re-laid out for the ring every step)
               s per policy:  full D b (the layer input); save_attention_out 2 D b;
                 save_dots_no_batch D b + matmul outputs without batch dimensions (MLA
                 projections, dense and shared FFN, router; not the routed experts' grouped
                 GEMMs, which are not dot_generals); save_dots that + attention
                 scores and PV (xla attention); save_kernels save_dots_no_batch + what the
                 Pallas kernels keep for their backward; none D b + c.
               c: norms, MLA projections and latents, attention (xla: [N, T] fp32 scores and
                 probabilities per token; flash kernels: output and logsumexp), the FFN (dense:
                 gate and up fp32, their product and the output in b; MoE: router 2 E fp32, K
                 sorted rows of D, their SwiGLU (gate and up fp32), fp32 outputs K D, shared
                 experts). The working set is the layer being
                 differentiated (recomputed values and their gradients: 2 c) and A, the expert
                 all-to-all buffers (capacity_factor x K x D per token: send and receive in b,
                 results and their return in fp32) when expert > 1.
Not counted: XLA's temporaries outside these terms (fusion buffers, the optimizer update's
transients; with data > 1, a gradient leaf's fp32 copy where it is reduce-scattered before
being added to the sum: up to the largest stacked leaf, e.g. one expert weight stack), the
framework's reserve (leave ~5-10% of the device), and the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import flax.linen as nn
import jax
from absl import app, flags
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec
from ml_collections import config_dict, config_flags

import dsv3_jax
from dsv3_jax.config import REMAT_POLICIES, ModelConfig
from dsv3_jax.model import implementations
from dsv3_jax.model.transformer import MATMUL_WEIGHTS
from dsv3_jax.parallel import pipeline, sharding
from dsv3_jax.train import objective
from dsv3_jax.train.run_spec import RunSpec
from launch import cli

GB = 1e9
HEADROOM = 0.9  # the plan fits when the total is at most this share of the device
DEFAULT_DEVICE_MEMORY_GB = 141.0  # one H200
BACKENDS = ("gpu", "tpu")
GROUPS = ("MoE layers", "dense layers", "embedding, head, final norm", "MTP modules",
          "router bias (not trained)")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one training job on one mesh."""

    spec: RunSpec  # the run as the trainer builds it
    model: ModelConfig
    mesh: dict[str, int]  # pipeline, data, expert
    fsdp: bool
    device_memory: float  # bytes
    params: dict[str, int]  # per parameter group (fp32), router bias included
    gradients: int
    gradients_label: str  # what `gradients` holds
    optimizer: int
    activations: dict[str, int]  # saved, working
    pipeline: pipeline.PipelineSpec  # stages == 1: not pipelined
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # what the trainer refuses today, although it was sized

    @property
    def param_total(self) -> int:
        return sum(self.params.values())

    @property
    def total(self) -> int:
        return self.param_total + self.gradients + self.optimizer + sum(self.activations.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.device_memory


# Shardings -------------------------------------------------------------------------------------
def _axes(part) -> tuple[str, ...]:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def placed_spec(shape: tuple[int, ...], logical, mesh: dict[str, int],
                fsdp: bool) -> PartitionSpec:
    """The PartitionSpec of a leaf: the logical-axis table's, with dimensions the mesh axes do
    not divide replicated (as the trainer does), except `pipeline`, which always splits."""
    s = sharding.spec(tuple(logical), fsdp)
    parts = []
    for part, size in zip(list(s) + [None] * (len(shape) - len(s)), shape, strict=True):
        axes = _axes(part)
        n = math.prod(mesh[a] for a in axes)
        parts.append(part if axes == ("pipeline",) or size % n == 0 else None)
    return PartitionSpec(*parts)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec,
                mesh: dict[str, int]) -> tuple[int, ...]:
    """One device's block of a leaf; a `pipeline` dimension splits into ceil(size / stages)."""
    out = []
    for part, size in zip(list(spec) + [None] * (len(shape) - len(spec)), shape, strict=True):
        out.append(-(-size // math.prod(mesh[a] for a in _axes(part))))
    return tuple(out)


# The implementation fields change how, not what, the model computes: the shapes are traced with
# these (on CPU, where an explicit Pallas kernel would be refused), and traced once for them all.
SHAPE_NEUTRAL = {"dtype": "float32", "remat": "none", "attention_impl": "xla",
                 "decode_impl": "xla", "moe_impl": "xla"}


def variable_leaves(model: ModelConfig) -> tuple:
    """((path keys, logical names, shape), ...) of every variable; shapes only (eval_shape)."""
    return _leaves(dataclasses.replace(model, **SHAPE_NEUTRAL))


@functools.lru_cache(maxsize=8)
def _leaves(model: ModelConfig) -> tuple:
    boxed = dsv3_jax.abstract_variables(model)
    logical = jax.tree_util.tree_flatten_with_path(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    shapes = jax.tree.leaves(nn.meta.unbox(boxed))
    return tuple((tuple(getattr(k, "key", str(k)) for k in path), tuple(names), leaf.shape)
                 for (path, names), leaf in zip(logical, shapes, strict=True))


def param_group(keys: tuple[str, ...]) -> str:
    if keys[0] == "router_bias":
        return GROUPS[4]
    if keys[1] == "moe_layers":
        return GROUPS[0]
    if keys[1] == "dense_layers":
        return GROUPS[1]
    if keys[1].startswith("mtp_"):
        return GROUPS[3]
    return GROUPS[2]


@dataclasses.dataclass(frozen=True)
class ParamBytes:
    groups: dict[str, int]  # fp32 bytes per device by group (router bias included)
    trainable: int  # fp32 bytes per device of the trained parameters
    microbatch_grads: int  # one microbatch's gradients (matmul weights in model.dtype)
    optimizer: int  # mu + nu with ZeRO-1, in the moments' dtype
    zero1_fp32: int  # one fp32 value per parameter, sharded like a moment (the gradient sum)
    unsharded_by_data: dict[str, int]  # groups as a layer computes with them (fsdp gathered)


def dtype_bytes(model: ModelConfig) -> int:
    """Bytes per value of the compute dtype (activations, cast matmul weights)."""
    return 2 if model.dtype == "bfloat16" else 4


def parameter_bytes(model: ModelConfig, mesh: dict[str, int], fsdp: bool,
                    moments_dtype: str = "float32") -> ParamBytes:
    """Per-device bytes of every variable (fp32), its gradient and its AdamW state (mu and nu
    in `moments_dtype`, optimizer.moments_dtype)."""
    abstract_mesh = AbstractMesh(tuple(mesh[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    groups = dict.fromkeys(GROUPS, 0)
    gathered = dict.fromkeys(GROUPS, 0)
    trainable = optimizer = microbatch_grads = zero1_fp32 = 0
    compute_bytes = dtype_bytes(model)
    moment_bytes = {"float32": 4, "bfloat16": 2}[moments_dtype]
    for keys, names, shape in variable_leaves(model):
        spec = placed_spec(shape, names, mesh, fsdp)
        nbytes = 4 * math.prod(shard_shape(shape, spec, mesh))
        group = param_group(keys)
        groups[group] += nbytes
        gathered[group] += 4 * math.prod(
            shard_shape(shape, placed_spec(shape, names, mesh, False), mesh))
        if keys[0] != "params":
            continue
        trainable += nbytes
        if keys[-1] in MATMUL_WEIGHTS:
            microbatch_grads += nbytes // 4 * compute_bytes
        else:
            microbatch_grads += nbytes
        zero1 = sharding.zero1(NamedSharding(abstract_mesh, spec), shape).spec
        zero1_values = math.prod(shard_shape(shape, zero1, mesh))
        optimizer += 2 * moment_bytes * zero1_values  # mu and nu
        zero1_fp32 += 4 * zero1_values
    return ParamBytes({k: v for k, v in groups.items() if v}, trainable, microbatch_grads,
                      optimizer, zero1_fp32, gathered)


# Activations -----------------------------------------------------------------------------------
def layer_values(c: ModelConfig, moe: bool, seq_len: int, b: int,
                 flash: bool) -> dict[str, float]:
    """Bytes per token of one layer's intermediates, by what keeps them:
    `dots` (matmul outputs without batch dimensions), `batched` (attention scores and PV,
    xla attention only), `other` (norms, latents, activations, sorted rows, ...)."""
    D, N, T = c.dim, c.n_heads, seq_len
    Q, R, Hr = c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
    Hqk, Hkv, Hv = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim, c.v_head_dim
    xla = not flash
    dots = (Q + N * Hqk + (R + Hr) + N * Hkv + D) * b  # wq_a, wq_b, wkv_a, wkv_b, wo outputs
    batched = (4 * N * T + N * Hv * b) if xla else 0  # fp32 scores [N, T] and PV outputs
    other = (2 * D + Q + N * Hr + (R + Hr)) * b  # norms, q_norm, rotated q_rope, latents
    other += N * T * b if xla else N * Hv * b + 4 * N  # probabilities; flash: output and lse
    if moe:
        K, F, E = c.n_activated_experts, c.moe_inter_dim, c.n_routed_experts
        Fs = c.n_shared_experts * F
        # fp32: router logits and shared gate / up (SwiGLU accumulates in fp32); the shared
        # experts' output in b. The routed experts' GEMMs are not dot_generals (ragged_dot or
        # our kernels), so no dots policy saves them: their outputs (at most fp32) are `other`.
        dots += 4 * E + 4 * 2 * Fs + D * b
        other += 4 * E + K * D * b + K * F * b + Fs * b + D * b  # scores, sorted rows, silu*up
        other += 4 * (2 * K * F + K * D)  # routed gate / up / down outputs
    else:
        dots += 4 * 2 * c.inter_dim + D * b  # fp32 gate / up, the output in b
        other += c.inter_dim * b
    # What the Pallas kernels save for their backward (the "save_kernels" policy keeps it):
    # attention output and log-sum-exp; sorted expert rows, SwiGLU gate, up and product.
    kernels = (N * Hv * b + 4 * N) if flash else 0
    if moe:
        kernels += c.n_activated_experts * (D + 3 * c.moe_inter_dim) * b
    return {"dots": dots, "batched": batched, "other": other, "kernels": kernels}


def every_value(values: dict[str, float]) -> float:
    """c: all of one layer's intermediates per token (the kernels' residuals are among them)."""
    return values["dots"] + values["batched"] + values["other"]


def saved_per_token(c: ModelConfig, values: dict[str, float], b: int) -> float:
    """What the remat policy keeps of one layer for the backward pass, per token."""
    D = c.dim
    return {
        "full": D * b,
        "save_attention_out": 2 * D * b,
        "save_dots_no_batch": D * b + values["dots"],
        "save_dots": D * b + values["dots"] + values["batched"],
        "save_kernels": D * b + values["dots"] + values["kernels"],
        "none": D * b + every_value(values),
    }[c.remat]


def activation_bytes(c: ModelConfig, mesh: dict[str, int], batch_size: int, microbatches: int,
                     seq_len: int, capacity_factor: float, pipe: pipeline.PipelineSpec,
                     layer_weights: int,
                     flash: bool) -> dict[str, int]:
    """Saved and working activation bytes per device (the module's formula).
    layer_weights: fp32 bytes of the largest layer's weights as a device computes with them;
    flash: the attention implementation keeps no [T, S] scores (pallas, cudnn)."""
    b = dtype_bytes(c)
    D, P = c.dim, pipe.stages
    dense = layer_values(c, False, seq_len, b, flash)
    moe = layer_values(c, True, seq_len, b, flash)
    per_step = batch_size // microbatches
    rows_out = per_step // (P * mesh["data"] * mesh["expert"])
    extra = c.mtp_depth * (every_value(moe) + 3 * D * b) + (2 + c.mtp_depth) * D * b
    exchange = (capacity_factor * c.n_activated_experts * D * (2 * b + 8)
                if mesh["expert"] > 1 else 0)
    if P == 1:
        tokens = rows_out * seq_len
        saved = tokens * (c.n_dense_layers * saved_per_token(c, dense, b)
                          + c.n_moe_layers * saved_per_token(c, moe, b) + extra)
        layer = max(2 * every_value(dense) * tokens, (2 * every_value(moe) + exchange) * tokens)
    else:
        tokens_out = rows_out * seq_len
        tokens_in = per_step // pipe.microbatches // (mesh["data"] * mesh["expert"]) * seq_len
        per_pass = -(-c.n_moe_layers // (P * pipe.rounds))
        saved = (tokens_out * (c.n_dense_layers * saved_per_token(c, dense, b) + extra)
                 + pipe.iterations * tokens_in * (per_pass * saved_per_token(c, moe, b) + D * b))
        layer = max(2 * every_value(dense) * tokens_out,
                    (2 * every_value(moe) + exchange) * tokens_in)
    # The fused loss (dsv3_jax.train.objective) keeps its head and hidden-state gradients, fp32,
    # from the forward pass to the backward, for the main head and every MTP depth.
    saved += (1 + c.mtp_depth) * (D * c.vocab_size + rows_out * seq_len * D) * 4
    loss_chunk = 2 * rows_out * min(objective.LOSS_CHUNK, seq_len) * c.vocab_size * 4
    working = layer + layer_weights * b // 4 + loss_chunk
    return {"saved": int(saved), "working": int(working)}


# The plan ----------------------------------------------------------------------------------------
def make_plan(cfg: config_dict.ConfigDict, devices: int,
              device_memory_gb: float = DEFAULT_DEVICE_MEMORY_GB, backend: str = "gpu") -> Plan:
    """The plan of run config `cfg` (configs/*.py) on `devices` devices of `backend` (gpu or
    tpu: what model.*_impl="auto" resolves to). Raises ValueError, naming the value and what
    would fit, for a mesh or batch that does not divide."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--devices={devices!r} must be a positive integer")
    if not device_memory_gb > 0:
        raise ValueError(f"--device_memory_gb={device_memory_gb} must be positive")
    spec, refusal = RunSpec.sizable(cfg, devices=devices, backend=backend)
    model, hyper, mesh = spec.model, spec.hyper, spec.mesh.sizes
    pipe = spec.mesh.pipeline or pipeline.PipelineSpec(1, 1)
    fsdp = spec.mesh.fsdp
    pb = parameter_bytes(model, mesh, fsdp, hyper.moments_dtype)
    P, moe_here = mesh["pipeline"], -(-model.n_moe_layers // mesh["pipeline"])
    layer_weights = max(pb.unsharded_by_data.get(GROUPS[0], 0) // moe_here,
                        pb.unsharded_by_data.get(GROUPS[1], 0) // max(model.n_dense_layers, 1))
    attention = implementations.resolve(model, backend).attention
    activations = activation_bytes(model, mesh, hyper.batch_size, hyper.microbatches,
                                   hyper.seq_len, spec.mesh.capacity_factor, pipe, layer_weights,
                                   flash=attention != "xla")
    if pipe.rounds > 1:  # the circular layout is made inside the step (dsv3_jax.parallel.pipeline)
        activations["working"] += pb.groups.get(GROUPS[0], 0)
    if P == 1:
        schedule = (f"no pipeline: {hyper.microbatches} accumulation microbatch(es), one at a "
                    "time")
    else:
        per_pass = -(-model.n_moe_layers // (P * pipe.rounds))
        schedule = (f"pipeline of {P} stages: {pipe.microbatches} pipeline microbatches, "
                    f"{pipe.iterations} iterations of {per_pass} MoE layers whose values the "
                    "backward keeps (GPipe order)")
    assumptions = [
        f"parameters: each stage holds ceil({model.n_moe_layers} / {P}) = {moe_here} MoE "
        "layers; dense layers, embedding, head and MTP are replicated over the pipeline "
        "(dsv3_jax.parallel.pipeline runs them outside the stages)",
        f"activations: {schedule}; remat={model.remat}, attention={attention} "
        f"({model.attention_impl} on {backend}), dtype={model.dtype}",
    ]
    if model.moe_impl == "dense":
        assumptions.append("moe_impl=dense runs every expert on every token: far more "
                           "activation memory than counted here (sorted rows)")
    return Plan(spec=spec, model=model, mesh=mesh, fsdp=fsdp, device_memory=device_memory_gb * GB,
                params=pb.groups,
                gradients=(pb.microbatch_grads + pb.zero1_fp32 if hyper.microbatches > 1
                           else pb.trainable),
                gradients_label=(f"gradients (microbatch's, {model.dtype} matmuls; fp32 sum)"
                                 if hyper.microbatches > 1 else "gradients (fp32)"),
                optimizer=pb.optimizer, activations=activations, pipeline=pipe,
                assumptions=tuple(assumptions),
                warnings=() if refusal is None else (
                    f"the trainer refuses this pipeline today: {refusal}",))


# Single flag changes ------------------------------------------------------------------------
SHOWN = 5  # single flag changes printed for a layout that does not fit or is refused
# attention_impl values suggested per backend (make_plan then refuses a kernel that cannot run
# the shapes); moe_impl changes no term of the plan.
SUGGESTED_ATTENTION = {"gpu": ("pallas",), "tpu": ("pallas",)}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def flag_changes(plan: Plan, backend: str) -> list[tuple[tuple[str, ...], object]]:
    """(field path, value) of every single flag change worth sizing against `plan`: the layout
    and memory knobs the module sizes, each value the trainer might accept."""
    c, m, P = plan.model, plan.mesh, plan.mesh["pipeline"]
    devices = math.prod(m.values())
    changes: list[tuple[tuple[str, ...], object]] = [(("mesh", "fsdp"), not plan.fsdp)]
    changes += [(("model", "remat"), r) for r in REMAT_POLICIES if r != c.remat]
    changes += [(("model", "attention_impl"), a) for a in SUGGESTED_ATTENTION[backend]
                if a != c.attention_impl]
    hyper, pipe = plan.spec.hyper, plan.pipeline
    changes += [(("microbatches",), k) for k in _divisors(hyper.batch_size)
                if k > hyper.microbatches]
    changes += [(("mesh", "expert"), k) for k in _divisors(c.n_routed_experts)
                if k != m["expert"]]
    changes += [(("mesh", axis), k) for axis in ("pipeline", "data") for k in _divisors(devices)
                if k != m[axis] and (axis == "data" or k <= c.n_moe_layers)]
    if P > 1:
        per_step = hyper.batch_size // hyper.microbatches
        changes += [(("mesh", "pipeline_microbatches"), k) for k in _divisors(per_step)
                    if k != pipe.microbatches]
        changes += [(("mesh", "pipeline_schedule"), s) for s in pipeline.SCHEDULES
                    if s != pipe.schedule]
        if pipe.schedule == "circular":
            changes += [(("mesh", "pipeline_repeats"), k)
                        for k in range(2, c.n_moe_layers // P + 1) if k != pipe.repeats]
    return changes


def flag(path: tuple[str, ...], value) -> str:
    """The command-line override that sets `path` to `value`."""
    return f"--config.{'.'.join(path)}={value}"


def alternatives(cfg: config_dict.ConfigDict, devices: int, device_memory_gb: float,
                 backend: str = "gpu") -> list[tuple[str, Plan]]:
    """Single flag changes for a layout that does not fit or that the trainer refuses, with
    their plans, lowest total first: one per field, only what the trainer accepts (make_plan
    raises nothing and warns nothing) and, for a layout it accepts, only what lowers the total.
    Per field, the fitting value with the highest total (the least change that fits: fewest
    microbatches, smallest expert axis, the remat policy that keeps the most), or the lowest
    total when no value fits."""
    base = make_plan(cfg, devices, device_memory_gb, backend)
    by_field: dict[tuple[str, ...], list[tuple[str, Plan]]] = {}
    for path, value in flag_changes(base, backend):
        variant = cfg.copy_and_resolve_references()
        with variant.unlocked():
            functools.reduce(lambda node, key: node[key], path[:-1], variant)[path[-1]] = value
        try:
            plan = make_plan(variant, devices, device_memory_gb, backend)
        except ValueError:  # a mesh that cannot be built, a kernel that cannot run: refused
            continue
        if plan.warnings or not (base.warnings or plan.total < base.total):
            continue
        by_field.setdefault(path, []).append((flag(path, value), plan))
    picks = []
    for options in by_field.values():
        fitting = [o for o in options if o[1].fits]
        picks.append(max(fitting, key=lambda o: o[1].total) if fitting
                     else min(options, key=lambda o: o[1].total))
    return sorted(picks, key=lambda o: o[1].total)


def format_alternatives(plan: Plan, options: list[tuple[str, Plan]]) -> str:
    """What `python -m launch.plan` prints after a plan that does not fit or that the trainer
    refuses: the first SHOWN of `options` (from `alternatives`), each with its total."""
    limit = f"{HEADROOM * plan.device_memory / GB:.2f} GB"
    which = "the trainer accepts" if plan.warnings else "that lower it"
    if not options:
        return f"no single flag change {which}: change several at once, or add devices"
    shown = options[:SHOWN]
    width = max(len(f) for f, _ in shown)
    rows = [f"  {f:<{width}}  {p.total / GB:9.2f} GB  {'fits' if p.fits else 'does not fit'}"
            for f, p in shown]
    if shown[0][1].fits:
        return "\n".join([f"single flag changes {which} (per-device total; at most {limit} "
                          "fits):", *rows])
    return "\n".join([f"no single flag change fits (at most {limit} per device); the lowest "
                      "totals:", *rows, "combine several of them, or add devices"])


def format_plan(plan: Plan) -> str:
    """The report `python -m launch.plan` prints."""
    m, c = plan.mesh, plan.model
    counts = dsv3_jax.param_counts(dataclasses.replace(c, **SHAPE_NEUTRAL))
    devices = math.prod(m.values())

    def row(name: str, value: float, indent: int = 0) -> str:
        return f"{' ' * indent}{name:<{56 - indent}}{value / GB:9.2f}"

    moments = {"float32": "fp32", "bfloat16": "bf16"}[plan.spec.hyper.moments_dtype]
    if plan.fsdp:
        opt = "sharded with the parameters"
    elif m["data"] > 1:
        opt = f"ZeRO-1 over data={m['data']}"
    else:
        opt = "data=1: not split"
    lines = [
        f"model {c.n_dense_layers} dense + {c.n_moe_layers} MoE layers, {c.n_routed_experts} "
        f"experts: {counts['main'] / 1e9:.1f}B parameters ({counts['active'] / 1e9:.1f}B "
        f"active per token) + MTP {(counts['total_released'] - counts['main']) / 1e9:.1f}B "
        "as released",
        f"mesh pipeline={m['pipeline']} x data={m['data']} x expert={m['expert']} = {devices} "
        f"devices, fsdp={plan.fsdp}",
        "assumptions:",
        *(f"  - {a}" for a in plan.assumptions),
        "",
        f"{'per device':<56}{'GB':>9}",
        row("parameters (fp32)", plan.param_total),
        *(row(k, v, 2) for k, v in plan.params.items()),
        row(plan.gradients_label, plan.gradients),
        row(f"optimizer (AdamW mu+nu {moments}, {opt})", plan.optimizer),
        row("activations", sum(plan.activations.values())),
        row("saved for the backward", plan.activations["saved"], 2),
        row("working set (one layer, its weights, loss chunk)", plan.activations["working"], 2),
        row("total", plan.total),
        row("device memory", plan.device_memory),
    ]
    share = plan.total / plan.device_memory
    verdict = (f"fits: {share:.0%} of the device (a plan fits at <= {HEADROOM:.0%}: the rest is "
               "for XLA's own buffers)" if plan.fits else
               f"does NOT fit: {plan.total / GB:.1f} GB is {share:.0%} of the "
               f"{plan.device_memory / GB:.0f} GB device (at most {HEADROOM:.0%} is usable)")
    return "\n".join([*lines, verdict, *(f"warning: {w}" for w in plan.warnings)])


def main() -> None:
    """`python -m launch.plan`: flags are defined here, not on import, so tests can import the
    module beside launch.train (both define --config)."""
    jax.config.update("jax_platforms", "cpu")  # a plan never touches an accelerator
    config = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                             lock_config=True)
    devices = flags.DEFINE_integer("devices", None, "Devices of the job, all hosts together.")
    memory = flags.DEFINE_float("device_memory_gb", DEFAULT_DEVICE_MEMORY_GB,
                                "Memory of one device in GB (1e9 bytes); 141 for an H200.")
    backend = flags.DEFINE_enum("backend", "gpu", BACKENDS,
                                "The devices' kind: what model.attention_impl=auto runs.")
    flags.mark_flags_as_required(["config", "devices"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            plan = make_plan(config.value, devices.value, memory.value, backend.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(format_plan(plan))
        if plan.fits and not plan.warnings:
            return
        print(format_alternatives(plan, alternatives(config.value, devices.value, memory.value,
                                                     backend.value)))
        sys.exit(1)

    cli.run(run, config)


if __name__ == "__main__":
    main()
