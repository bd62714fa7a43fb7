"""Mosaic GPU (Hopper) block-scaled FP8 grouped matmul: the routed experts' GEMMs in E4M3.

Legend: M rows sorted by group, K contraction, N output columns, G groups, C = K / 128 chunks.

  gmm_fp8(qa[M, K], sa[C, M], qb[G, N, K], sb[G, C, N/128], group_sizes[G]) -> out[M, N]
  out[r, n] = sum_c (qa[r, c] . qb[g(r), n, c]) * sa[c, r] * sb[g(r), c, n // 128]
  matmul_fp8(qa[M, K], sa[C, M], qb[N, K], sb[C, N/128]) -> out[M, N]: the same kernel with
  one group (the dense FP8 linears of dsv3_jax.model.fp8), without the tail pass

qa and qb are E4M3 (`float8_e4m3fn`); sa holds one fp32 scale per row and 128-wide K chunk (1x128
tiles, stored chunk-major so a tile's rows are contiguous, as DeepGEMM stores them), sb one per
128x128 block of each group's weight. qb is stored [G, N, K] because Hopper's FP8 wgmma reads
both operands K-major (the model's caller transposes the quantized weight, inside the
quantization's fusion).
Rows past sum(group_sizes) are zero.

DeepSeek-V3's promotion (paper section 3.3.2, Figure 7 (b); DeepGEMM): each 128-wide K chunk is
one pipeline step; its wgmma accumulates into a fresh fp32 accumulator, which is then scaled by
the row scales times the block scale and added into a second fp32 accumulator carried through
the K loop in registers. So every chunk is promoted, as `reference` computes it.

Tiling: each compute warpgroup owns a (tile_m, 128) output tile (tile_n is 128: one weight
block column, so the block scale is one scalar per step); by default two compute warpgroups
share a CTA (rows 2*tile_m) and a third issues the TMA loads (warp specialization, as the bf16
kernel `_gmm_gpu`), on a persistent grid in snake order. Row tiles are aligned to multiples of
the CTA's rows; a tile whose rows span several groups is computed once per group, and each time
only its group's rows are stored (a ladder of TMA stores), as jax's `ragged_dot_mgpu` does.
Operands whose K or N are not multiples of 128 are zero-padded (zeros add nothing to any chunk).
Not yet tuned: every chunk waits for its wgmma before scaling (DeepGEMM overlaps the next
chunk's wgmma with this one's promotion), and the tail rows are zeroed in a separate pass.

Numerics vs `reference`: the same products, summed in another order inside a chunk (the tensor
cores' own accumulation, which the promotion bounds to 128 terms), so the two agree to fp32
accumulation error (tests: relative 1e-5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mla_mgpu_common import (
    COMPUTE_WGS,
    MEMORY_REGS,
    ROWS,
    WGMMA,
    persistent_kernel,
    sm_count,
)

TILE_K = 128  # the recipe's chunk: one scale per 128 values of K
TILE_N = 128  # one weight block column per output tile
E4M3 = jnp.float8_e4m3fn
_INTERPRET_SMS = 2


@dataclasses.dataclass(frozen=True)
class Fp8GmmConfig:
    """Tiling of `gmm_fp8`: each compute warpgroup owns tile_m x 128 outputs,
    `max_concurrent_steps` K chunks in flight, `grid_tile_width` tiles per band of the snake
    order. warp_specialized: two compute warpgroups (CTA tile 2*tile_m x 128) and one that
    issues the TMA loads, as the bf16 kernel; else one warpgroup does both."""

    tile_m: int = 64
    max_concurrent_steps: int = 4
    grid_tile_width: int = 8
    warp_specialized: bool = True

    @property
    def cta_m(self) -> int:
        return self.tile_m * (COMPUTE_WGS if self.warp_specialized else 1)


def reference(qa, sa_cm, qb_gnk, sb_gcn, group_sizes, *, out_dtype=jnp.float32):
    """Plain JAX, the arithmetic written out: per group, per K chunk, the partial product scaled
    by its row and block scales, added in fp32 (masked dense over groups; tests only)."""
    M, K = qa.shape
    G, N, _ = qb_gnk.shape
    C = -(-K // TILE_K)
    pad = C * TILE_K - K
    a_mck = jnp.pad(qa.astype(jnp.float32), [(0, 0), (0, pad)]).reshape(M, C, TILE_K)
    b_gnck = jnp.pad(qb_gnk.astype(jnp.float32), [(0, 0), (0, 0), (0, pad)]).reshape(
        G, N, C, TILE_K)
    ends = jnp.cumsum(group_sizes)
    gid_m = jnp.searchsorted(ends, jnp.arange(M), side="right")
    onehot_mg = (gid_m[:, None] == jnp.arange(G)[None, :]).astype(jnp.float32)
    sb_gcn = jnp.repeat(sb_gcn, TILE_N, axis=-1)[..., :N]
    hi = jax.lax.Precision.HIGHEST
    partial_mgcn = jnp.einsum("MCk,GNCk->MGCN", a_mck, b_gnck, precision=hi)
    out = jnp.einsum("MGCN,MG,CM,GCN->MN", partial_mgcn, onehot_mg, sa_cm.astype(jnp.float32),
                     sb_gcn.astype(jnp.float32), precision=hi)
    return out.astype(out_dtype)


def block_tiles(group_sizes: jax.Array, num_rows: int, tile_m: int) -> jax.Array:
    """Row tiles: int32 [4, T] = (group, first row, lo, hi) per tile, T = cdiv(M, tile_m) + G.

    Tile t covers rows [start, start + tile_m) (start a multiple of tile_m) and stores rows
    [start + lo, start + hi), all of `group`; a tile shared by several groups appears once per
    group. Unused tiles have lo == hi == 0.
    """
    G = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // tile_m
    count = jnp.where(sizes > 0, (ends - 1) // tile_m - first + 1, 0)
    tile_ends = jnp.cumsum(count)
    T = -(-num_rows // tile_m) + G
    t = jnp.arange(T, dtype=jnp.int32)
    g = jnp.searchsorted(tile_ends, t, side="right", method="compare_all").astype(jnp.int32)
    used = g < G
    gc = jnp.minimum(g, G - 1)
    start = (first[gc] + t - (tile_ends[gc] - count[gc])) * tile_m
    start = jnp.where(used, start, 0)
    lo = jnp.where(used, jnp.maximum(starts[gc], start) - start, 0)
    hi = jnp.where(used, jnp.minimum(ends[gc], start + tile_m) - start, 0)
    return jnp.stack([gc, start, lo, hi]).astype(jnp.int32)


def _transforms(minor_bytes: int) -> tuple:
    swizzle = plgpu.find_swizzle(minor_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


_TF = _transforms(TILE_K)  # 128 bytes of E4M3 per row: the 128-byte swizzle


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class _Static:
    cfg: Fp8GmmConfig
    num_tiles: int  # row tiles (`block_tiles`), some unused
    n_iters: int    # 128-column tiles
    k_iters: int    # 128-wide K chunks


def gmm_fp8(qa: jax.Array, sa_cm: jax.Array, qb_gnk: jax.Array, sb_gcn: jax.Array,
            group_sizes: jax.Array, *, out_dtype=jnp.bfloat16,
            cfg: Fp8GmmConfig = Fp8GmmConfig(), interpret: bool = False) -> jax.Array:
    """The block-scaled FP8 grouped matmul (module docstring): [M, N] in out_dtype."""
    M0, N0 = qa.shape[0], qb_gnk.shape[1]
    out = _run(qa, sa_cm, qb_gnk, sb_gcn, group_sizes, out_dtype, cfg, interpret)
    # Rows past the last group are never stored by a tile: zero them (one pass over [M, N]).
    total_rows = jnp.sum(group_sizes.astype(jnp.int32))
    out = jnp.where((jnp.arange(out.shape[0]) < total_rows)[:, None], out,
                    jnp.zeros((), out_dtype))
    return out[:M0, :N0]


def matmul_fp8(qa: jax.Array, sa_cm: jax.Array, qb_nk: jax.Array, sb_cn: jax.Array, *,
               out_dtype=jnp.bfloat16, cfg: Fp8GmmConfig = Fp8GmmConfig(),
               interpret: bool = False) -> jax.Array:
    """The dense block-scaled FP8 matmul: `gmm_fp8` with one group of all M rows, qb [N, K],
    sb [C, N/128]; out[M, N] in out_dtype. Without the grouped form's pass over the output:
    every row is stored by its tile (rows padded up to the CTA tile are cut off)."""
    M0, N0 = qa.shape[0], qb_nk.shape[0]
    sizes = jnp.full((1,), M0, jnp.int32)
    out = _run(qa, sa_cm, qb_nk[None], sb_cn[None], sizes, out_dtype, cfg, interpret)
    return out[:M0, :N0]


def _check(qa, sa_cm, qb_gnk, sb_gcn) -> None:
    M0, K0 = qa.shape
    G, N0, _ = qb_gnk.shape
    if qa.dtype != E4M3 or qb_gnk.dtype != E4M3:
        raise ValueError(f"gmm_fp8 takes float8_e4m3fn operands, got {qa.dtype}, {qb_gnk.dtype}")
    C = -(-K0 // TILE_K)
    if sa_cm.shape != (C, M0) or sb_gcn.shape != (G, C, -(-N0 // TILE_N)):
        raise ValueError(f"gmm_fp8: scales {sa_cm.shape}, {sb_gcn.shape} do not fit "
                         f"qa {qa.shape}, qb {qb_gnk.shape} (want ({C}, {M0}) and "
                         f"({G}, {C}, {-(-N0 // TILE_N)}))")


def _run(qa, sa_cm, qb_gnk, sb_gcn, group_sizes, out_dtype, cfg, interpret) -> jax.Array:
    """The kernel on operands padded to its tiles: [M, N] padded, rows past the groups unset."""
    _check(qa, sa_cm, qb_gnk, sb_gcn)
    cta_m = cfg.cta_m
    qa = _pad_to(_pad_to(qa, 1, TILE_K), 0, cta_m)
    sa_cm = _pad_to(sa_cm.astype(jnp.float32), 1, cta_m)
    qb_gnk = _pad_to(_pad_to(qb_gnk, 2, TILE_K), 1, TILE_N)
    sb_gcn = sb_gcn.astype(jnp.float32)
    M, K = qa.shape
    N = qb_gnk.shape[1]
    meta = block_tiles(group_sizes, M, cta_m)
    st = _Static(cfg, num_tiles=meta.shape[1], n_iters=N // TILE_N, k_iters=K // TILE_K)
    if cfg.warp_specialized:
        kernel, threads = functools.partial(_ws_kernel, st), COMPUTE_WGS + 1
    else:
        kernel, threads = functools.partial(_kernel, st), None
    call = persistent_kernel(
        kernel, out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
        num_sms=_INTERPRET_SMS if interpret else sm_count(), num_threads=threads,
        kernel_name="grouped_matmul_fp8")
    with interpret_context(interpret):
        return call(meta, qa, sa_cm, qb_gnk, sb_gcn)


def _tile_coords(st: _Static, meta_gmem, index):
    mi, ni = plgpu.planar_snake(index, (st.num_tiles, st.n_iters), 1, st.cfg.grid_tile_width)
    g, start, lo, hi = (meta_gmem[i, mi] for i in range(4))
    return g, start, lo, hi, ni, lax.div(start, jnp.int32(st.cfg.cta_m))


def _promote(a_rows, sa_rows, b_smem, scale_b, total, tm):
    """One K chunk: a fresh fp32 accumulator of this chunk's wgmma, scaled by the row scales
    times the block scale, added into the carried total (the recipe's promotion)."""
    def chunk(acc):
        plgpu.wgmma(acc, a_rows, b_smem.T)
        plgpu.wgmma_wait(0)
        return acc[...]

    part = pl.run_scoped(chunk, plgpu.ACC((tm, TILE_N), jnp.float32))
    scale = plgpu.load(sa_rows, layout=ROWS) * scale_b
    return total + part * lax.broadcast_in_dim(scale, (tm, TILE_N), [0])


def _zeros(tm):
    return plgpu.layout_cast(jnp.zeros((tm, TILE_N), jnp.float32), WGMMA)


def _kernel(st: _Static, meta_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, o_gmem):
    """One warpgroup per CTA loads and multiplies (plgpu.emit_pipeline)."""
    tm = st.cfg.tile_m

    @plgpu.nd_loop((st.num_tiles * st.n_iters,), collective_axes="sm")
    def _tile_loop(loop_info):
        g, start, lo, hi, ni, block = _tile_coords(st, meta_gmem, loop_info.index[0])

        @pl.when(hi > lo)
        def _():
            def step(idxs, a_smem, sa_smem, b_smem, total):
                (c,) = idxs
                return _promote(a_smem, sa_smem.at[0], b_smem, sb_gmem[g, c, ni], total, tm)

            total = plgpu.emit_pipeline(
                step, grid=(st.k_iters,),
                in_specs=[
                    plgpu.BlockSpec((tm, TILE_K), lambda c: (block, c), transforms=_TF),
                    plgpu.BlockSpec((1, tm), lambda c: (c, block)),
                    plgpu.BlockSpec((TILE_N, TILE_K), lambda c: (ni, c), transforms=_TF),
                ],
                max_concurrent_steps=st.cfg.max_concurrent_steps,
                init_carry=_zeros(tm),
            )(a_gmem, sa_gmem, b_gmem.at[g])

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, TILE_N), o_gmem.dtype))
            def _(o_smem):
                _store_rows(total.astype(o_gmem.dtype), o_smem, o_gmem, start, lo, hi, ni, tm)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ws_pipeline(st: _Static, body, context, block, g, ni):
    cfg = st.cfg
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(st.k_iters,), memory_registers=MEMORY_REGS,
        in_specs=[
            plgpu.BlockSpec((cfg.cta_m, TILE_K), lambda c: (block, c), transforms=_TF),
            plgpu.BlockSpec((1, cfg.cta_m), lambda c: (c, block)),
            plgpu.BlockSpec((None, TILE_N, TILE_K), lambda c: (g, ni, c), transforms=_TF),
        ],
        wg_axis="wg", num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=context)


