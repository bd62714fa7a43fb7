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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mla_mgpu_common import (
    COLS,
    COMPUTE_REGS,
    LOG2E,
    MEMORY_REGS,
    ROWS,
    SMEM_LIMIT,
    TRANSFORMS,
    WGMMA,
    interpret_params,
    mma,
    mma_multi,
    row_vector,
    smem_bytes,
    wgmma_zeros,
)

ROWS_PER_CTA = 64  # one wgmma M tile
NUM_SMS = 132  # H100 / H200


@dataclasses.dataclass(frozen=True)
class Config:
    """block_kv cache rows per pipeline step; num_splits None picks enough CTAs for the SMs."""

    block_kv: int = 64
    max_concurrent_steps: int = 2
    num_splits: int | None = None
    # Tq * N <= this uses the transposed kernel (_decode_few_rows_call); 0 disables it.
    few_rows_max: int = 32


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype) if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.bfloat16)


def pick_num_splits(batch: int, row_groups: int, capacity: int, block_kv: int) -> int:
    """Key splits per (sequence, row group): fill about one wave of SMs, >= 4 tiles per split."""
    ctas = batch * row_groups
    return int(max(1, min(NUM_SMS // ctas, pl.cdiv(capacity, block_kv) // 4)))


def _decode_call(q_lat, q_rope, kv_cache, lengths, row_limit, *, scale: float, num_tokens: int,
                 num_splits: int, config: Config, interpret: bool):
    """o_part[B, splits, rows, R] (dtype, normalized per split), lse2[B, splits, rows] (fp32)."""
    B, n_rows, R = q_lat.shape
    Hr = q_rope.shape[-1]
    L = kv_cache.shape[1]
    bkv, stages = config.block_kv, config.max_concurrent_steps
    G = n_rows // ROWS_PER_CTA
    Rh = R // 2
    dtype = q_lat.dtype
    c = scale * LOG2E
    blocks_per_split = pl.cdiv(pl.cdiv(L, bkv), num_splits)
    rows64 = ROWS_PER_CTA

    def kernel(ql_ref, qr_ref, kv_ref, len_ref, lim_ref, o_ref, lse_ref, *, q_smem, qr_smem,
               lim_smem, lse_smem, c_smem, kr_smem, q_bar, kv_bars, kv_free, done_bar):
        b, g, sp, wg = (lax.axis_index("batch"), lax.axis_index("rows"),
                        lax.axis_index("split"), lax.axis_index("wg"))
        length = len_ref[b]
        lo = sp * blocks_per_split
        hi = jnp.minimum(lo + blocks_per_split, pl.cdiv(length, bkv))
        n = jnp.maximum(hi - lo, 0)
        rows = pl.ds(g * rows64, rows64)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")

            @pl.when(wg == 0)
            def _load_q():
                for half in range(2):
                    plgpu.copy_gmem_to_smem(ql_ref.at[b, rows, pl.ds(half * Rh, Rh)],
                                            q_smem.at[half], q_bar)
                plgpu.copy_gmem_to_smem(qr_ref.at[b, rows], qr_smem, q_bar)
                plgpu.copy_gmem_to_smem(lim_ref.at[b, rows], lim_smem, q_bar)

            plgpu.barrier_wait(q_bar)
            limit = plgpu.load(lim_smem, layout=ROWS)
            # Cache tiles wholly at or before the first new token's last visible row.
            n_full = jnp.clip((length - num_tokens + 1) // bkv - lo, 0, n)

            def kv_step(i, carry, *, masked):
                acc, m, l = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(kv_bars.at[slot])
                s = mma([(q_smem.at[0], _t(c_smem.at[slot, 0])),
                         (q_smem.at[1], _t(c_smem.at[slot, 1])),
                         (qr_smem, _t(kr_smem.at[slot]))], (rows64, bkv), interpret=interpret)
                s = s * c
                if masked:
                    pos = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=WGMMA)
                    pos = pos + (lo + i) * bkv
                    s = jnp.where(pos <= lax.broadcast_in_dim(limit, s.shape, [0]), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                acc = mma([(p.astype(dtype), c_smem.at[slot, wg])], acc, interpret=interpret)
                plgpu.barrier_arrive(kv_free.at[slot])
                return acc, m_new, l

            carry = (wgmma_zeros((rows64, Rh)), row_vector(-jnp.inf, rows64),
                     row_vector(0.0, rows64))
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            acc, m, l = lax.fori_loop(n_full, n, functools.partial(kv_step, masked=True), carry)
            # An empty split (cache shorter than its range) writes zeros with lse2 = -inf.
            l_safe = jnp.where(l == 0.0, 1.0, l)
            # Both warpgroups read both Q halves; stage the output in them only once both are done.
            plgpu.barrier_arrive(done_bar)
            plgpu.barrier_wait(done_bar)
            q_smem.at[wg][...] = (acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                                  ).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, sp, rows, pl.ds(wg * Rh, Rh)])

            @pl.when(wg == 0)  # both warpgroups hold the same statistics
            def _store_lse():
                lse_smem[...] = m + jnp.log2(l_safe)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, sp, rows])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGS, action="decrease")

            _stream_cache(kv_ref, (c_smem.at[:, 0], c_smem.at[:, 1]), kr_smem, kv_bars, kv_free,
                          b, lo, n, bkv, Rh, R, Hr, stages)

    scratch = _rows_scratch(R, Hr, dtype, config)
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, num_splits, n_rows, R), dtype),
                  jax.ShapeDtypeStruct((B, num_splits, n_rows), jnp.float32)),
        scratch_types=scratch,
        grid=(G, num_splits, B),
        grid_names=("rows", "split", "batch"),
        num_threads=3,
        thread_name="wg",
        kernel_name="mla_decode_rows",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    return call(q_lat, q_rope, kv_cache, lengths, row_limit)


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
    B, n_rows, R = q_lat.shape
    Hr = q_rope.shape[-1]
    L = kv_cache.shape[1]
    bkv, stages = config.block_kv, config.max_concurrent_steps
    Rh = R // 2
    dtype = q_lat.dtype
    c = scale * LOG2E
    blocks_per_split = pl.cdiv(pl.cdiv(L, bkv), num_splits)

    def kernel(ql_ref, qr_ref, kv_ref, len_ref, lim_ref, o_ref, lse_ref, *, q_smem, qr_smem,
               lim_smem, lse_smem, clo_smem, chi_smem, kr_smem, p_smem, ot_smem, q_bar, kv_bars,
               kv_free):
        b, sp, wg = lax.axis_index("batch"), lax.axis_index("split"), lax.axis_index("wg")
        length = len_ref[b]
        lo = sp * blocks_per_split
        hi = jnp.minimum(lo + blocks_per_split, pl.cdiv(length, bkv))
        n = jnp.maximum(hi - lo, 0)

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")
            for half in range(2):
                plgpu.copy_gmem_to_smem(ql_ref.at[b, :, pl.ds(half * Rh, Rh)], q_smem.at[half],
                                        q_bar)
            plgpu.copy_gmem_to_smem(qr_ref.at[b], qr_smem, q_bar)
            plgpu.copy_gmem_to_smem(lim_ref.at[b], lim_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            limit = plgpu.load(lim_smem, layout=COLS)
            n_full = jnp.clip((length - num_tokens + 1) // bkv - lo, 0, n)

            def kv_step(i, carry, *, masked):
                o_lo, o_hi, m, l = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(kv_bars.at[slot])
                # Separate SMEM refs per half: a literal index captured by pl.run_state below
                # trips the Mosaic GPU lowering (0.11.2).
                s_t = mma([(clo_smem.at[slot], _t(q_smem.at[0])),
                           (chi_smem.at[slot], _t(q_smem.at[1])),
                           (kr_smem.at[slot], _t(qr_smem))], (bkv, n_rows), interpret=interpret)
                s_t = s_t * c
                if masked:
                    pos = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=WGMMA)
                    pos = pos + (lo + i) * bkv
                    s_t = jnp.where(pos <= lax.broadcast_in_dim(limit, s_t.shape, [1]), s_t,
                                    -jnp.inf)
                m_new = jnp.maximum(m, s_t.max(axis=0))
                alpha = jnp.exp2(m - m_new)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(m_new, s_t.shape, [1]))
                l = l * alpha + p_t.sum(axis=0)
                _t(p_smem)[...] = p_t.astype(dtype)
                plgpu.commit_smem()
                o_lo, o_hi = mma_multi(
                    [([(_t(clo_smem.at[slot]), _t(p_smem))],
                      o_lo * lax.broadcast_in_dim(alpha, o_lo.shape, [1])),
                     ([(_t(chi_smem.at[slot]), _t(p_smem))],
                      o_hi * lax.broadcast_in_dim(alpha, o_hi.shape, [1]))],
                    interpret=interpret)
                plgpu.barrier_arrive(kv_free.at[slot])
                return o_lo, o_hi, m_new, l

            carry = (wgmma_zeros((Rh, n_rows)), wgmma_zeros((Rh, n_rows)),
                     plgpu.layout_cast(jnp.full((n_rows,), -jnp.inf, jnp.float32), COLS),
                     plgpu.layout_cast(jnp.zeros((n_rows,), jnp.float32), COLS))
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            o_lo, o_hi, m, l = lax.fori_loop(n_full, n, functools.partial(kv_step, masked=True),
                                             carry)
            l_safe = jnp.where(l == 0.0, 1.0, l)  # an empty split: zeros and lse2 = -inf
            inv = lax.broadcast_in_dim(1.0 / l_safe, o_lo.shape, [1])
            ot_smem.at[0][...] = (o_lo * inv).astype(dtype)
            ot_smem.at[1][...] = (o_hi * inv).astype(dtype)
            lse_smem[...] = m + jnp.log2(l_safe)
            plgpu.commit_smem()
            for half in range(2):
                plgpu.copy_smem_to_gmem(ot_smem.at[half], o_ref.at[b, sp, pl.ds(half * Rh, Rh)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, sp])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGS, action="decrease")
            _stream_cache(kv_ref, (clo_smem, chi_smem), kr_smem, kv_bars, kv_free, b, lo, n, bkv,
                          Rh, R, Hr, stages)

    scratch = _few_rows_scratch(n_rows, R, Hr, dtype, config)
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, num_splits, R, n_rows), dtype),
                  jax.ShapeDtypeStruct((B, num_splits, n_rows), jnp.float32)),
        scratch_types=scratch,
        grid=(num_splits, B),
        grid_names=("split", "batch"),
        num_threads=2,
        thread_name="wg",
        kernel_name="mla_decode_few_rows",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    o_t, lse2 = call(q_lat, q_rope, kv_cache, lengths, row_limit)
    return jnp.swapaxes(o_t, 2, 3), lse2


