"""Mosaic GPU (Hopper: wgmma, TMA, warp-specialized pipeline) kernels for grouped matmuls.

Legend: M rows sorted by group, K contraction, N output columns, G groups, C rows of one
contraction step of the transposed kernel.

Two kernels, each with a few fused variants:

  gmm:   out[M, N] = lhs[M, K] @ rhs[g(row)][K, N]      (rows tiled per group; see `row_tiles`)
         op="mm"      one product; rhs stored [G, K, N] ("kn") or [G, N, K] ("nk", i.e. the
                      transposed weights of the backward pass, read without a copy)
         op="swiglu"  gate and up projections against two rhs in one pass; the epilogue writes
                      h = silu(gate) * up and also gate and up (kept for the backward pass)
         op="mm2"     lhs1 @ rhs1 + lhs2 @ rhs2 into one accumulator (the input gradient of the
                      gate/up projections: d_gate @ w_gate^T + d_up @ w_up^T)
  tgmm:  out[G, K, N] = sum over the rows r of group g of lhs[r, K]^T dout[r, N]   (weight grads)

Each CTA has three warpgroups: one issues TMA loads into a ring of shared-memory stages, two
issue wgmma on fp32 register accumulators. The grid is persistent (one CTA per SM) and walks
the output tiles in a snake order for L2 reuse. Operands are 16-bit (bf16/f16); fp32 callers
split into bf16 parts (see grouped_matmul.py).

Row tiles of `gmm` start at their group's first row rounded down to a multiple of 8 (TMA into
swizzled tiles needs 8-aligned row offsets), not at multiples of the tile, so a group wastes at
most one partial tile; a tile that would run past the last row is shifted back to end at row M,
and only its rows of the group are stored. A warpgroup whose rows all belong to the tile's group
(most of them) stages its output through a swizzled SMEM tile (bank-conflict-free stores from
registers) and stores it with one TMA copy per chunk; one with some rows of other groups stages
through an unswizzled tile and stores only its rows, as a ladder of power-of-two TMA stores
(swizzled tiles can only be copied in whole 8-row groups). `tgmm` walks
contraction blocks of C rows aligned to multiples of C; a block that straddles a group boundary
is masked (a select, so NaN in rows of other groups or in padding cannot leak in).

Mosaic GPU requires the arrays to hold whole 8 x 64 tiles: `gmm`/`tgmm` zero-pad M to a multiple
of 8 and K, N to multiples of 64 when they are not (never for the model's shapes), which costs a
copy. Compile errors of these kernels can be reproduced without a GPU by lowering for CUDA on
the CPU: `jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))` runs Mosaic's layout
inference and lowering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mla_mgpu_common import (
    COMPUTE_WGS,
    MEMORY_REGS,
    SMEM_LIMIT,
    SMEM_RESERVED,
    persistent_kernel,
    sm_count,
)

# TMA into 8-row swizzle tiles needs row offsets that are multiples of 8.
ROW_ALIGN = 8
# Shared memory the kernels' own buffers may take: a Hopper CTA's, less what Mosaic GPU adds.
_SMEM_BYTES = SMEM_LIMIT - SMEM_RESERVED
# Columns per chunk of the row-by-row (unswizzled) epilogue.
_PLAIN_N = 64
# CTAs of the persistent grid in interpret mode.
_INTERPRET_SMS = 2


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tiling of the `gmm` kernel.

    The two compute warpgroups each own a (tile_m, tile_n) accumulator; `wg_dim` says whether
    they sit side by side along rows ("m": CTA tile 2*tile_m x tile_n) or columns ("n": CTA tile
    tile_m x 2*tile_n). `grid_minor_dim`/`grid_tile_width` shape the snake order of the tiles.
    The epilogue of a warpgroup whose rows all belong to the tile's group converts the
    accumulator in (tile_m, epi_tile_n) chunks through `epi_slots` swizzled staging tiles (2 lets a
    chunk's TMA store overlap the next conversion); other warpgroups go through one unswizzled
    (tile_m, 64) tile per output dtype, a chunk at a time.
    """

    tile_m: int = 64
    tile_n: int = 256
    tile_k: int = 64
    wg_dim: str = "m"
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64
    epi_slots: int = 2
    grid_minor_dim: str = "m"
    grid_tile_width: int = 8
    delay_release: int = 0

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


