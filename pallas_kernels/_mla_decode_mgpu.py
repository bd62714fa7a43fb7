"""Absorbed MLA decode attention for Hopper in Pallas Mosaic GPU (FlashMLA's problem).

Legend (as in mla_decode.py): B sequences, Tq new tokens per sequence, N heads, R latent rank
(512), Hr rope dim (64), L cache capacity. Rows = Tq * N query rows per sequence, all of which read
the same cache rows kv_cache[b, s] = [c_kv (R) ; k_rope (Hr)].

Two kernels, chosen by the number of query rows:

Row-major (_decode_call, Tq * N > 32, e.g. 128 heads).
CTA = (64-row group of one sequence, key split, sequence). The cache is read once per row group
(for N = 128, Tq = 1: twice per sequence, by two CTAs adjacent in launch order, so the second read
mostly hits L2). Three warpgroups: one streams cache tiles [block_kv, R + Hr] with TMA through a
ring of SMEM slots; two compute warpgroups each own half of the output columns (o[:, :R/2] and
o[:, R/2:], 64 x 256 fp32 accumulators). Each compute warpgroup forms the whole score tile
q c^T + q_rope k_rope^T itself, runs the online softmax and multiplies P by its half of c_kv.
Forming the scores twice costs 1.5x the useful QK^T tensor work; splitting them between the
warpgroups (K-split with an exchange of partial scores through SMEM) needs 64 KB more SMEM than
the 227 KB a CTA has once Q (72 KB) and two 64-row cache tiles (2 x 72 KB) are resident, and
64-row cache tiles are the smallest a wgmma with K = block_kv accepts. Two schedules measured
slower on the H200 (2026-11-29) and were removed: the warpgroups taking turns (ping-pong), and
one warpgroup forming each tile's scores, alternating, sharing P over the tile's k_rope slot
(214 vs 163 us of kernel time at B64 L4096 H128): with two cache slots the shorter step puts the
next tile's load latency on the critical path.

Transposed (_decode_few_rows_call, Tq * N <= 32, e.g. 16 heads): the cache tile is wgmma's
64-row side and the query rows its N side, so padding 16 rows to 64 costs no tensor work; see its
docstring.

With several key splits per sequence each CTA writes its normalized partial output and its
log-sum-exp; decode() merges them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mla_mgpu_common import (
    COLS,
    COMPUTE_REGS,
    COMPUTE_WGS,
    LOG2E,
    MEMORY_REGS,
    ROWS,
    SMEM_LIMIT,
    TRANSFORMS,
    WGMMA,
    compute_dtype,
    mma,
    mma_multi,
    row_vector,
    sm_count,
    smem_bytes,
    stream,
    tma_barrier,
    warp_specialized_kernel,
    wgmma_zeros,
)
from pallas_kernels._mla_mgpu_common import transposed as _t

ROWS_PER_CTA = 64  # one wgmma M tile
# R is split in halves: one per compute warpgroup (row-major), two SMEM refs (few-rows); each
# half of q_lat and of a cache tile is one TMA copy.
HALVES = 2
FEW_ROWS_COMPUTE_WGS = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """block_kv cache rows per pipeline step; num_splits None picks enough CTAs for the SMs."""

    block_kv: int = 64
    max_concurrent_steps: int = 2
    num_splits: int | None = None
    # Tq * N <= this uses the transposed kernel (_decode_few_rows_call); 0 disables it.
    few_rows_max: int = 32


def pick_num_splits(batch: int, row_groups: int, capacity: int, block_kv: int) -> int:
    """Key splits per (sequence, row group): fill about one wave of SMs, >= 4 tiles per split."""
    ctas = batch * row_groups
    return int(max(1, min(sm_count() // ctas, pl.cdiv(capacity, block_kv) // 4)))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Trace-time constants of one decode kernel."""

    n_rows: int            # query rows per sequence (padded)
    R: int
    Hr: int
    bkv: int               # cache rows per tile
    stages: int            # slots of the cache ring
    dtype: jnp.dtype       # wgmma operand dtype
    c: float               # scale * log2 e: scores in the log2 domain
    num_tokens: int        # Tq
    blocks_per_split: int  # cache tiles per key split
    interpret: bool

    @property
    def Rh(self) -> int:
        return self.R // HALVES


