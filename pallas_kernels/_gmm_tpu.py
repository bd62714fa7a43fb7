"""Mosaic TPU kernels for grouped matmuls: the same ops as `_gmm_gpu`, for TPU cores.

Legend: M rows sorted by group, K contraction, N output columns, G groups.

  gmm:   out[M, N] = lhs[M, K] @ rhs[g(row)]  with op "mm" | "swiglu" | "mm2" (see `_gmm_gpu`)
  tgmm:  out[G, K, N] = sum over rows r of group g of lhs[r]^T dout[r]

Rows are tiled at multiples of tile_m; the grid walks "visits" (group, row tile) in group order,
so a tile shared by two groups is visited twice in a row and its output block stays in VMEM
between the visits: each visit writes only its group's rows (a select, so rows of other groups
and padding never leak in). The rows past sum(group_sizes) are a pseudo-group G written as
zeros. `tgmm` also visits every empty group once so that its weight gradient is written (zeros).
Scalar prefetch carries the visit tables into SMEM; accumulation is fp32 in a VMEM scratch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Block sizes (rows, contraction, columns); multiples of (8, 128, 128) on hardware."""

    tile_m: int = 256
    tile_k: int = 512
    tile_n: int = 256


_OPS = {
    # op: (number of lhs, number of rhs, pairs (lhs, rhs, acc), number of accumulators)
    "mm": (1, 1, ((0, 0, 0),), 1),
    "swiglu": (1, 2, ((0, 0, 0), (0, 1, 1)), 2),
    "mm2": (2, 2, ((0, 0, 0), (1, 1, 0)), 1),
}


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _visits(group_sizes_g: jax.Array, num_rows: int, tile_m: int, *, with_tail: bool,
            with_empty: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, int]:
    """Visit tables: (group [V], row tile [V], group starts [G+2], group ends [G+2], V).

    Groups are G real ones, then (with_tail) the pseudo-group G of rows past the end, then an
    always-empty group G+1 that marks unused trailing visits (they repeat the last row tile).
    """
    G = group_sizes_g.shape[0]
    sizes = group_sizes_g.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    total = ends[-1]
    tail = (num_rows - total) if with_tail else jnp.int32(0)
    sizes_x = jnp.concatenate([sizes, tail[None], jnp.zeros((1,), jnp.int32)])
    starts_x = jnp.concatenate([ends - sizes, total[None], jnp.full((1,), num_rows, jnp.int32)])
    first = starts_x // tile_m
    last = (starts_x + sizes_x - 1) // tile_m
    ntiles = jnp.where(sizes_x > 0, last - first + 1, 0)
    if with_empty:
        ntiles = ntiles.at[:G].set(jnp.maximum(ntiles[:G], 1))
    ntiles = ntiles.at[G + 1].set(0)
    cum = jnp.cumsum(ntiles)
    V = -(-num_rows // tile_m) + (2 * G if with_empty else G) + 1
    v = jnp.arange(V, dtype=jnp.int32)
    g = jnp.searchsorted(cum, v, side="right", method="compare_all").astype(jnp.int32)
    used = g <= G
    gc = jnp.minimum(g, G)
    tile = jnp.minimum(first[gc] + v - (cum[gc] - ntiles[gc]), -(-num_rows // tile_m) - 1)
    last_used = jnp.maximum(cum[G] - 1, 0)
    tile = jnp.where(used, tile, tile[last_used])
    # Unused trailing visits: `gmm` gives them the empty group G+1 (nothing kept); `tgmm` keeps
    # the last group's id so its output block stays resident (the kernel adds nothing for them).
    g = jnp.where(used, g, gc[last_used] if with_empty else G + 1)
    return (g.astype(jnp.int32), jnp.maximum(tile, 0).astype(jnp.int32),
            starts_x.astype(jnp.int32), (starts_x + sizes_x).astype(jnp.int32), V)


def gmm(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array, *,
        op: str, rhs_layout: str, out_dtypes: Sequence, cfg: TpuConfig = TpuConfig(),
        interpret: bool = False) -> tuple[jax.Array, ...]:
    """Grouped matmul kernel (see module docstring); returns one [M, N] array per output."""
    n_a, n_b, pairs, n_acc = _OPS[op]
    M, K = lhs[0].shape
    G = rhs[0].shape[0]
    N = rhs[0].shape[2] if rhs_layout == "kn" else rhs[0].shape[1]
    tm, tk, tn = cfg.tile_m, min(cfg.tile_k, _round_up(K, 128)), min(cfg.tile_n, _round_up(N, 128))
    # Padding the contraction keeps undefined values of partial blocks out of the sums.
    lhs = [_pad_to(a, 1, tk) for a in lhs]
    rhs = [_pad_to(b, 1 if rhs_layout == "kn" else 2, tk) for b in rhs]
    k_iters = lhs[0].shape[1] // tk
    n_iters = -(-N // tn)
    group_v, tile_v, starts, ends, V = _visits(group_sizes, M, tm, with_tail=True,
                                               with_empty=False)

    def a_map(n, v, k, group_v, tile_v, starts, ends):
        return tile_v[v], k

    if rhs_layout == "kn":
        b_spec = pl.BlockSpec((None, tk, tn), lambda n, v, k, gv, tv, s, e: (
            jnp.minimum(gv[v], G - 1), k, n))
    else:
        b_spec = pl.BlockSpec((None, tn, tk), lambda n, v, k, gv, tv, s, e: (
            jnp.minimum(gv[v], G - 1), n, k))
    in_specs = [pl.BlockSpec((tm, tk), a_map)] * n_a + [b_spec] * n_b
    out_specs = [pl.BlockSpec((tm, tn), lambda n, v, k, gv, tv, s, e: (tv[v], n))
                 for _ in out_dtypes]

    def kernel(group_v, tile_v, starts, ends, *refs):
        a_refs, b_refs = refs[:n_a], refs[n_a:n_a + n_b]
        o_refs, acc_refs = refs[n_a + n_b:n_a + n_b + len(out_dtypes)], refs[-n_acc:]
        v, k = pl.program_id(1), pl.program_id(2)

        @pl.when(k == 0)
        def _():
            for acc in acc_refs:
                acc[...] = jnp.zeros_like(acc)

        for ai, bi, ci in pairs:
            b = b_refs[bi][...]
            dims = (((1,), (0,)), ((), ())) if rhs_layout == "kn" else (((1,), (1,)), ((), ()))
            acc_refs[ci][...] += lax.dot_general(a_refs[ai][...], b, dims,
                                                 precision=_precision(b.dtype),
                                                 preferred_element_type=jnp.float32)

        @pl.when(k == k_iters - 1)
        def _():
            g = group_v[v]
            rows = tile_v[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            keep = (rows >= starts[g]) & (rows < ends[g])
            vals = [acc[...] for acc in acc_refs]
            if op == "swiglu":
                vals = [vals[0] * jax.nn.sigmoid(vals[0]) * vals[1], vals[0], vals[1]]
            for o_ref, val in zip(o_refs, vals, strict=True):
                val = jnp.where(g == G, jnp.zeros_like(val), val).astype(o_ref.dtype)
                o_ref[...] = jnp.where(keep, val, o_ref[...])

    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((M, N), d) for d in out_dtypes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(n_iters, V, k_iters),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * n_acc,
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_gmm_cost(lhs, out_dtypes, op=op, visits=V, tm=tm, n_iters=n_iters, tn=tn),
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    return tuple(call(group_v, tile_v, starts, ends, *lhs, *rhs))


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, out_dtype,
         cfg: TpuConfig = TpuConfig(), interpret: bool = False) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: [M, K], [M, N] -> [G, K, N] (zeros if empty)."""
    M, K = lhs.shape
    N = dout.shape[1]
    G = group_sizes.shape[0]
    tm, tk, tn = cfg.tile_m, min(cfg.tile_k, _round_up(K, 128)), min(cfg.tile_n, _round_up(N, 128))
    group_v, tile_v, starts, ends, V = _visits(group_sizes, M, tm, with_tail=False,
                                               with_empty=True)
    k_iters, n_iters = -(-K // tk), -(-N // tn)

    def kernel(group_v, tile_v, starts, ends, a_ref, b_ref, o_ref, acc_ref):
        v = pl.program_id(2)
        g = group_v[v]
        is_first = (v == 0) | (g != group_v[jnp.maximum(v - 1, 0)])
        is_last = (v == V - 1) | (g != group_v[jnp.minimum(v + 1, V - 1)])

        @pl.when(is_first)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        # Trailing unused visits repeat the last real one; they must add nothing.
        real = (v == 0) | (tile_v[v] != tile_v[jnp.maximum(v - 1, 0)]) | is_first
        row_a = tile_v[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
        row_b = tile_v[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        a = jnp.where((row_a >= starts[g]) & (row_a < ends[g]) & real, a_ref[...], 0)
        b = jnp.where((row_b >= starts[g]) & (row_b < ends[g]) & real, b_ref[...], 0)
        acc_ref[...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                        precision=_precision(b.dtype),
                                        preferred_element_type=jnp.float32)

        @pl.when(is_last)
        def _():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(k_iters, n_iters, V),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda k, n, v, gv, tv, s, e: (tv[v], k)),
                pl.BlockSpec((tm, tn), lambda k, n, v, gv, tv, s, e: (tv[v], n)),
            ],
            out_specs=pl.BlockSpec((None, tk, tn), lambda k, n, v, gv, tv, s, e: (gv[v], k, n)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_tgmm_cost(lhs, dout, G, out_dtype, visits=V, tm=tm, k_iters=k_iters,
                                 n_iters=n_iters),
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    return call(group_v, tile_v, starts, ends, lhs, dout)


def _gmm_cost(lhs, out_dtypes, *, op: str, visits: int, tm: int, n_iters: int, tn: int
              ) -> pl.CostEstimate:
    """What `gmm` executes, for XLA's scheduler and cost_analysis (which otherwise counts a
    kernel as nothing). Every visit (V in all) multiplies its [tile_m, K] rows by its group's
    whole [K, tile_n] weight strip, re-reading both (the contraction is the innermost grid
    axis); each output is written once."""
    _, n_b, pairs, _ = _OPS[op]
    M, K = lhs[0].shape
    isz = jnp.dtype(lhs[0].dtype).itemsize
    rows, N = visits * tm, n_iters * tn
    reads = n_iters * rows * K * isz * len(lhs) + n_b * visits * K * N * isz
    writes = sum(M * N * jnp.dtype(d).itemsize for d in out_dtypes)
    return pl.CostEstimate(flops=2 * rows * K * N * len(pairs),
                           transcendentals=rows * N if op == "swiglu" else 0,
                           bytes_accessed=reads + writes)


def _tgmm_cost(lhs, dout, G: int, out_dtype, *, visits: int, tm: int, k_iters: int,
               n_iters: int) -> pl.CostEstimate:
    """What `tgmm` executes: each (K, N) output block streams every visit's row tiles of lhs
    and dout (the visits are the innermost grid axis) and is written once."""
    K, N = lhs.shape[1], dout.shape[1]
    isz = jnp.dtype(lhs.dtype).itemsize
    rows = visits * tm
    reads = (n_iters * rows * K + k_iters * rows * N) * isz
    return pl.CostEstimate(flops=2 * rows * K * N, transcendentals=0,
                           bytes_accessed=reads + G * K * N * jnp.dtype(out_dtype).itemsize)


def _precision(dtype):
    # fp32 operands: full-precision products (the MXU default would round them to bf16).
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize == 4 else None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m

