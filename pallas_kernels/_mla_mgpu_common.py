"""Helpers shared by the Mosaic GPU (Hopper) MLA kernels.

Pallas Mosaic GPU runs one Pallas "thread" per warpgroup (128 CUDA threads). Our kernels use two
compute warpgroups and one memory warpgroup that issues TMA copies (FlashAttention-3 layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
# SMEM layout for bf16 tiles fed to wgmma: 8x64 tiles, 128-byte swizzle (64 bf16 per row chunk).
TILING = plgpu.TilingTransform((8, 64))
SWIZZLE = plgpu.SwizzleTransform(128)
TRANSFORMS = (TILING, SWIZZLE)
COMPUTE_REGS = 232  # setmaxnreg for the two compute warpgroups (2 * 232 + 40 fits 64K registers)
MEMORY_REGS = 40
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Dynamic shared memory one Hopper CTA may opt into (what Mosaic GPU checks against).
SMEM_LIMIT = 227 * 1024
# Mosaic GPU places each scratch buffer at a multiple of this (pallas/mosaic_gpu/core.py).
_SMEM_ALIGNMENT = 1024
# Shared memory Mosaic GPU adds to a kernel's own buffers (its count minus ours, from lowering
# these kernels for CUDA at many head dims: 2048 bytes, 992 in one case).
SMEM_RESERVED = 2048
WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # vector indexed by accumulator row
COLS = plgpu.Layout.WGMMA.reduce(0)  # vector indexed by accumulator column


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
