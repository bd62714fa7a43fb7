"""Compile our Mosaic TPU kernels for real TPU targets on a host without a TPU.

libtpu (the `tpu` extra) builds compile-only TPU devices of a named topology on any host
(`dsv3_jax.parallel.tpu_targets`); XLA:TPU and Mosaic TPU compile for them as for a real chip.
So a kernel that compiles here passed Mosaic's checks (block shapes, layouts, dtypes, VMEM) for
that chip, which interpret mode (the CPU tests) never runs.

  report = compile_for(fn, arg_specs, "v5p:1x1x1")   # a KernelReport
  vmem_of(compiled.as_text())                          # VMEM bytes of each Mosaic kernel call

What a report holds, and where each figure comes from:
  vmem_bytes   per `tpu_custom_call` (one per Mosaic kernel in the HLO), the scoped VMEM Mosaic
               allocated for it: its backend_config's used_scoped_memory_configs, memory space 1
  flops, bytes_accessed   XLA's `cost_analysis()`. XLA counts the ops around a kernel; a kernel
               itself counts only through the `pl.CostEstimate` it passes (ours do), so these are
               estimates, not measurements
  model_flops  the matmul FLOPs of the math, from the shapes (see each case)
  temp_bytes   `memory_analysis()`: HBM scratch of the whole program (XLA's intermediates)
  vmem_capacity  `pltpu.get_tpu_info()` of the target: VMEM per TensorCore (jax._src.tpu_info:
               v5p 64 MiB, v6e 128 MiB)

KERNEL_CASES: the kernels at DeepSeek-V3 and Moonlight shapes (one device's share: see
`_SHAPES`), each with the XLA implementation of the same op for comparison
(benchmarks/tpu_kernels.py prints them; tests/test_tpu_kernel_compile.py compiles smaller ones).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import expert_dispatch, grouped_matmul, mla_attention, mla_decode

PALLAS_TPU = "pallas_tpu"
# Mosaic's scoped VMEM lives in memory space 1 of a tpu_custom_call's backend_config.
_VMEM_SPACE = "1"


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """One program compiled for one TPU topology (see the module docstring for each figure)."""

    name: str
    topology: str
    vmem_bytes: tuple[int, ...]  # per tpu_custom_call, in HLO order
    flops: float
    bytes_accessed: float
    temp_bytes: int
    compile_s: float
    vmem_capacity: int
    model_flops: float = 0.0
    kernel_ops: tuple[str, ...] = ()  # op_name of each tpu_custom_call
    error: str | None = None  # the compiler's refusal, when it refused

    @property
    def pallas_vmem_bytes(self) -> tuple[int, ...]:
        """VMEM of our kernels only (not XLA's own Mosaic kernels, see `mosaic_calls`)."""
        return tuple(v for op, v in zip(self.kernel_ops, self.vmem_bytes, strict=True)
                     if op.endswith("pallas_call"))


def mosaic_calls(hlo_text: str) -> list[tuple[str, int]]:
    """(op_name, scoped VMEM bytes) of each `tpu_custom_call` in compiled HLO text, in order.

    Ours have op names ending in "pallas_call"; XLA:TPU emits Mosaic kernels of its own too
    (`lax.ragged_dot` becomes "ragged-dot-*" calls).
    """
    calls = []
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        start = line.index("backend_config=") + len("backend_config=")
        config, _ = json.JSONDecoder().raw_decode(line[start:])
        vmem = sum(int(c["size"]) for c in config.get("used_scoped_memory_configs", [])
                   if c.get("memory_space") == _VMEM_SPACE)
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls.append((op_name.group(1) if op_name else "", vmem))
    return calls


def vmem_of(hlo_text: str) -> list[int]:
    """Scoped VMEM bytes of each `tpu_custom_call` in compiled HLO text, in order."""
    return [vmem for _, vmem in mosaic_calls(hlo_text)]


@functools.cache
def target_devices(topology: str, num_slices: int = 1) -> list:
    """libtpu's compile-only devices of `num_slices` slices of `topology` (libtpu's name,
    `v5p:2x2x1`; `dsv3_jax.parallel.tpu_targets` maps Cloud names onto it). A one-chip slice
    needs chips_per_host_bounds, as three integers for every generation."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ValueError("compiling for a TPU needs libtpu: pip install -e '.[tpu]'") from e
    shape = [int(s) for s in topology.split(":")[1].split("x")]
    kwargs = {"chips_per_host_bounds": [1, 1, 1]} if math.prod(shape) == 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            num_slices=num_slices, **kwargs)
    except Exception as e:  # libtpu's own refusal (a shape the generation does not build)
        slices = f" x {num_slices} slices" if num_slices > 1 else ""
        raise ValueError(f"libtpu cannot build TPU topology {topology!r}{slices}: {e}") from e
    return list(desc.devices)


def _one_device_mesh(topology: str) -> jax.sharding.Mesh:
    devices = target_devices(topology)
    return jax.sharding.Mesh(np.array(devices[:1]).reshape(1), ("x",))


def vmem_capacity(topology: str) -> int:
    """VMEM bytes of one TensorCore of `topology`'s chip (`pltpu.get_tpu_info`)."""
    return chip_of(topology).vmem_bytes


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's peak rates (all its TensorCores), from `pltpu.get_tpu_info`."""

    bf16_flops_per_s: float
    hbm_bytes_per_s: float
    vmem_bytes: int  # per TensorCore: what one kernel instance may use

    def roofline_s(self, flops: float, bytes_accessed: float) -> float:
        """The larger of compute time at peak and HBM time at full bandwidth."""
        return max(flops / self.bf16_flops_per_s, bytes_accessed / self.hbm_bytes_per_s)


def chip_of(topology: str) -> Chip:
    """The Chip of `topology`'s generation."""
    from jax.experimental.pallas import tpu as pltpu

    with jax.sharding.use_abstract_mesh(_one_device_mesh(topology).abstract_mesh):
        info = pltpu.get_tpu_info()
    return Chip(bf16_flops_per_s=info.bf16_ops_per_second * info.num_cores,
                hbm_bytes_per_s=info.mem_bw_bytes_per_second * info.num_cores,
                vmem_bytes=info.vmem_capacity_bytes)


def cost_of(compiled) -> tuple[float, float]:
    """(flops, bytes accessed) of a compiled program from XLA's cost analysis."""
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def compile_for(fn: Callable, arg_specs: Sequence[jax.ShapeDtypeStruct], topology: str, *,
                name: str = "", model_flops: float = 0.0) -> KernelReport:
    """jit(fn) compiled for one chip of `topology` (libtpu's name, e.g. "v5p:1x1x1", "v6e:1x1").

    Traced under the target's abstract mesh: the kernels read the TPU generation while tracing.
    Raises what the compiler raises (see `try_compile_for` for a report instead).
    """
    mesh = _one_device_mesh(topology)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated) for s in arg_specs]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        seconds = time.perf_counter() - start
    flops, bytes_accessed = cost_of(compiled)
    memory = compiled.memory_analysis()
    calls = mosaic_calls(compiled.as_text())
    return KernelReport(name=name, topology=topology, vmem_bytes=tuple(v for _, v in calls),
                        kernel_ops=tuple(op for op, _ in calls),
                        flops=flops, bytes_accessed=bytes_accessed,
                        temp_bytes=int(memory.temp_size_in_bytes) if memory else 0,
                        compile_s=seconds, vmem_capacity=vmem_capacity(topology),
                        model_flops=model_flops)


