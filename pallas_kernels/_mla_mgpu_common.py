"""Helpers shared by the Mosaic GPU (Hopper) kernels: the MLA kernels, the grouped matmuls and the
expert-dispatch row kernels.

Pallas Mosaic GPU runs one Pallas "thread" per warpgroup (128 CUDA threads). The MLA kernels use
COMPUTE_WGS compute warpgroups and one memory warpgroup that issues TMA copies (FlashAttention-3
layout); `warp_specialized_kernel` builds them, `stream` is their memory warpgroup's loop.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
# SMEM layout for bf16 tiles fed to wgmma: 8x64 tiles, 128-byte swizzle (64 bf16 per row chunk).
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
COMPUTE_WGS = 2  # compute warpgroups of the MLA kernels (the few-rows decode kernel has one)
COMPUTE_REGS = 232  # setmaxnreg for the two compute warpgroups (2 * 232 + 40 fits 64K registers)
MEMORY_REGS = 40
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma operands the MLA kernels take as given
# Dynamic shared memory one Hopper CTA may opt into (what Mosaic GPU checks against).
SMEM_LIMIT = 227 * 1024
# Mosaic GPU places each scratch buffer at a multiple of this (pallas/mosaic_gpu/core.py).
_SMEM_ALIGNMENT = 1024
# Shared memory Mosaic GPU adds to a kernel's own buffers (its count minus ours, from lowering
# these kernels for CUDA at many head dims: 2048 bytes, 992 in one case).
SMEM_RESERVED = 2048
# Streaming multiprocessors of an H100 / H200: what `sm_count` assumes without a GPU.
HOPPER_SMS = 132
WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # vector indexed by accumulator row
COLS = plgpu.Layout.WGMMA.reduce(0)  # vector indexed by accumulator column


def sm_count() -> int:
    """SMs of the first device; HOPPER_SMS when lowering for CUDA from a host without a GPU
    (tests, ahead-of-time compiles), whose devices have no core_count."""
    return getattr(jax.devices()[0], "core_count", HOPPER_SMS)


def compute_dtype(dtype) -> jnp.dtype:
    """wgmma operand dtype: bf16/f16 as given; fp32 inputs are rounded to bf16 (fp32 accumulate)."""
    return jnp.dtype(dtype) if dtype in SUPPORTED_DTYPES else jnp.dtype(jnp.bfloat16)


def transposed(ref):
    """Transposed view of a [rows, cols] SMEM tile (wgmma reads it K-major)."""
    return ref.transpose((1, 0))


def mma_multi(groups: Sequence[tuple[Sequence[tuple], jax.Array | tuple[int, int]]], *,
              interpret: bool, between: Callable[[], None] | None = None) -> list[jax.Array]:
    """For each (terms, init) group: init + sum_i a_i @ b_i, in fp32 on the tensor cores.

    terms: pairs (a, b) with a an SMEM ref or a register array [M, K] and b an SMEM ref [K, N]
    (possibly a transposed view). init: an fp32 array [M, N] in the WGMMA layout, or the shape
    (M, N) of a zero accumulator. All wgmmas are issued before any is awaited; `between` runs in
    that window (the ping-pong schedule barrier, or waiting for the next tile).

    GPU interpret mode simulates wgmma only with both operands in SMEM and does not evaluate
    pl.run_state, so there the same products are formed with jnp.dot on the loaded operands (the
    same bf16 operands, fp32 accumulation). Interpret-mode tests thus check everything else in the
    kernels (pipelining, barriers, indexing, masking, softmax) against the reference; the wgmma
    path itself is checked by lowering for CUDA on CPU and on the GPU.
    """
    if interpret:
        outs = []
        for terms, init in groups:
            out = None
            for a, b in terms:
                a_val = a if isinstance(a, jax.Array) else a[...]
                # bf16 products are exact in fp32 (the CPU runtime has no bf16 x bf16 -> f32 dot).
                prod = jnp.dot(a_val.astype(jnp.float32), b[...].astype(jnp.float32),
                               precision=lax.Precision.HIGHEST)
                out = prod if out is None else out + prod
            outs.append(out if isinstance(init, tuple) else init + out)
        if between is not None:
            between()
        return outs

    def issue(acc_refs):
        for (terms, _), acc_ref in zip(groups, acc_refs, strict=True):
            for a, b in terms:
                plgpu.wgmma(acc_ref, a, b)
        if between is not None:
            between()

    if all(isinstance(init, tuple) for _, init in groups):
        def scoped(*acc_refs):
            issue(acc_refs)
            return [r[...] for r in acc_refs]
        return list(pl.run_scoped(scoped, *[plgpu.ACC(init, jnp.float32) for _, init in groups]))
    inits = [wgmma_zeros(init) if isinstance(init, tuple) else init for _, init in groups]
    return list(pl.run_state(issue)(tuple(plgpu.ACC.init(x) for x in inits)))


def mma(terms: Sequence[tuple], init: jax.Array | tuple[int, int], *, interpret: bool,
        between: Callable[[], None] | None = None) -> jax.Array:
    """init + sum_i a_i @ b_i for one accumulator (see mma_multi)."""
    return mma_multi([(terms, init)], interpret=interpret, between=between)[0]


def wgmma_zeros(shape: tuple[int, ...]) -> jax.Array:
    """fp32 zeros in the WGMMA register layout (rows split across the warpgroup)."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA)