def _rows_scratch(R, Hr, dtype, config: Config) -> dict:
    """SMEM and barriers of the row-major kernel."""
    bkv, stages, rows64, Rh = config.block_kv, config.max_concurrent_steps, ROWS_PER_CTA, R // 2
    return dict(
        q_smem=plgpu.SMEM((2, rows64, Rh), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((rows64, Hr), dtype, transforms=TRANSFORMS),
        lim_smem=plgpu.SMEM((rows64,), jnp.int32),
        lse_smem=plgpu.SMEM((rows64,), jnp.float32),
        c_smem=plgpu.SMEM((stages, 2, bkv, Rh), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        q_bar=plgpu.Barrier(num_arrivals=4),
        kv_bars=plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        done_bar=plgpu.Barrier(num_arrivals=2),
    )


def _few_rows_scratch(n_rows, R, Hr, dtype, config: Config) -> dict:
    """SMEM and barriers of the transposed kernel for n_rows (padded) query rows."""
    bkv, stages, Rh = config.block_kv, config.max_concurrent_steps, R // 2
    return dict(
        q_smem=plgpu.SMEM((2, n_rows, Rh), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((n_rows, Hr), dtype, transforms=TRANSFORMS),
        lim_smem=plgpu.SMEM((n_rows,), jnp.int32),
        lse_smem=plgpu.SMEM((n_rows,), jnp.float32),
        clo_smem=plgpu.SMEM((stages, bkv, Rh), dtype, transforms=TRANSFORMS),
        chi_smem=plgpu.SMEM((stages, bkv, Rh), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        p_smem=plgpu.SMEM((n_rows, bkv), dtype, transforms=TRANSFORMS),
        ot_smem=plgpu.SMEM((2, Rh, n_rows), dtype),
        q_bar=plgpu.Barrier(num_arrivals=4),
        kv_bars=plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    )


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


def _stream_cache(kv_ref, c_halves, kr_smem, kv_bars, kv_free, b, lo, n, bkv, Rh, R, Hr, stages):
    """Memory warpgroup: cache tiles lo .. lo + n - 1 of sequence b through `stages` SMEM slots
    (the two c_kv halves, refs [stages, bkv, R/2], and k_rope land on one barrier per slot)."""

    def load(i, slot):
        kv = pl.ds((lo + i) * bkv, bkv)
        bar = kv_bars.at[slot]
        for half, c_smem in enumerate(c_halves):
            plgpu.copy_gmem_to_smem(kv_ref.at[b, kv, pl.ds(half * Rh, Rh)], c_smem.at[slot],
                                    bar)
        plgpu.copy_gmem_to_smem(kv_ref.at[b, kv, pl.ds(R, Hr)], kr_smem.at[slot], bar)

    for i in range(stages):
        @pl.when(i < n)
        def _prologue(i=i):
            load(i, i)

    @pl.loop(stages, jnp.maximum(n, stages))
    def _steady(i):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(kv_free.at[slot])
        load(i, slot)

    @pl.loop(jnp.maximum(n - stages, 0), n)
    def _tail(i):  # observe the last releases too (every mbarrier phase gets awaited)
        plgpu.barrier_wait(kv_free.at[lax.rem(i, jnp.int32(stages))])


def _t(ref):
    return ref.transpose((1, 0))


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