def _static(q_lat, q_rope, kv_cache, *, scale, num_tokens, num_splits, config, interpret):
    bkv = config.block_kv
    return _Static(n_rows=q_lat.shape[1], R=q_lat.shape[2], Hr=q_rope.shape[-1], bkv=bkv,
                   stages=config.max_concurrent_steps, dtype=q_lat.dtype, c=scale * LOG2E,
                   num_tokens=num_tokens,
                   blocks_per_split=pl.cdiv(pl.cdiv(kv_cache.shape[1], bkv), num_splits),
                   interpret=interpret)


class _Refs(NamedTuple):
    """GMEM refs of both kernels."""

    ql: Any   # q_lat[B, rows, R]
    qr: Any   # q_rope[B, rows, Hr]
    kv: Any   # kv_cache[B, L, R + Hr]
    lengths: Any  # [B]
    row_limit: Any  # [B, rows]: the last cache row each query row sees
    o: Any    # o_part[B, splits, rows, R] (few-rows: [B, splits, R, rows])
    lse: Any  # lse2[B, splits, rows]


def _split_range(st: _Static, len_ref, b, sp):
    """(length, lo, n): the sequence's length and split sp's cache tiles lo .. lo + n - 1."""
    length = len_ref[b]
    lo = sp * st.blocks_per_split
    hi = jnp.minimum(lo + st.blocks_per_split, pl.cdiv(length, st.bkv))
    return length, lo, jnp.maximum(hi - lo, 0)


def _n_full(st: _Static, length, lo, n):
    """Tiles wholly at or before the first new token's last visible row (no mask needed)."""
    return jnp.clip((length - st.num_tokens + 1) // st.bkv - lo, 0, n)


def _mask_past_limit(st: _Static, s, limit, lo, i, *, key_axis: int):
    """Scores of cache tile lo + i past each query row's last visible cache row set to -inf;
    key_axis is the score tile's key dim (limit, a vector along the other, is broadcast)."""
    pos = plgpu.broadcasted_iota(jnp.int32, s.shape, key_axis, layout=WGMMA)
    pos = pos + (lo + i) * st.bkv
    return jnp.where(pos <= lax.broadcast_in_dim(limit, s.shape, [1 - key_axis]), s, -jnp.inf)


def _softmax_step(s, m, l, *, key_axis: int):
    """Online softmax over one tile of log2-domain scores: (p, m_new, alpha, l_new)."""
    m_new = jnp.maximum(m, s.max(axis=key_axis))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1 - key_axis]))
    return p, m_new, alpha, l * alpha + p.sum(axis=key_axis)


