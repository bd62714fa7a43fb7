"""Mosaic GPU companion kernels of the expert dispatch: row gather and weighted gather-combine.

Legend: T tokens, K experts per token, M = T*K token-rows (sorted by expert), D model dim.

  gather_rows(x[T, D], src[M]) -> out[M, D],         out[m] = x[src[m]]
  combine_rows(y[M, D], inv[T, K], w[T, K] | None) -> out[T, D],
                                                     out[t] = sum_k w[t, k] * y[inv[t, k]]

Both are bandwidth-bound and read each row once with TMA copies of whole rows (or 8-row chunks
of a row viewed as an R x C tile, C <= 256: TMA boxes are at most 256 wide) into a ring of
shared-memory stages; each SM owns a contiguous range of output rows. The combine accumulates
in fp32 and writes each token once: no [T*K, D] intermediate is scattered or re-read. Plain-JAX
versions with the same signatures sit beside them (the TPU path and the tests use them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _gmm_gpu
from pallas_kernels._mla_mgpu_common import (
    SMEM_LIMIT,
    SMEM_RESERVED,
    persistent_kernel,
    smem_aligned,
)

# Bytes of one pipeline stage; whole rows are used when they fit.
_STAGE_BYTES = 32 * 1024


def gather_rows_reference(x_td: jax.Array, src_m: jax.Array) -> jax.Array:
    """[T, D], [M] -> [M, D]: out[m] = x[src[m]]."""
    return jnp.take(x_td, src_m, axis=0)


def combine_rows_reference(y_md: jax.Array, inv_tk: jax.Array, w_tk: jax.Array | None,
                           out_dtype) -> jax.Array:
    """[M, D], [T, K], [T, K] -> [T, D]: out[t] = sum_k w[t, k] * y[inv[t, k]] (fp32 sum).

    Written as gather-then-reduce so that XLA fuses the gather into the reduction.
    """
    y_tkd = jnp.take(y_md, inv_tk, axis=0).astype(jnp.float32)
    if w_tk is not None:
        y_tkd = y_tkd * w_tk.astype(jnp.float32)[..., None]
    return y_tkd.sum(axis=1).astype(out_dtype)


def row_view(D: int) -> tuple[int, int] | None:
    """(R, C) with R * C = D to view a row as an R x C tile, or None when D has none: TMA boxes
    hold at most 256 per dimension, R must be a multiple of 8 (whole 8-row swizzle tiles) or
    below 8, and a pipeline step's chunk (8 rows of C, or all R rows when R < 8) must hold a
    multiple of 128 elements, one vector per thread of the warpgroup (Mosaic GPU's layout
    inference finds none otherwise: D = 64 as 1 x 64, 192 as 3 x 64, 160 as 5 x 32 all fail)."""
    for c in (256, 128, 64, 32, 16):
        r = D // c
        if D % c or r > 256:
            continue
        if (r % 8 == 0 and (8 * c) % 128 == 0) or (r < 8 and (r * c) % 128 == 0):
            return r, c
    return None


def _rows_per_step(R: int, C: int, rows_in_flight: int, itemsize: int) -> int:
    """Largest multiple-of-8 divisor of R (or R itself if R < 8) that keeps a stage small."""
    if R < 8:
        return R
    best = 8
    for rb in range(8, R + 1, 8):
        if R % rb == 0 and rows_in_flight * rb * C * itemsize <= _STAGE_BYTES:
            best = rb
    return best


def _view(D: int) -> tuple[int, int]:
    view = row_view(D)
    if view is None:
        raise ValueError(f"row kernels: D={D} has no row view ({rows_unsupported(D, 1)})")
    return view


def _pipeline_smem(n_inputs: int, stages: int, rb: int, C: int, in_itemsize: int,
                   out_itemsize: int) -> int:
    """Shared memory of gather/combine: `stages` slots of n_inputs [rb, C] blocks plus the
    double-buffered output chunk, placed as `_mla_mgpu_common.smem_bytes` places buffers."""
    return (SMEM_RESERVED + stages * n_inputs * smem_aligned(rb * C * in_itemsize)
            + smem_aligned(2 * rb * C * out_itemsize))


GATHER_STAGES = 4
COMBINE_STAGES = 3


def rows_unsupported(D: int, K: int, itemsize: int = 4) -> str | None:
    """Why gather_rows / combine_rows cannot move rows of D values with K rows per token in
    `itemsize`-byte elements (fp32 is the widest the dispatch passes); None when they can."""
    view = row_view(D)
    if view is None:
        return (f"dim={D} has no R x C row view (C <= 256 a multiple of 16, R a multiple of 8 "
                "or below 8, chunks of a multiple of 128 elements): multiples of 256 have one")
    R, C = view
    rb = _rows_per_step(R, C, K, itemsize)
    used = _pipeline_smem(K, COMBINE_STAGES, rb, C, itemsize, itemsize)
    if used > SMEM_LIMIT:
        return (f"combining {K} rows per token of dim={D} needs {used} bytes of shared memory, "
                f"above the {SMEM_LIMIT} a Hopper CTA has")
    return None


def _row_range(M: int, nsm: int):
    chunk = -(-M // nsm)
    sm = lax.axis_index("sm")
    r0 = sm * chunk
    return r0, jnp.clip(M - r0, 0, chunk)


def _out_staging(rb: int, C: int, dtype) -> plgpu.SMEM:
    """The double-buffered output chunk `_store_chunk` writes through (see `_pipeline_smem`)."""
    return plgpu.SMEM((2, rb, C), dtype)


def _store_chunk(o_smem, val, o_gmem, j, row0, n_c, rb):
    """Step j of a pipeline: write val (rb-row chunk j % n_c of row row0 + j // n_c of the
    [rows, R, C] output) through a double-buffered staging slot; the slot's store from two
    steps back must have finished reading it."""
    slot = lax.rem(j, 2)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    o_smem[slot] = val
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        o_smem.at[slot], o_gmem.at[row0 + lax.div(j, n_c), pl.ds(lax.rem(j, n_c) * rb, rb)])


def gather_rows(x_td: jax.Array, src_m: jax.Array, *,
                max_concurrent_steps: int = GATHER_STAGES, interpret: bool = False) -> jax.Array:
    """Pallas version of `gather_rows_reference` (see module docstring)."""
    T, D = x_td.shape
    M = src_m.shape[0]
    R, C = _view(D)
    rb = _rows_per_step(R, C, 1, x_td.dtype.itemsize)
    n_c = R // rb
    nsm = _gmm_gpu.num_sms(interpret)

    def kernel(src_gmem, x_gmem, o_gmem, o_smem):
        r0, n = _row_range(M, nsm)

        def body(idx, x_smem):
            (j,) = idx
            _store_chunk(o_smem, x_smem[...], o_gmem, j, r0, n_c, rb)

        plgpu.emit_pipeline(
            body,
            grid=(n * n_c,),
            in_specs=[plgpu.BlockSpec(
                (None, rb, C), lambda j: (src_gmem[r0 + lax.div(j, n_c)], lax.rem(j, n_c), 0))],
            max_concurrent_steps=max_concurrent_steps,
        )(x_gmem)
        plgpu.wait_smem_to_gmem(0)

    call = persistent_kernel(kernel, out_type=jax.ShapeDtypeStruct((M, R, C), x_td.dtype),
                             num_sms=nsm, scratch_types=[_out_staging(rb, C, x_td.dtype)])
    with _gmm_gpu.interpret_context(interpret):
        return call(src_m.astype(jnp.int32), x_td.reshape(T, R, C)).reshape(M, D)


def combine_rows(y_md: jax.Array, inv_tk: jax.Array, w_tk: jax.Array | None, out_dtype, *,
                 max_concurrent_steps: int = COMBINE_STAGES,
                 interpret: bool = False) -> jax.Array:
    """Pallas version of `combine_rows_reference` (see module docstring)."""
    M, D = y_md.shape
    T, K = inv_tk.shape
    R, C = _view(D)
    rb = _rows_per_step(R, C, K, y_md.dtype.itemsize)
    n_c = R // rb
    nsm = _gmm_gpu.num_sms(interpret)
    inv_m = inv_tk.reshape(T * K).astype(jnp.int32)
    w_m = (jnp.ones((T * K,), jnp.float32) if w_tk is None
           else w_tk.reshape(T * K).astype(jnp.float32))

    def kernel(inv_gmem, w_gmem, y_gmem, o_gmem, o_smem):
        t0, n = _row_range(T, nsm)

        def body(idx, *y_smems):
            (j,) = idx
            t = t0 + lax.div(j, n_c)
            acc = None
            for k, y_smem in enumerate(y_smems):
                term = y_smem[...].astype(jnp.float32)
                if w_tk is not None:
                    term = term * w_gmem[t * K + k]
                acc = term if acc is None else acc + term
            _store_chunk(o_smem, acc.astype(o_smem.dtype), o_gmem, j, t0, n_c, rb)

        def y_spec(k):
            return plgpu.BlockSpec(
                (None, rb, C),
                lambda j: (inv_gmem[(t0 + lax.div(j, n_c)) * K + k], lax.rem(j, n_c), 0))

        plgpu.emit_pipeline(
            body,
            grid=(n * n_c,),
            in_specs=[y_spec(k) for k in range(K)],
            max_concurrent_steps=max_concurrent_steps,
        )(*([y_gmem] * K))
        plgpu.wait_smem_to_gmem(0)

    call = persistent_kernel(kernel, out_type=jax.ShapeDtypeStruct((T, R, C), out_dtype),
                             num_sms=nsm, scratch_types=[_out_staging(rb, C, out_dtype)])
    with _gmm_gpu.interpret_context(interpret):
        return call(inv_m, w_m, y_md.reshape(M, R, C)).reshape(T, D)