def _ws_kernel(st: _Static, meta_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, o_gmem):
    """Two compute warpgroups (rows [wg*tile_m, (wg+1)*tile_m) of the CTA tile each) and a
    memory warpgroup issuing the TMA loads (plgpu.emit_pipeline_warp_specialized)."""
    tm = st.cfg.tile_m
    wg = lax.axis_index("wg")
    zero = jnp.int32(0)

    @functools.partial(
        pl.run_scoped,
        allocs=_ws_pipeline(st, _ignore, _ignore, zero, zero, zero)
        .get_allocations(a_gmem, sa_gmem, b_gmem),
        o_smem=plgpu.SMEM((COMPUTE_WGS, tm, TILE_N), o_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
        @plgpu.nd_loop((st.num_tiles * st.n_iters,), collective_axes="sm")
        def _tile_loop(loop_info):
            g, start, lo, hi, ni, block = _tile_coords(st, meta_gmem, loop_info.index[0])
            rows = pl.ds(wg * tm, tm)

            def step(idxs, a_smem, sa_smem, b_smem, total):
                (c,) = idxs
                return _promote(a_smem.at[rows], sa_smem.at[0, rows], b_smem,
                                sb_gmem[g, c, ni], total, tm)

            def context(eval_pipeline):
                total = eval_pipeline(_zeros(tm))
                r_lo = jnp.clip(lo - wg * tm, 0, tm)
                r_hi = jnp.clip(hi - wg * tm, 0, tm)
                _store_rows(total.astype(o_gmem.dtype), o_smem.at[wg], o_gmem,
                            start + wg * tm, r_lo, r_hi, ni, tm)

            @pl.when(hi > lo)
            def _():
                _ws_pipeline(st, step, context, block, g, ni)(
                    a_gmem, sa_gmem, b_gmem, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ignore(*_, **__):
    """Body and context of the pipeline built only for its allocations."""


def _store_rows(values, o_smem, o_gmem, start, lo, hi, ni, tm):
    """Rows [lo, hi) of a tm-row tile (rows start + lo ... of o_gmem), through o_smem and a
    ladder of power-of-two TMA stores (TMA boxes are static); nothing when lo >= hi."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_smem[...] = values
    plgpu.commit_smem()
    count = jnp.maximum(hi - lo, 0)
    offset = lo
    p = tm
    while p >= 1:
        def _store(p=p, offset=offset):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(offset, p)],
                o_gmem.at[pl.ds(start + offset, p), pl.ds(ni * TILE_N, TILE_N)],
                commit_group=False)

        pl.when((count & p) != 0)(_store)
        offset = offset + (count & p)
        p //= 2
    plgpu.commit_smem_to_gmem_group()


def interpret_context(interpret: bool):
    """GPU interpret mode on the CPU when `interpret`."""
    return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()