def try_compile_for(fn, arg_specs, topology: str, *, name: str = "",
                    model_flops: float = 0.0) -> KernelReport:
    """`compile_for`, with a refusal (out of HBM, a Mosaic error) reported in `error`."""
    try:
        return compile_for(fn, arg_specs, topology, name=name, model_flops=model_flops)
    except Exception as e:  # the compiler's message is the result
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return KernelReport(name=name, topology=topology, vmem_bytes=(), flops=0.0,
                            bytes_accessed=0.0, temp_bytes=0, compile_s=0.0,
                            vmem_capacity=vmem_capacity(topology), model_flops=model_flops,
                            error=first[:300])


# ---------------------------------------------------------------------------------------------
# Cases: the model's kernels at DeepSeek-V3 and Moonlight shapes (one device's share).


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One device's share of a model's kernel operands.

    MoE: `rows` expert-sorted token-rows over `experts` local experts (expert parallelism splits
    the routed experts); attention: batch x seq_len with all `heads`; decode: `decode_batch`
    sequences of `cache_len` cached tokens, one new token each.
    """

    name: str
    dim: int  # D
    moe_inter_dim: int  # F
    experts: int  # local experts G
    rows: int  # M = tokens x top-k routed to this device
    heads: int  # N
    batch: int
    seq_len: int
    decode_batch: int
    cache_len: int
    qk_nope: int = 128
    qk_rope: int = 64
    v_dim: int = 128
    kv_lora_rank: int = 512
    new_tokens: int = 1

    def scaled(self, **changes) -> Shapes:
        return dataclasses.replace(self, **changes)


# DeepSeek-V3 671B: 256 experts over 8-way expert parallelism = 32 local; 4096 tokens x top-8.
# Moonlight 16B-A3B: all 64 experts local; 4096 tokens x top-6.
SHAPES = {
    "deepseek_v3": Shapes("deepseek_v3", dim=7168, moe_inter_dim=2048, experts=32,
                          rows=4096 * 8, heads=128, batch=1, seq_len=4096, decode_batch=64,
                          cache_len=4096),
    "moonlight": Shapes("moonlight", dim=2048, moe_inter_dim=1408, experts=64, rows=4096 * 6,
                        heads=16, batch=2, seq_len=4096, decode_batch=64, cache_len=4096),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: `build(implementation)` -> (fn, arg specs); `flops` from shapes."""

    name: str
    shapes: Shapes
    build: Callable[[str], tuple[Callable, list[jax.ShapeDtypeStruct]]]
    flops: float
    xla_implementation: str = "xla"

    def compile(self, topology: str, implementation: str = PALLAS_TPU) -> KernelReport:
        fn, specs = self.build(implementation)
        return try_compile_for(fn, specs, topology, name=self.name, model_flops=self.flops)


