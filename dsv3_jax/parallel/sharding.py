"""Device meshes and the one logical-axis table (STYLE.md pattern 1).

Mesh axes: `pipeline` (layer stages), `data` (batch; ZeRO-1 optimizer sharding; optional full
parameter sharding), `expert` (routed experts; the batch is split over data x expert too).
Every parameter, activation and `shard_map` spec comes from `RULES` through `spec` (or
`Parallel.spec`, which maps "batch" to the axes the rows are split over where it is called).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel.pipeline import PipelineSpec

MESH_AXES = ("pipeline", "data", "expert")
BATCH_AXES = ("data", "expert")

# logical axis -> mesh axis (or axes). Names not listed are replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "experts": "expert",
    "moe_layers": "pipeline",  # the MoE stack is what the pipeline splits into stages
    "fsdp": "data",  # a weight's FSDP_AXES name maps here when parameters are fully sharded
}
# Fully sharded parameters split each weight's first of these over `data`: the model width, or
# for the MLA up-projections that have none (wq_b [q_lora, heads, head_dim], wkv_b [kv_lora,
# ...]: 12.6 GB of fp32 per device for deepseek_v3_671b, replicated otherwise) the latent rank.
FSDP_AXES = ("embed", "q_lora", "kv_lora")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """What the model needs to know about the layout (a hashable module attribute)."""

    mesh: Mesh
    fsdp: bool = False  # shard parameters (not only optimizer state) over `data`
    capacity_factor: float = 1.25  # expert all-to-all rows per round / balanced rows
    pipeline: PipelineSpec | None = None  # stages > 1: the MoE stack is pipelined
    # Mesh axes the token rows are split over where the MoE runs; inside pipeline stages the
    # `pipeline` axis is taken by the stages themselves.
    batch_axes: tuple[str, ...] = BATCH_AXES

    def inside_stages(self) -> Parallel:
        return dataclasses.replace(self, batch_axes=BATCH_AXES)

    def spec(self, *logical: str | None) -> PartitionSpec:
        """The PartitionSpec of logical axes here: `RULES`, with "batch" over `batch_axes` and
        a weight's first FSDP_AXES name over `data` when parameters are fully sharded (fsdp)."""
        return spec(logical, self.fsdp, batch_axes=self.batch_axes)

    @property
    def expert_size(self) -> int:
        return self.mesh.shape["expert"]

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"]