def _stream_cache(st: _Static, kv_ref, c_halves, kr_smem, kv_bars, kv_free, b, lo, n):
    """Memory warpgroup: cache tiles lo .. lo + n - 1 of sequence b through `stages` SMEM slots
    (the two c_kv halves, refs [stages, bkv, R/2], and k_rope land on one barrier per slot)."""
    plgpu.set_max_registers(MEMORY_REGS, action="decrease")

    def load(i, slot):
        kv = pl.ds((lo + i) * st.bkv, st.bkv)
        bar = kv_bars.at[slot]
        for half, c_smem in enumerate(c_halves):
            plgpu.copy_gmem_to_smem(kv_ref.at[b, kv, pl.ds(half * st.Rh, st.Rh)],
                                    c_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(kv_ref.at[b, kv, pl.ds(st.R, st.Hr)], kr_smem.at[slot], bar)

    stream(n, st.stages, (load, kv_free))


# ----------------------------------------------------------------------------------------------
# Row-major kernel
# ----------------------------------------------------------------------------------------------
def _decode_call(q_lat, q_rope, kv_cache, lengths, row_limit, *, scale: float, num_tokens: int,
                 num_splits: int, config: Config, interpret: bool):
    """o_part[B, splits, rows, R] (dtype, normalized per split), lse2[B, splits, rows] (fp32)."""
    st = _static(q_lat, q_rope, kv_cache, scale=scale, num_tokens=num_tokens,
                 num_splits=num_splits, config=config, interpret=interpret)
    B = q_lat.shape[0]
    call = warp_specialized_kernel(
        functools.partial(_rows_kernel, st), _Refs, _rows_scratch(st.R, st.Hr, st.dtype, config),
        out_type=(jax.ShapeDtypeStruct((B, num_splits, st.n_rows, st.R), st.dtype),
                  jax.ShapeDtypeStruct((B, num_splits, st.n_rows), jnp.float32)),
        grid=(st.n_rows // ROWS_PER_CTA, num_splits, B), grid_names=("rows", "split", "batch"),
        compute_wgs=COMPUTE_WGS, kernel_name="mla_decode_rows", interpret=interpret)
    return call(q_lat, q_rope, kv_cache, lengths, row_limit)


def _rows_scratch(R, Hr, dtype, config: Config) -> dict:
    """SMEM and barriers of the row-major kernel."""
    bkv, stages, Rh = config.block_kv, config.max_concurrent_steps, R // HALVES
    rows64 = ROWS_PER_CTA
    smem = dict(
        q_smem=plgpu.SMEM((HALVES, rows64, Rh), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((rows64, Hr), dtype, transforms=TRANSFORMS),
        lim_smem=plgpu.SMEM((rows64,), jnp.int32),
        lse_smem=plgpu.SMEM((rows64,), jnp.float32),
        c_smem=plgpu.SMEM((stages, HALVES, bkv, Rh), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
    )
    return smem | dict(
        q_bar=tma_barrier(*[smem["q_smem"]] * HALVES, smem["qr_smem"], smem["lim_smem"]),
        kv_bars=tma_barrier(*[smem["c_smem"]] * HALVES, smem["kr_smem"], num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        done_bar=plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )


def _rows_kernel(st: _Static, refs: _Refs, smem):
    b, g, sp, wg = (lax.axis_index("batch"), lax.axis_index("rows"),
                    lax.axis_index("split"), lax.axis_index("wg"))
    length, lo, n = _split_range(st, refs.lengths, b, sp)
    rows = pl.ds(g * ROWS_PER_CTA, ROWS_PER_CTA)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        _rows_compute(st, refs, smem, b, sp, wg, rows, length, lo, n)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        _stream_cache(st, refs.kv, (smem.c_smem.at[:, 0], smem.c_smem.at[:, 1]), smem.kr_smem,
                      smem.kv_bars, smem.kv_free, b, lo, n)


def _rows_compute(st: _Static, refs: _Refs, smem, b, sp, wg, rows, length, lo, n):
    """Compute warpgroup wg: o[rows, half wg of R] of split sp over its n cache tiles."""
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")

    @pl.when(wg == 0)
    def _load_q():
        for half in range(HALVES):
            plgpu.copy_gmem_to_smem(refs.ql.at[b, rows, pl.ds(half * st.Rh, st.Rh)],
                                    smem.q_smem.at[half], smem.q_bar)
        plgpu.copy_gmem_to_smem(refs.qr.at[b, rows], smem.qr_smem, smem.q_bar)
        plgpu.copy_gmem_to_smem(refs.row_limit.at[b, rows], smem.lim_smem, smem.q_bar)

    plgpu.barrier_wait(smem.q_bar)
    limit = plgpu.load(smem.lim_smem, layout=ROWS)
    n_full = _n_full(st, length, lo, n)
    step = functools.partial(_rows_kv_step, st, smem, wg, lo, limit)
    carry = (wgmma_zeros((ROWS_PER_CTA, st.Rh)), row_vector(-jnp.inf, ROWS_PER_CTA),
             row_vector(0.0, ROWS_PER_CTA))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)
    # An empty split (cache shorter than its range) writes zeros with lse2 = -inf.
    l_safe = jnp.where(l == 0.0, 1.0, l)
    # Both warpgroups read both Q halves; stage the output in them only once both are done.
    plgpu.barrier_arrive(smem.done_bar)
    plgpu.barrier_wait(smem.done_bar)
    smem.q_smem.at[wg][...] = (acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                               ).astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem.q_smem.at[wg], refs.o.at[b, sp, rows, pl.ds(wg * st.Rh, st.Rh)])

    @pl.when(wg == 0)  # both warpgroups hold the same statistics
    def _store_lse():
        smem.lse_smem[...] = m + jnp.log2(l_safe)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem.lse_smem, refs.lse.at[b, sp, rows])

    plgpu.wait_smem_to_gmem(0)


def _rows_kv_step(st: _Static, smem, wg, lo, limit, i, carry, *, masked):
    """Cache tile lo + i: scores of all 64 rows, then P times this warpgroup's half of c_kv."""
    acc, m, l = carry
    slot = lax.rem(i, jnp.int32(st.stages))
    plgpu.barrier_wait(smem.kv_bars.at[slot])
    s = mma([(smem.q_smem.at[0], _t(smem.c_smem.at[slot, 0])),
             (smem.q_smem.at[1], _t(smem.c_smem.at[slot, 1])),
             (smem.qr_smem, _t(smem.kr_smem.at[slot]))], (ROWS_PER_CTA, st.bkv),
            interpret=st.interpret)
    s = s * st.c
    if masked:
        s = _mask_past_limit(st, s, limit, lo, i, key_axis=1)
    p, m_new, alpha, l = _softmax_step(s, m, l, key_axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    acc = mma([(p.astype(st.dtype), smem.c_smem.at[slot, wg])], acc, interpret=st.interpret)
    plgpu.barrier_arrive(smem.kv_free.at[slot])
    return acc, m_new, l


# ----------------------------------------------------------------------------------------------
# Transposed (few-rows) kernel
# ----------------------------------------------------------------------------------------------
def _decode_few_rows_call(q_lat, q_rope, kv_cache, lengths, row_limit, *, scale: float,
                          num_tokens: int, num_splits: int, config: Config, interpret: bool):
    """Transposed form for few query rows (Tq * N <= 32, e.g. 16 heads): the cache tile is the
    64-row wgmma operand and the query rows are the N side, so no tensor work is spent on padding
    rows (the row-major kernel pads 16 rows to 64):
      s^T[bkv, rows] = c[bkv, :R] q[rows, :R]^T + k_rope[bkv] q_rope[rows]^T
      o^T[R, rows] += c^T p^T, with p staged in SMEM as [rows, bkv] (wgmma's B operand,
      K-major: written through a transposed view).
    One compute warpgroup (o^T is 2 x 256 x rows fp32) and one TMA warpgroup per CTA; the softmax
    reduces over the key axis (across warps).

    Returns o_part[B, splits, rows, R] (dtype, normalized per split), lse2[B, splits, rows].
    """
    st = _static(q_lat, q_rope, kv_cache, scale=scale, num_tokens=num_tokens,
                 num_splits=num_splits, config=config, interpret=interpret)
    B = q_lat.shape[0]
    call = warp_specialized_kernel(
        functools.partial(_few_rows_kernel, st), _Refs,
        _few_rows_scratch(st.n_rows, st.R, st.Hr, st.dtype, config),
        out_type=(jax.ShapeDtypeStruct((B, num_splits, st.R, st.n_rows), st.dtype),
                  jax.ShapeDtypeStruct((B, num_splits, st.n_rows), jnp.float32)),
        grid=(num_splits, B), grid_names=("split", "batch"), compute_wgs=FEW_ROWS_COMPUTE_WGS,
        kernel_name="mla_decode_few_rows", interpret=interpret)
    o_t, lse2 = call(q_lat, q_rope, kv_cache, lengths, row_limit)
    return jnp.swapaxes(o_t, 2, 3), lse2


def _few_rows_scratch(n_rows, R, Hr, dtype, config: Config) -> dict:
    """SMEM and barriers of the transposed kernel for n_rows (padded) query rows."""
    bkv, stages, Rh = config.block_kv, config.max_concurrent_steps, R // HALVES
    smem = dict(
        q_smem=plgpu.SMEM((HALVES, n_rows, Rh), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((n_rows, Hr), dtype, transforms=TRANSFORMS),
        lim_smem=plgpu.SMEM((n_rows,), jnp.int32),
        lse_smem=plgpu.SMEM((n_rows,), jnp.float32),
        clo_smem=plgpu.SMEM((stages, bkv, Rh), dtype, transforms=TRANSFORMS),
        chi_smem=plgpu.SMEM((stages, bkv, Rh), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        p_smem=plgpu.SMEM((n_rows, bkv), dtype, transforms=TRANSFORMS),
        ot_smem=plgpu.SMEM((HALVES, Rh, n_rows), dtype),
    )
    return smem | dict(
        q_bar=tma_barrier(*[smem["q_smem"]] * HALVES, smem["qr_smem"], smem["lim_smem"]),
        kv_bars=tma_barrier(smem["clo_smem"], smem["chi_smem"], smem["kr_smem"],
                            num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=FEW_ROWS_COMPUTE_WGS, num_barriers=stages),
    )


def _few_rows_kernel(st: _Static, refs: _Refs, smem):
    b, sp, wg = lax.axis_index("batch"), lax.axis_index("split"), lax.axis_index("wg")
    length, lo, n = _split_range(st, refs.lengths, b, sp)

    @pl.when(wg == 0)
    def _compute():
        _few_rows_compute(st, refs, smem, b, sp, length, lo, n)

    @pl.when(wg == FEW_ROWS_COMPUTE_WGS)
    def _memory():
        _stream_cache(st, refs.kv, (smem.clo_smem, smem.chi_smem), smem.kr_smem, smem.kv_bars,
                      smem.kv_free, b, lo, n)


def _few_rows_compute(st: _Static, refs: _Refs, smem, b, sp, length, lo, n):
    """The compute warpgroup: o^T[R, rows] of split sp over its n cache tiles."""
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")
    for half in range(HALVES):
        plgpu.copy_gmem_to_smem(refs.ql.at[b, :, pl.ds(half * st.Rh, st.Rh)],
                                smem.q_smem.at[half], smem.q_bar)
    plgpu.copy_gmem_to_smem(refs.qr.at[b], smem.qr_smem, smem.q_bar)
    plgpu.copy_gmem_to_smem(refs.row_limit.at[b], smem.lim_smem, smem.q_bar)
    plgpu.barrier_wait(smem.q_bar)
    limit = plgpu.load(smem.lim_smem, layout=COLS)
    n_full = _n_full(st, length, lo, n)
    step = functools.partial(_few_rows_kv_step, st, smem, lo, limit)
    carry = (wgmma_zeros((st.Rh, st.n_rows)), wgmma_zeros((st.Rh, st.n_rows)),
             plgpu.layout_cast(jnp.full((st.n_rows,), -jnp.inf, jnp.float32), COLS),
             plgpu.layout_cast(jnp.zeros((st.n_rows,), jnp.float32), COLS))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    o_lo, o_hi, m, l = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # an empty split: zeros and lse2 = -inf
    inv = lax.broadcast_in_dim(1.0 / l_safe, o_lo.shape, [1])
    smem.ot_smem.at[0][...] = (o_lo * inv).astype(st.dtype)
    smem.ot_smem.at[1][...] = (o_hi * inv).astype(st.dtype)
    smem.lse_smem[...] = m + jnp.log2(l_safe)
    plgpu.commit_smem()
    for half in range(HALVES):
        plgpu.copy_smem_to_gmem(smem.ot_smem.at[half],
                                refs.o.at[b, sp, pl.ds(half * st.Rh, st.Rh)])
    plgpu.copy_smem_to_gmem(smem.lse_smem, refs.lse.at[b, sp])
    plgpu.wait_smem_to_gmem(0)


def _few_rows_kv_step(st: _Static, smem, lo, limit, i, carry, *, masked):
    """Cache tile lo + i: s^T = c q^T + k_rope q_rope^T, then o^T += c^T p^T."""
    o_lo, o_hi, m, l = carry
    slot = lax.rem(i, jnp.int32(st.stages))
    plgpu.barrier_wait(smem.kv_bars.at[slot])
    clo, chi = smem.clo_smem.at[slot], smem.chi_smem.at[slot]
    # Separate SMEM refs per half: a literal index captured by pl.run_state below trips the
    # Mosaic GPU lowering (0.11.2).
    s_t = mma([(clo, _t(smem.q_smem.at[0])), (chi, _t(smem.q_smem.at[1])),
               (smem.kr_smem.at[slot], _t(smem.qr_smem))], (st.bkv, st.n_rows),
              interpret=st.interpret)
    s_t = s_t * st.c
    if masked:
        s_t = _mask_past_limit(st, s_t, limit, lo, i, key_axis=0)
    p_t, m_new, alpha, l = _softmax_step(s_t, m, l, key_axis=0)
    _t(smem.p_smem)[...] = p_t.astype(st.dtype)
    plgpu.commit_smem()
    o_lo, o_hi = mma_multi(
        [([(_t(clo), _t(smem.p_smem))], o_lo * lax.broadcast_in_dim(alpha, o_lo.shape, [1])),
         ([(_t(chi), _t(smem.p_smem))], o_hi * lax.broadcast_in_dim(alpha, o_hi.shape, [1]))],
        interpret=st.interpret)
    plgpu.barrier_arrive(smem.kv_free.at[slot])
    return o_lo, o_hi, m_new, l


def unsupported(R: int, Hr: int, N: int, Tq: int, *, config: Config | None = None) -> str | None:
    """Why the decode kernels cannot run this latent rank, rope dim, head count and token count
    (None: they can). Each compute warpgroup owns half of the R output columns in 128-byte
    swizzle tiles of 64 bf16, so R must be a multiple of 128 and Hr of 64; Q and the cache
    tiles of the chosen kernel (row-major for Tq * N > few_rows_max) must fit one CTA's SMEM."""
    config = Config() if config is None else config
    if R % 128:
        return f"kv_lora_rank={R} is not a multiple of 128 (two 64-wide swizzle tiles per half)"
    if Hr % 64:
        return f"qk_rope_head_dim={Hr} is not a multiple of 64 (the 128-byte swizzle tile)"
    n_rows = Tq * N
    if n_rows <= config.few_rows_max:
        kernel, scratch = "few-rows", _few_rows_scratch(pl.cdiv(n_rows, 16) * 16, R, Hr,
                                                       jnp.bfloat16, config)
    else:
        kernel, scratch = "row-major", _rows_scratch(R, Hr, jnp.bfloat16, config)
    used = smem_bytes(scratch)
    if used > SMEM_LIMIT:
        return (f"kv_lora_rank={R} with qk_rope_head_dim={Hr} ({Tq} x {N} query rows) needs "
                f"{used} bytes of shared memory in the {kernel} kernel, above the {SMEM_LIMIT} a "
                "Hopper CTA has (DeepSeek-V3's 512 + 64 fits)")
    return None


def decode(q_latent, q_rope, kv_cache, lengths, *, scale: float, config: Config | None = None,
           interpret: bool = False):
    """o_latent[B, Tq, N, R] (see mla_decode.py for the semantics)."""
    config = Config() if config is None else config
    B, Tq, N, R = q_latent.shape
    Hr, L = q_rope.shape[-1], kv_cache.shape[1]
    reason = unsupported(R, Hr, N, Tq, config=config)
    if reason:
        raise ValueError(f"mla_decode implementation 'pallas' on gpu: {reason}; use "
                         "implementation 'xla'")
    out_dtype = q_latent.dtype
    dtype = compute_dtype(out_dtype)
    n_rows = Tq * N
    few_rows = n_rows <= config.few_rows_max
    G = 1 if few_rows else pl.cdiv(n_rows, ROWS_PER_CTA)
    # The transposed kernel takes the rows as wgmma's N (multiple of 16 here).
    padded_rows = pl.cdiv(n_rows, 16) * 16 if few_rows else G * ROWS_PER_CTA
    pad = padded_rows - n_rows
    num_splits = config.num_splits or pick_num_splits(B, G, L, config.block_kv)
    with jax.named_scope("mla_decode_mgpu_prep"):
        q_lat = jnp.pad(q_latent.reshape(B, n_rows, R).astype(dtype), ((0, 0), (0, pad), (0, 0)))
        q_rp = jnp.pad(q_rope.reshape(B, n_rows, Hr).astype(dtype), ((0, 0), (0, pad), (0, 0)))
        lengths = lengths.astype(jnp.int32)
        # Query row r (token r // N) sees cache rows <= lengths - Tq + r // N.
        token_r = jnp.arange(padded_rows, dtype=jnp.int32) // N
        row_limit = jnp.minimum(lengths[:, None] - Tq + token_r[None, :], lengths[:, None] - 1)
        kv_cache = kv_cache.astype(dtype)
        if L % 8:
            # TMA reads the cache in 8-row tiles, so its capacity must be a multiple of 8: a cache
            # allocated that way is read in place, any other is copied (padded) here.
            kv_cache = jnp.pad(kv_cache, ((0, 0), (0, -L % 8), (0, 0)))
    call = _decode_few_rows_call if few_rows else _decode_call
    o_part, lse2 = call(q_lat, q_rp, kv_cache, lengths, row_limit, scale=scale, num_tokens=Tq,
                        num_splits=num_splits, config=config, interpret=interpret)
    with jax.named_scope("mla_decode_mgpu_merge"):
        if num_splits == 1:
            o = o_part[:, 0]
        else:
            w = jnp.exp2(lse2 - lse2.max(axis=1, keepdims=True))  # [B, splits, rows]
            o = (jnp.einsum("BCr,BCrR->BrR", w, o_part.astype(jnp.float32))
                 / w.sum(axis=1)[..., None])
    return o[:, :n_rows].reshape(B, Tq, N, R).astype(out_dtype)