@dataclasses.dataclass(frozen=True)
class TgmmConfig:
    """Tiling of the `tgmm` kernel: CTA tile (tile_k, 2*tile_n) of out[g], C = tile_c rows/step.

    The two compute warpgroups split the tile along N.
    """

    tile_k: int = 128
    tile_n: int = 128
    tile_c: int = 64
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64
    grid_minor_dim: str = "n"
    grid_tile_width: int = 4
    delay_release: int = 0


def num_sms(interpret: bool) -> int:
    """Persistent-grid size: one CTA per SM on the device (HOPPER_SMS when lowering for CUDA
    without a GPU, see `sm_count`); a few CTAs when interpreted."""
    return _INTERPRET_SMS if interpret else sm_count()


def _transforms(minor_elems: int, dtype) -> tuple:
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def _minor(dim: str) -> int:
    return {"m": 0, "n": 1}[dim]


def row_tiles(group_sizes_g: jax.Array, num_rows: int, tile_rows: int,
              align: int = ROW_ALIGN) -> jax.Array:
    """Row tiles of `gmm`: int32 [4, T] = (group, first row loaded, lo, hi) per tile.

    Tile t loads rows [start, start + tile_rows) and owns rows [start + lo, start + hi), all in
    `group` (G marks the rows past sum(group_sizes), which are written as zeros). A group's
    tiles start at its first row rounded down to a multiple of `align` (TMA into swizzled tiles
    needs 8-row aligned starts), so each group has cdiv(size + misalignment, tile_rows) tiles; a
    tile that would run past row M is shifted back (lo > 0). Unused tiles (t >= the real count)
    have lo == hi == 0. T = cdiv(M, tile_rows) + 2G + 2 bounds the count. M must be a multiple
    of `align` (`gmm` pads it); if M < tile_rows the one tile reads past row M (TMA fills zeros).
    """
    if num_rows % align:
        raise ValueError(f"row_tiles: num_rows={num_rows} is not a multiple of {align}")
    G = group_sizes_g.shape[0]
    sizes = group_sizes_g.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    total = ends[-1]
    sizes_x = jnp.concatenate([sizes, (num_rows - total)[None]])  # group G: the zero tail
    starts_x = jnp.concatenate([ends - sizes, total[None]])
    ends_x = starts_x + sizes_x
    base_x = starts_x // align * align
    tiles_x = jnp.where(sizes_x > 0, (ends_x - base_x + tile_rows - 1) // tile_rows, 0)
    tile_ends = jnp.cumsum(tiles_x)
    T = -(-num_rows // tile_rows) + 2 * G + 2
    t = jnp.arange(T, dtype=jnp.int32)
    # compare_all: G + 1 entries; the default binary-search loop is a while loop on the GPU.
    g = jnp.searchsorted(tile_ends, t, side="right", method="compare_all").astype(jnp.int32)
    used = g <= G
    gc = jnp.minimum(g, G)
    row0 = base_x[gc] + (t - (tile_ends[gc] - tiles_x[gc])) * tile_rows
    start = jnp.clip(row0, 0, max(num_rows - tile_rows, 0) // align * align)
    lo = jnp.where(used, jnp.maximum(row0, starts_x[gc]) - start, 0)
    hi = jnp.where(used, jnp.minimum(row0 + tile_rows, ends_x[gc]) - start, 0)
    return jnp.stack([gc, start, lo, hi]).astype(jnp.int32)


def _store_rows(src_smem, dst_gmem, smem_row0, gmem_row0, count, max_rows: int):
    """TMA-store rows [smem_row0, smem_row0 + count) of src to dst rows from gmem_row0.

    count is dynamic (0..max_rows, max_rows a power of two); TMA boxes are static, so the
    rows go out as a ladder of power-of-two boxes, one per set bit of count. The copies are
    left uncommitted: the caller commits them as one bulk-copy group.
    """
    offset = jnp.int32(0)
    p = max_rows
    while p >= 1:
        def _store(p=p, offset=offset):
            plgpu.copy_smem_to_gmem(
                src_smem.at[pl.ds(smem_row0 + offset, p)],
                dst_gmem.at[pl.ds(gmem_row0 + offset, p)], commit_group=False)

        pl.when((count & p) != 0)(_store)
        offset = offset + (count & p)
        p //= 2


def _pad(x: jax.Array, multiples: dict[int, int]) -> jax.Array:
    """Zero-pads axes up to multiples: TMA through swizzled tiles wants whole tiles in GMEM."""
    widths = [(0, -x.shape[a] % multiples.get(a, 1)) for a in range(x.ndim)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _zeros_like_tile(shape, dtype):
    return plgpu.layout_cast(jnp.full(shape, 0, dtype=dtype), plgpu.Layout.WGMMA)


def _silu_mul(gate, up):
    return gate * jax.nn.sigmoid(gate) * up


class _OpForm(NamedTuple):
    """What one `gmm` op multiplies: its operands, products and accumulators."""

    n_a: int        # lhs operands
    n_b: int        # rhs operands
    pairs: tuple    # products (lhs, rhs, accumulator), by index
    n_acc: int      # accumulators
    epilogue: Any   # accumulators -> outputs (None: swiglu's, applied per column chunk)


_OPS = {
    "mm": _OpForm(1, 1, ((0, 0, 0),), 1, lambda accs: accs),
    "swiglu": _OpForm(1, 2, ((0, 0, 0), (0, 1, 1)), 2, None),
    "mm2": _OpForm(2, 2, ((0, 0, 0), (1, 1, 0)), 1, lambda accs: accs),
}


def gmm_smem_bytes(op: str, cfg: GmmConfig, dtype, out_dtypes: Sequence) -> int:
    n_a, n_b = _OPS[op].n_a, _OPS[op].n_b
    isz = jnp.dtype(dtype).itemsize
    stage = (n_a * cfg.cta_m * cfg.tile_k + n_b * cfg.tile_k * cfg.cta_n) * isz
    swizzled = sum(2 * cfg.epi_slots * cfg.tile_m * cfg.epi_tile_n * jnp.dtype(d).itemsize
                   for d in out_dtypes)
    plain = sum(2 * cfg.tile_m * _PLAIN_N * jnp.dtype(d).itemsize for d in set(out_dtypes))
    return cfg.max_concurrent_steps * stage + swizzled + plain


def fit_gmm_config(op: str, cfg: GmmConfig, dtype, out_dtypes: Sequence) -> GmmConfig:
    """Single-buffers the epilogue, then drops pipeline stages (to 2) until shared memory fits."""
    while gmm_smem_bytes(op, cfg, dtype, out_dtypes) > _SMEM_BYTES:
        if cfg.epi_slots > 1:
            cfg = dataclasses.replace(cfg, epi_slots=1)
        elif cfg.max_concurrent_steps > 2:
            cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
        else:
            break
    return cfg


def tgmm_smem_bytes(cfg: TgmmConfig, dtype, out_dtype) -> int:
    isz = jnp.dtype(dtype).itemsize
    stage = (cfg.tile_c * cfg.tile_k + cfg.tile_c * 2 * cfg.tile_n) * isz
    return cfg.max_concurrent_steps * stage + 2 * cfg.tile_k * cfg.epi_tile_n * jnp.dtype(
        out_dtype).itemsize


def fit_tgmm_config(cfg: TgmmConfig, dtype, out_dtype) -> TgmmConfig:
    while cfg.max_concurrent_steps > 2 and tgmm_smem_bytes(cfg, dtype, out_dtype) > _SMEM_BYTES:
        cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
    return cfg


@dataclasses.dataclass(frozen=True)
class _GmmStatic:
    """Trace-time constants of one `gmm` kernel."""

    op: str
    rhs_layout: str
    out_dtypes: tuple
    cfg: GmmConfig
    G: int
    k_iters: int        # K steps of the pipeline
    n_iters: int        # CTA tiles along N
    num_row_tiles: int  # row tiles (`row_tiles`), some unused
    transforms: tuple   # of both operands' SMEM tiles (one swizzle, from the K step)

    @property
    def form(self) -> _OpForm:
        return _OPS[self.op]


class _GmmRefs(NamedTuple):
    """GMEM refs and the scratch shared by every tile of one `gmm` CTA."""

    meta: Any    # row_tiles(...) [4, T] int32
    a: tuple     # lhs [M, K] each
    b: tuple     # rhs [G, K, N] or [G, N, K] each
    o: tuple     # outputs [M, N] each
    allocs: Any  # the pipeline's SMEM stages
    swz: list    # per output: swizzled staging [COMPUTE_WGS, epi_slots, tile_m, epi_tile_n]
    plain: dict  # per output dtype: unswizzled staging [COMPUTE_WGS, tile_m, _PLAIN_N]


class _RowTile(NamedTuple):
    """One output tile of `gmm`: rows [start, start + cta_m) of which [start + lo, start + hi)
    belong to its group (group G, is_tail: the zero rows past the last group), columns from n0."""

    start: jax.Array
    lo: jax.Array
    hi: jax.Array
    is_tail: jax.Array
    gb: jax.Array  # g clipped to a real group: the rhs block to read
    ni: jax.Array
    n0: jax.Array


def gmm(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array, *,
        op: str, rhs_layout: str, out_dtypes: Sequence, cfg: GmmConfig,
        interpret: bool = False) -> tuple[jax.Array, ...]:
    """Grouped matmul kernel (see module docstring); returns one [M, N] array per output.

    lhs: `n_a` arrays [M, K]; rhs: `n_b` arrays [G, K, N] (rhs_layout "kn") or [G, N, K] ("nk");
    group_sizes [G] int32 with sum <= M. Any M, K, N (partial tiles are zero-filled/clipped).
    """
    n_a, n_b = _OPS[op].n_a, _OPS[op].n_b
    assert len(lhs) == n_a and len(rhs) == n_b, (op, len(lhs), len(rhs))
    M0, N0 = lhs[0].shape[0], rhs[0].shape[2] if rhs_layout == "kn" else rhs[0].shape[1]
    # Whole 8 x 64 tiles in GMEM (a no-op for the model's shapes); padded rows are past the
    # last group and padded K columns are zeros, so they change nothing.
    lhs = [_pad(a, {0: ROW_ALIGN, 1: 64}) for a in lhs]
    rhs = [_pad(b, {1: 64, 2: 64}) for b in rhs]
    dtype = lhs[0].dtype
    M, K = lhs[0].shape
    G = rhs[0].shape[0]
    N = rhs[0].shape[2] if rhs_layout == "kn" else rhs[0].shape[1]
    cfg = fit_gmm_config(op, cfg, dtype, out_dtypes)
    tm, tn = cfg.tile_m, cfg.tile_n
    if tn % cfg.epi_tile_n or tn % _PLAIN_N or tm & (tm - 1):
        raise ValueError(f"gmm: shapes M={M} K={K} N={N} do not fit the tiling {cfg}")
    meta = row_tiles(group_sizes, M, cfg.cta_m)
    st = _GmmStatic(op=op, rhs_layout=rhs_layout, out_dtypes=tuple(out_dtypes), cfg=cfg, G=G,
                    k_iters=-(-K // cfg.tile_k), n_iters=-(-N // cfg.cta_n),
                    num_row_tiles=meta.shape[1], transforms=_transforms(cfg.tile_k, dtype))
    call = persistent_kernel(
        functools.partial(_gmm_kernel, st),
        out_type=[jax.ShapeDtypeStruct((M, N), d) for d in out_dtypes],
        num_sms=num_sms(interpret), num_threads=COMPUTE_WGS + 1, kernel_name="grouped_matmul")
    outs = call(meta, *lhs, *rhs)
    return tuple(o[:M0, :N0] if o.shape != (M0, N0) else o for o in outs)


def _gmm_pipeline(st: _GmmStatic, body, context, start, gb, ni):
    """The warp-specialized K loop of one tile; rows start anywhere (Element), rhs blocks are
    aligned. Partial blocks past the array edges are zero-filled by TMA (and clipped on store),
    so no shape must divide."""
    cfg = st.cfg
    a_spec = plgpu.BlockSpec((pl.Element(cfg.cta_m), cfg.tile_k), lambda k: (start, k),
                             transforms=st.transforms, delay_release=cfg.delay_release)
    if st.rhs_layout == "kn":
        b_spec = plgpu.BlockSpec((None, cfg.tile_k, cfg.cta_n), lambda k: (gb, k, ni),
                                 transforms=st.transforms, delay_release=cfg.delay_release)
    else:
        b_spec = plgpu.BlockSpec((None, cfg.cta_n, cfg.tile_k), lambda k: (gb, ni, k),
                                 transforms=st.transforms, delay_release=cfg.delay_release)
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(st.k_iters,), memory_registers=MEMORY_REGS,
        in_specs=[a_spec] * st.form.n_a + [b_spec] * st.form.n_b,
        wg_axis="wg", num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=context)


def _gmm_kernel(st: _GmmStatic, meta_gmem, *refs):
    n_a, n_b = st.form.n_a, st.form.n_b
    a_gmems, b_gmems, o_gmems = refs[:n_a], refs[n_a:n_a + n_b], refs[n_a + n_b:]
    tm, epi = st.cfg.tile_m, st.cfg.epi_tile_n
    wg = lax.axis_index("wg")
    if st.cfg.wg_dim == "m":
        wg_rows, wg_cols = pl.ds(wg * tm, tm), slice(None)
    else:
        wg_rows, wg_cols = slice(None), pl.ds(wg * st.cfg.tile_n, st.cfg.tile_n)
    zero = jnp.int32(0)

    @functools.partial(
        pl.run_scoped,
        allocs=_gmm_pipeline(st, _ignore, _ignore, zero, zero, zero)
        .get_allocations(*a_gmems, *b_gmems),
        swz_smems=[plgpu.SMEM((COMPUTE_WGS, st.cfg.epi_slots, tm, epi), d,
                              transforms=_transforms(epi, d)) for d in st.out_dtypes],
        plain_smems={str(d): plgpu.SMEM((COMPUTE_WGS, tm, _PLAIN_N), d)
                     for d in set(st.out_dtypes)},
        collective_axes="wg",
    )
    def _scope(allocs, swz_smems, plain_smems):
        refs = _GmmRefs(meta_gmem, a_gmems, b_gmems, o_gmems, allocs, swz_smems, plain_smems)

        @plgpu.nd_loop((st.num_row_tiles * st.n_iters,), collective_axes="sm")
        def _tile_loop(loop_info):
            _gmm_tile(st, refs, wg, wg_rows, wg_cols, loop_info.index[0])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ignore(*_, **__):
    """Pipeline body and context of the pipeline built only for its allocations."""


def _gmm_tile(st: _GmmStatic, refs: _GmmRefs, wg, wg_rows, wg_cols, index):
    """Output tile `index` of this CTA's share, in snake order."""
    cfg, G = st.cfg, st.G
    mi, ni = plgpu.planar_snake(index, (st.num_row_tiles, st.n_iters),
                                _minor(cfg.grid_minor_dim), cfg.grid_tile_width)
    g, start, lo, hi = (refs.meta[i, mi] for i in range(4))
    start = pl.multiple_of(start, ROW_ALIGN)
    is_tail = g == G
    gb = jnp.minimum(g, G - 1)
    tile = _RowTile(start, lo, hi, is_tail, gb, ni, ni * cfg.cta_n)

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped,
                           accs=[plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32)] * st.form.n_acc)
        def _acc_scope(accs):
            eval_pipeline(tuple(accs))
            _gmm_epilogue(st, refs, wg, tile, [acc[...] for acc in accs])

    @pl.when(hi > lo)
    def _():
        _gmm_pipeline(st, functools.partial(_gmm_mma, st, wg_rows, wg_cols), compute_context,
                      start, gb, ni)(*refs.a, *refs.b, allocations=refs.allocs)


def _gmm_mma(st: _GmmStatic, wg_rows, wg_cols, _, *refs):
    """One K step: this warpgroup's accumulators += its lhs rows @ its rhs columns."""
    *smems, accs = refs
    for ai, bi, ci in st.form.pairs:
        a_ref = smems[ai].at[wg_rows]
        b_smem = smems[st.form.n_a + bi]
        b_ref = b_smem.at[:, wg_cols] if st.rhs_layout == "kn" else b_smem.at[wg_cols].T
        plgpu.wgmma(accs[ci], a_ref, b_ref)
    plgpu.wgmma_wait(st.cfg.delay_release)
    return accs


def _gmm_epilogue(st: _GmmStatic, refs: _GmmRefs, wg, tile: _RowTile, vals):
    """Stores this warpgroup's accumulators `vals` (through the op's epilogue): whole swizzled
    chunks when all its rows are in the tile's group, else only the group's rows."""
    tm, tn = st.cfg.tile_m, st.cfg.tile_n
    if st.cfg.wg_dim == "m":
        row_base, col_base = wg * tm, tile.n0
    else:
        row_base, col_base = 0, tile.n0 + wg * tn
    r_lo = jnp.clip(tile.lo - row_base, 0, tm)
    r_hi = jnp.clip(tile.hi - row_base, 0, tm)
    out_values = functools.partial(_out_values, st, vals)
    whole = (r_lo == 0) & (r_hi == tm) & ~tile.is_tail

    @pl.when(whole)
    def _whole():  # all rows in the group: one swizzled tile copy per chunk
        _store_whole_rows(st, refs, wg, out_values, tile.start, row_base, col_base)

    @pl.when(~whole)
    def _rows():  # only the group's rows (zeros past the last group)
        _store_group_rows(st, refs, wg, out_values, tile, row_base, col_base, r_lo, r_hi)


def _out_values(st: _GmmStatic, vals, c0, width):
    """Every output's columns [c0, c0 + width) of the accumulators."""
    cols = slice(c0, c0 + width)
    if st.op == "swiglu":
        gate, up = vals[0][:, cols], vals[1][:, cols]
        return [_silu_mul(gate, up), gate, up]
    return [v[:, cols] for v in st.form.epilogue(vals)]


def _store_whole_rows(st: _GmmStatic, refs: _GmmRefs, wg, out_values, start, row_base,
                      col_base):
    """tile_m rows from start + row_base through the swizzled staging tiles, epi_tile_n columns
    a chunk."""
    tm, epi, epi_slots = st.cfg.tile_m, st.cfg.epi_tile_n, st.cfg.epi_slots
    for c in range(st.cfg.tile_n // epi):
        # One bulk-copy group per chunk: the slot written now was last read by the group
        # `epi_slots` chunks back (any earlier group for the first chunk).
        slot = c % epi_slots
        plgpu.wait_smem_to_gmem(0 if c == 0 else epi_slots - 1, wait_read_only=True)
        for j, v in enumerate(out_values(c * epi, epi)):
            refs.swz[j][wg, slot] = v.astype(st.out_dtypes[j])
        plgpu.commit_smem()
        for j, o_gmem in enumerate(refs.o):
            plgpu.copy_smem_to_gmem(
                refs.swz[j].at[wg, slot],
                o_gmem.at[pl.ds(start + row_base, tm), pl.ds(col_base + c * epi, epi)],
                commit_group=False)
        plgpu.commit_smem_to_gmem_group()


def _store_group_rows(st: _GmmStatic, refs: _GmmRefs, wg, out_values, tile: _RowTile, row_base,
                      col_base, r_lo, r_hi):
    """Rows [r_lo, r_hi) of this warpgroup's tile_m (zeros in the tail tile), through the
    unswizzled staging tiles, _PLAIN_N columns a chunk."""
    tm = st.cfg.tile_m
    for c in range(st.cfg.tile_n // _PLAIN_N):
        for j, v in enumerate(out_values(c * _PLAIN_N, _PLAIN_N)):
            dt = st.out_dtypes[j]
            o_smem = refs.plain[str(dt)]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            @pl.when(tile.is_tail)
            def _(o_smem=o_smem, dt=dt):
                o_smem[wg] = _zeros_like_tile((tm, _PLAIN_N), dt)

            @pl.when(~tile.is_tail)
            def _(o_smem=o_smem, dt=dt, v=v):
                o_smem[wg] = v.astype(dt)

            plgpu.commit_smem()
            _store_rows(o_smem.at[wg],
                        refs.o[j].at[:, pl.ds(col_base + c * _PLAIN_N, _PLAIN_N)],
                        r_lo, tile.start + row_base + r_lo, r_hi - r_lo, tm)
            plgpu.commit_smem_to_gmem_group()


@dataclasses.dataclass(frozen=True)
class _TgmmStatic:
    """Trace-time constants of one `tgmm` kernel."""

    cfg: TgmmConfig
    out_dtype: Any
    G: int
    k_iters: int      # CTA tiles along K
    n_iters: int      # CTA tiles along N
    a_tf: tuple       # SMEM transforms of the lhs and dout blocks
    b_tf: tuple

    @property
    def cta_n(self) -> int:
        return COMPUTE_WGS * self.cfg.tile_n


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, out_dtype,
         cfg: TgmmConfig, interpret: bool = False) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ dout[rows of g]: [M, K], [M, N] -> [G, K, N].

    Empty groups give zeros. Any M, K, N (partial tiles are zero-filled/clipped).
    """
    K0, N0 = lhs.shape[1], dout.shape[1]
    lhs = _pad(lhs, {0: ROW_ALIGN, 1: 64})
    dout = _pad(dout, {0: ROW_ALIGN, 1: 64})
    K, N = lhs.shape[1], dout.shape[1]
    G = group_sizes.shape[0]
    cfg = fit_tgmm_config(cfg, lhs.dtype, out_dtype)
    if cfg.tile_n % cfg.epi_tile_n or cfg.tile_k % 128:
        raise ValueError(f"tgmm: tiling {cfg} needs tile_k % 128 == 0, tile_n % epi_tile_n == 0")
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    meta = jnp.stack([ends - group_sizes.astype(jnp.int32), ends]).astype(jnp.int32)  # [2, G]
    st = _TgmmStatic(cfg=cfg, out_dtype=out_dtype, G=G, k_iters=-(-K // cfg.tile_k),
                     n_iters=-(-N // (COMPUTE_WGS * cfg.tile_n)),
                     a_tf=_transforms(64, lhs.dtype), b_tf=_transforms(64, dout.dtype))
    call = persistent_kernel(
        functools.partial(_tgmm_kernel, st), out_type=jax.ShapeDtypeStruct((G, K, N), out_dtype),
        num_sms=num_sms(interpret), num_threads=COMPUTE_WGS + 1,
        kernel_name="grouped_matmul_tgmm")
    out = call(meta, lhs, dout)
    return out[:, :K0, :N0] if (K, N) != (K0, N0) else out


def _tgmm_pipeline(st: _TgmmStatic, body, context, steps, blk0, ki, ni):
    """The warp-specialized loop over a group's contraction blocks for one (ki, ni) tile."""
    cfg = st.cfg
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=MEMORY_REGS,
        in_specs=[
            plgpu.BlockSpec((cfg.tile_c, cfg.tile_k), lambda s: (blk0 + s, ki),
                            transforms=st.a_tf, delay_release=cfg.delay_release),
            plgpu.BlockSpec((cfg.tile_c, st.cta_n), lambda s: (blk0 + s, ni),
                            transforms=st.b_tf, delay_release=cfg.delay_release),
        ],
        wg_axis="wg", num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=context)


def _tgmm_kernel(st: _TgmmStatic, meta_gmem, a_gmem, b_gmem, o_gmem):
    cfg = st.cfg
    wg = lax.axis_index("wg")
    zero = jnp.int32(0)

    @functools.partial(
        pl.run_scoped,
        allocs=_tgmm_pipeline(st, _ignore, _ignore, cfg.max_concurrent_steps, zero, zero, zero)
        .get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM((COMPUTE_WGS, cfg.tile_k, cfg.epi_tile_n), st.out_dtype),
        # Both compute warpgroups mask their halves of a straddling block, then wait.
        mask_barrier=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=1),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, mask_barrier):
        @plgpu.nd_loop((st.G * st.k_iters * st.n_iters,), collective_axes="sm")
        def _tile_loop(loop_info):
            _tgmm_tile(st, meta_gmem, a_gmem, b_gmem, o_gmem, wg, allocs, out_smem, mask_barrier,
                       loop_info.index[0])

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _tgmm_tile(st: _TgmmStatic, meta_gmem, a_gmem, b_gmem, o_gmem, wg, allocs, out_smem,
               mask_barrier, idx):
    """Output tile `idx` of this CTA's share: group g, (ki, ni) in snake order."""
    cfg, tc = st.cfg, st.cfg.tile_c
    g = lax.div(idx, jnp.int32(st.k_iters * st.n_iters))
    ki, ni = plgpu.planar_snake(lax.rem(idx, jnp.int32(st.k_iters * st.n_iters)),
                                (st.k_iters, st.n_iters), _minor(cfg.grid_minor_dim),
                                cfg.grid_tile_width)
    start, end = meta_gmem[0, g], meta_gmem[1, g]
    blk0 = lax.div(start, jnp.int32(tc))
    steps = jnp.where(end > start, lax.div(end + tc - 1, jnp.int32(tc)) - blk0, 0)
    mma_body = functools.partial(_tgmm_mma, st, wg, start, end, blk0, steps, mask_barrier)

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc=plgpu.ACC((cfg.tile_k, cfg.tile_n), jnp.float32))
        def _acc_scope(acc):
            eval_pipeline(acc)
            _tgmm_store(st, acc[...], wg, out_smem, o_gmem, g, ki, ni)

    _tgmm_pipeline(st, mma_body, compute_context, steps, blk0, ki, ni)(
        a_gmem, b_gmem, allocations=allocs)