def resolve_mesh_shape(pipeline: int, data: int, expert: int, n_devices: int) -> tuple:
    """(pipeline, data, expert) with one -1 replaced by the devices left; clear errors."""
    sizes = {"pipeline": pipeline, "data": data, "expert": expert}
    free = [k for k, v in sizes.items() if v == -1]
    bad = {k: v for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)}
    if bad:
        raise ValueError(f"mesh sizes must be positive integers or -1, got {bad}")
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1 (the devices left), got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"mesh: {n_devices} devices do not divide into "
                f"{' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed}; "
                f"choose sizes whose product divides {n_devices}")
        sizes[free[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if total != n_devices:
        raise ValueError(
            f"mesh pipeline={sizes['pipeline']} x data={sizes['data']} x "
            f"expert={sizes['expert']} = {total} devices, but {n_devices} are available; "
            f"set one axis to -1 (e.g. --config.mesh.data=-1) or make the product {n_devices}")
    return sizes["pipeline"], sizes["data"], sizes["expert"]


def make_mesh(pipeline: int = 1, data: int = -1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(pipeline, data, expert, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        return Mesh(_multi_slice_grid(shape, devices, slices), MESH_AXES, axis_types=auto)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # A mesh axis that is no product of whole torus axes (expert=64 on a 16x16 v6e slice):
        # split a physical axis between two mesh axes, as mesh_utils allows when asked.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def _multi_slice_grid(shape: tuple[int, int, int], devices, slices: int):
    """Devices of several TPU slices (joined by the data-center network, DCN) laid out so that
    only `data` crosses slices: each slice holds whole expert groups and pipeline stages, and
    only the data-parallel gradient reduction goes over DCN."""
    pipeline, data, expert = shape
    if data % slices:
        raise ValueError(f"mesh data={data} must be a multiple of the {slices} slices (only the "
                         f"data axis spans slices), e.g. --config.mesh.data={slices}")
    return mesh_utils.create_hybrid_device_mesh(
        (pipeline, data // slices, expert), (1, slices, 1), devices,
        allow_split_physical_axes=True)


def check_fits(model: ModelConfig, mesh_shape: dict[str, int], batch_size: int,
               microbatches: int) -> None:
    """Refuse a model or batch that does not divide over the mesh, saying what would fit."""
    p, d, e = mesh_shape["pipeline"], mesh_shape["data"], mesh_shape["expert"]
    if model.n_routed_experts % e:
        fits = [k for k in range(1, model.n_routed_experts + 1) if model.n_routed_experts % k == 0]
        raise ValueError(f"mesh expert={e} does not divide n_routed_experts="
                         f"{model.n_routed_experts}; expert sizes that fit: {fits}")
    if p > 1 and model.n_moe_layers < p:
        raise ValueError(f"mesh pipeline={p} exceeds the {model.n_moe_layers} MoE layers to split "
                         "into stages")
    per_step, rows = batch_size // microbatches, p * d * e
    if batch_size % microbatches or per_step % rows:
        raise ValueError(
            f"batch_size={batch_size} / microbatches={microbatches} = {batch_size / microbatches:g}"
            f" sequences per microbatch must divide over pipeline x data x expert = {rows} "
            f"devices; e.g. batch_size={rows * microbatches * max(1, per_step // rows)}")


def per_row_shard(fn: Callable, parallel: Parallel, *arrays: jax.Array | None):
    """fn(*arrays) run on each device's rows (a `shard_map` over the batch axes, every array
    split on its leading batch axis, None passed through): a Pallas kernel is a custom call that
    XLA cannot partition ("Mosaic kernels cannot be automatically partitioned"), so on a mesh
    it runs per shard. fn must act on rows independently and return one batch-leading array."""
    present = [i for i, a in enumerate(arrays) if a is not None]

    def local(*shards):
        full = list(arrays)
        for i, shard in zip(present, shards, strict=True):
            full[i] = shard
        return fn(*full)

    def rows(a):
        return parallel.spec("batch", *([None] * (a.ndim - 1)))

    given = [arrays[i] for i in present]
    out = jax.eval_shape(fn, *arrays)
    return jax.shard_map(local, mesh=parallel.mesh, in_specs=tuple(rows(a) for a in given),
                         out_specs=rows(out), check_vma=False)(*given)


def rows_divide(parallel: Parallel, n_rows: int) -> bool:
    """Whether `n_rows` split evenly over the batch axes."""
    return n_rows % math.prod(parallel.mesh.shape[a] for a in parallel.batch_axes) == 0


def constrain_rows(parallel: Parallel | None, x: jax.Array) -> jax.Array:
    """`x` [rows, ...] pinned to rows over the batch axes, the rest replicated: the layout of
    every activation between the embedding and the stacks, so that XLA does not pick another
    one around a gathered weight. Unchanged without a mesh or when the rows do not divide
    (a decode batch of one)."""
    if parallel is None or not rows_divide(parallel, x.shape[0]):
        return x
    rows = parallel.spec("batch", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(parallel.mesh, rows))


def spec(logical: Sequence[str | None], fsdp: bool = False,
         batch_axes: tuple[str, ...] = BATCH_AXES) -> PartitionSpec:
    """The PartitionSpec of a tuple of logical names; a mesh axis may appear only once. With
    fsdp a weight's first `FSDP_AXES` name goes over `data`."""
    mesh_axes, used = [], set()
    sharded = next((n for n in logical if n in FSDP_AXES), None) if fsdp else None
    for name in logical:
        target = RULES.get(name) if name is not None else None
        if name is not None and name == sharded:
            target = RULES["fsdp"]
        if name == "batch":
            target = batch_axes
        names = () if target is None else (target,) if isinstance(target, str) else target
        clash = used.intersection(names)
        if clash:
            raise ValueError(f"logical axes {tuple(logical)} map mesh axis {sorted(clash)} twice")
        used.update(names)
        mesh_axes.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return PartitionSpec(*mesh_axes)


def variable_shardings(abstract_variables, mesh: Mesh, fsdp: bool = False):
    """NamedShardings of every variable from its logical axes (boxed abstract variables)."""
    logical = nn.get_partition_spec(abstract_variables)
    shapes = nn.meta.unbox(abstract_variables)

    def one(names, shape):
        s = spec(tuple(names), fsdp)
        return NamedSharding(mesh, _drop_indivisible(s, shape.shape, mesh))

    return jax.tree.map(one, logical, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def zero1(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of an optimizer-state leaf: its parameter's, plus `data` on the first free
    dimension that divides (ZeRO-1); unchanged when `data` is already used or nothing divides."""
    mesh, parts = sharding.mesh, list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    used = {a for p in parts if p is not None for a in ((p,) if isinstance(p, str) else p)}
    n = mesh.shape["data"]
    if "data" in used or n == 1:
        return sharding
    for i, (part, size) in enumerate(zip(parts, shape, strict=True)):
        if part is None and size % n == 0:
            parts[i] = "data"
            return NamedSharding(mesh, PartitionSpec(*parts))
    return sharding


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings):
    """Shardings of tx.init(params): parameter-like leaves get `zero1`, the rest replicate."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    with_params = optax.tree_utils.tree_map_params(
        tx, lambda _, s, a: zero1(s, a.shape), abstract_state, param_shardings, abstract_params,
        transform_non_params=lambda _: replicated)
    return with_params


def _drop_indivisible(s: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """A dimension the mesh axes do not divide is replicated (e.g. 3 dense layers over 2 data
    shards), except `pipeline`: an MoE stack of L layers that P stages do not divide (uneven
    stages) is split over `pipeline` on its largest free dimension that P divides instead, so
    each stage still stores 1/P of it; dsv3_jax.parallel.pipeline gathers each stage's layers."""
    sizes = mesh.shape
    parts = list(s) + [None] * (len(shape) - len(s))
    displaced = []
    for i, (part, size) in enumerate(zip(parts, shape, strict=True)):
        axes = () if part is None else (part,) if isinstance(part, str) else part
        n = int(np.prod([sizes[a] for a in axes])) if axes else 1
        if size % n:
            parts[i] = None
            displaced += [a for a in axes if a == "pipeline"]
    for axis in displaced:
        free = [i for i, p in enumerate(parts) if p is None and shape[i] % sizes[axis] == 0]
        if free:
            parts[max(free, key=lambda i: shape[i])] = axis
    return PartitionSpec(*parts)