def _spec(shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _with_grad(forward: Callable, n_diff: int) -> Callable:
    """fn(*args, ct) -> (out, grads of the first n_diff args): the forward and its backward."""
    def fn(*args_and_ct):
        *args, ct = args_and_ct
        out, vjp = jax.vjp(lambda *d: forward(*d, *args[n_diff:]), *args[:n_diff])
        return out, vjp(ct.astype(out.dtype))
    return fn


def gmm_case(s: Shapes, *, backward: bool) -> Case:
    """grouped_matmul x[M, D] @ w_gate[G, D, F] ("mm"; backward: d_x with the weights read
    transposed, d_w with tgmm). FLOPs 2 M D F forward, 3x with the backward."""
    M, D, F, G = s.rows, s.dim, s.moe_inter_dim, s.experts

    def build(impl):
        def forward(x_md, w_gdf, sizes_g):
            if impl == "xla":
                return grouped_matmul.xla(x_md, w_gdf, sizes_g)
            return grouped_matmul.pallas(x_md, w_gdf, sizes_g, implementation=impl)

        specs = [_spec((M, D)), _spec((G, D, F)), _spec((G,), jnp.int32)]
        if not backward:
            return forward, specs
        return _with_grad(forward, 2), [*specs, _spec((M, F))]

    flops = 2 * M * D * F * (3 if backward else 1)
    return Case(f"gmm {'fwd+bwd' if backward else 'fwd'}", s, build, flops)


def experts_case(s: Shapes) -> Case:
    """The model's MoE expert block forward+backward (expert_dispatch.experts_swiglu): fused
    gate/up + SwiGLU, down projection, then d_x (fused over gate and up) and three tgmm weight
    gradients. FLOPs 6 M D F forward, 18 M D F with the backward."""
    M, D, F, G = s.rows, s.dim, s.moe_inter_dim, s.experts

    def build(impl):
        def forward(x_md, wg_gdf, wu_gdf, wd_gfd, sizes_g):
            return expert_dispatch.experts_swiglu(x_md, sizes_g, wg_gdf, wu_gdf, wd_gfd,
                                                  implementation=impl)

        specs = [_spec((M, D)), _spec((G, D, F)), _spec((G, D, F)), _spec((G, F, D)),
                 _spec((G,), jnp.int32), _spec((M, D), jnp.float32)]
        return _with_grad(forward, 4), specs

    return Case("experts fwd+bwd", s, build, 18 * M * D * F)


def attention_case(s: Shapes, *, backward: bool) -> Case:
    """Causal MLA training attention with packed-document segment ids. FLOPs (as
    benchmarks/mla_attention.py): forward B T^2 N (Hn + Hr + Hv) (causal half), 3.5x with the
    backward."""
    B, T, N = s.batch, s.seq_len, s.heads
    Hn, Hr, Hv = s.qk_nope, s.qk_rope, s.v_dim
    scale = (Hn + Hr) ** -0.5

    def build(impl):
        def forward(q_nope, q_rope, k_nope, k_rope, v, segment_ids):
            return mla_attention.mla_attention(q_nope, q_rope, k_nope, k_rope, v, segment_ids,
                                               scale=scale, implementation=impl)

        specs = [_spec((B, T, N, Hn)), _spec((B, T, N, Hr)), _spec((B, T, N, Hn)),
                 _spec((B, T, Hr)), _spec((B, T, N, Hv)), _spec((B, T), jnp.int32)]
        if not backward:
            return forward, specs
        return _with_grad(forward, 5), [*specs, _spec((B, T, N, Hv))]

    flops = B * T * T * N * (Hn + Hr + Hv) * (3.5 if backward else 1)
    return Case(f"attention {'fwd+bwd' if backward else 'fwd'}", s, build, flops)


def decode_case(s: Shapes) -> Case:
    """Absorbed MLA decode, one new token per sequence over a full cache. FLOPs
    2 B Tq N L (R + Hr) + 2 B Tq N L R."""
    B, Tq, N, L = s.decode_batch, s.new_tokens, s.heads, s.cache_len
    R, Hr = s.kv_lora_rank, s.qk_rope
    scale = (s.qk_nope + Hr) ** -0.5

    def build(impl):
        def fn(q_latent, q_rope, kv_cache, lengths):
            return mla_decode.mla_decode(q_latent, q_rope, kv_cache, lengths, scale=scale,
                                         implementation=impl)

        return fn, [_spec((B, Tq, N, R)), _spec((B, Tq, N, Hr)), _spec((B, L, R + Hr)),
                    _spec((B,), jnp.int32)]

    return Case("decode", s, build, 2 * B * Tq * N * L * (2 * R + Hr))


def cases_of(s: Shapes) -> list[Case]:
    """Every kernel case at one shape."""
    return [gmm_case(s, backward=False), gmm_case(s, backward=True), experts_case(s),
            attention_case(s, backward=False), attention_case(s, backward=True), decode_case(s)]


KERNEL_CASES: dict[str, list[Case]] = {name: cases_of(s) for name, s in SHAPES.items()}