def row_vector(value: float, n: int) -> jax.Array:
    """[n] fp32 vector indexed by accumulator row (layout of a row reduction)."""
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), ROWS)


def smem_bytes(scratch: dict) -> int:
    """Shared memory of a kernel's scratch dict (plgpu.SMEM buffers, barriers; None skipped),
    placed as Mosaic GPU places them: each buffer at a 1024-byte boundary, 8 bytes a barrier."""
    total = SMEM_RESERVED
    for buf in scratch.values():
        if isinstance(buf, plgpu.Barrier):
            total += 8 * math.prod(buf.num_barriers)
        elif buf is not None:
            total += smem_aligned(math.prod(buf.shape) * jnp.dtype(buf.dtype).itemsize)
    return total


def smem_aligned(nbytes: int) -> int:
    """Bytes one SMEM buffer of nbytes takes (Mosaic starts each at a 1024-byte boundary)."""
    return -(-nbytes // _SMEM_ALIGNMENT) * _SMEM_ALIGNMENT


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
    """interpret: False, True, or plgpu.InterpretGPUParams (e.g. with detect_races=True)."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


def tma_barrier(*copies, num_barriers: int = 1) -> plgpu.Barrier:
    """Barrier(s) that complete once one TMA copy into each of `copies` has landed: the SMEM
    buffers a loader fills per phase, a buffer listed once per copy into it (None, a buffer not
    allocated, is not copied)."""
    return plgpu.Barrier(num_arrivals=sum(c is not None for c in copies),
                         num_barriers=num_barriers)


def warp_specialized_kernel(body: Callable, gmem: Callable, scratch: dict, *, out_type, grid,
                            grid_names, compute_wgs: int, kernel_name: str, interpret):
    """plgpu.kernel of `compute_wgs` compute warpgroups and one memory warpgroup (axis "wg",
    the memory one last) with fast approximate math, calling body(gmem(*refs), smem).

    gmem packs the kernel's GMEM refs (inputs, then outputs; a NamedTuple class); smem holds the
    scratch refs by name, None for the entries of `scratch` that are None (not allocated).
    interpret: as for `interpret_params`.
    """
    missing = {k: None for k, s in scratch.items() if s is None}

    def kernel(*refs, **smem):
        body(gmem(*refs), types.SimpleNamespace(**smem, **missing))

    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types={k: s for k, s in scratch.items() if s is not None},
        grid=grid,
        grid_names=grid_names,
        num_threads=compute_wgs + 1,
        thread_name="wg",
        kernel_name=kernel_name,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )


def stream(n_steps, stages: int, *loads: tuple[Callable, object]) -> None:
    """Memory warpgroup: for steps [0, n_steps) issue each load(step, slot) through a ring of
    `stages` slots, waiting for its free barriers (one per slot, released by the compute
    warpgroups) before refilling a slot. loads: (load, free_bars) pairs, issued in order."""
    for i in range(stages):
        @pl.when(i < n_steps)
        def _prologue(i=i):
            for load, _ in loads:
                load(i, i)

    @pl.loop(stages, jnp.maximum(n_steps, stages))
    def _steady(i):
        slot = lax.rem(i, jnp.int32(stages))
        for load, free_bars in loads:
            plgpu.barrier_wait(free_bars.at[slot])
            load(i, slot)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _tail(i):  # observe the last releases too (every mbarrier phase gets awaited)
        slot = lax.rem(i, jnp.int32(stages))
        for _, free_bars in loads:
            plgpu.barrier_wait(free_bars.at[slot])


def persistent_kernel(body: Callable, *, out_type, num_sms: int, scratch_types=(),
                      num_threads: int | None = None, kernel_name: str | None = None):
    """plgpu.kernel on a persistent grid of num_sms CTAs (axis "sm"), warpgroup semantics
    (pipelines from plgpu.emit_pipeline*); num_threads warpgroups (axis "wg") when given."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch_types,
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=num_threads,
        thread_name=None if num_threads is None else "wg",
        kernel_name=kernel_name,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