def _tgmm_mma(st: _TgmmStatic, wg, start, end, blk0, steps, mask_barrier, idxs, a_smem, b_smem,
              acc):
    """Contraction block s: acc += lhs^T @ this warpgroup's half of dout."""
    (s,) = idxs
    tn, tc = st.cfg.tile_n, st.cfg.tile_c
    b_half = b_smem.at[:, pl.ds(wg * tn, tn)]

    # Only a block that straddles the group's first or last row needs a mask.
    straddles = (((s == 0) & (lax.rem(start, jnp.int32(tc)) != 0))
                 | ((s == steps - 1) & (lax.rem(end, jnp.int32(tc)) != 0)))

    @pl.when(straddles)
    def _mask():
        # Each compute warpgroup zeroes the out-of-group rows of its half of both operands (a
        # select: NaN in other rows cannot leak in), then the two wait for each other since
        # both read all of A.
        half_k = st.cfg.tile_k // COMPUTE_WGS
        a_half = a_smem.at[:, pl.ds(wg * half_k, half_k)]
        row0 = (blk0 + s) * tc
        for ref, cols in ((a_half, half_k), (b_half, tn)):
            rows = row0 + plgpu.broadcasted_iota(
                jnp.int32, (tc, cols), 0, layout=plgpu.Layout.WGMMA)
            keep = (rows >= start) & (rows < end)
            ref[...] = jnp.where(keep, ref[...], 0)
        plgpu.commit_smem()
        plgpu.barrier_arrive(mask_barrier.at[0])
        plgpu.barrier_wait(mask_barrier.at[0])

    plgpu.wgmma(acc, a_smem.T, b_half)
    plgpu.wgmma_wait(st.cfg.delay_release)
    return acc


def _tgmm_store(st: _TgmmStatic, val, wg, out_smem, o_gmem, g, ki, ni):
    """This warpgroup's [tile_k, tile_n] of out[g], epi_tile_n columns a chunk."""
    tk, tn, epi = st.cfg.tile_k, st.cfg.tile_n, st.cfg.epi_tile_n
    for c in range(tn // epi):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg] = val[:, c * epi:(c + 1) * epi].astype(st.out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out_smem.at[wg],
            o_gmem.at[g, pl.ds(ki * tk, tk), pl.ds(ni * st.cta_n + wg * tn + c * epi, epi)])


def interpret_context(interpret: bool):
    """Context under which the kernels above are traced: GPU interpret mode on CPU."""
    return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()
