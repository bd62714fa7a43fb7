"""Causal MLA flash attention for Hopper in Pallas Mosaic GPU: forward, dq and dk/dv kernels.

Legend (as in mla_attention.py): B batch, T query length == S key length, N heads, Hn nope head dim,
Hr rope head dim (one rope key shared by all heads), Hv value head dim.

The shared rope key k_rope[B, S, Hr] is read by every head straight from its one copy (no
broadcast to [B, S, N, Hr]); the scores are two wgmmas into one accumulator,
q_nope k_nope^T + q_rope k_rope^T, so q/k are never concatenated to 192 and v is never padded.

Each CTA runs three warpgroups (FlashAttention-3 layout): two compute warpgroups own block rows
each, one memory warpgroup streams the other operand's tiles through a ring of SMEM slots with TMA.
  forward: CTA = (head, 2 * block_q query rows, batch); streams k_nope, k_rope, v (and key segment
           ids); the compute warpgroups ping-pong (one runs softmax while the other's wgmma runs).
  dq:      CTA = (head, 2 * block_q_dq query rows, batch); streams k_nope, k_rope, v.
  dk/dv:   CTA = (head, DKV_TILE key rows, batch); streams q_nope, q_rope, do, lse, delta.
           Warpgroup 0 forms S^T, P^T and dK_nope, warpgroup 1 dP^T, dS^T, dV and dK_rope; P^T and
           dS^T pass between them through SMEM, and the key and value tiles are register
           operands. dk_rope is written per head in fp32 and summed over heads outside.
Causality and packed documents bound every loop: a query block visits key blocks from the first
block holding a key of any of its segments (kv_lo) to the diagonal; a key block visits query
blocks from the diagonal to the last query of its segments (q_hi). Blocks strictly inside the
causal triangle skip the mask when there are no segment ids.

Softmax statistics are kept in the log2 domain: lse2 = log2(sum exp2(s * scale * log2 e)), so the
saved residual is lse2 [B, N, T] (fp32); lse (natural) = lse2 / log2 e.
Sequence lengths must be multiples of `Config.seq_multiple`; mla_attention.py pads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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

# Keys per dk/dv CTA and query rows per step: the warpgroups' registers (accumulators of
# DKV_TILE rows, the key/value tiles as wgmma operands) leave no room for larger tiles.
DKV_TILE = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes. Forward and dq: a CTA's two compute warpgroups own block_q (block_q_dq) query
    rows each. dk/dv's tiles are fixed at DKV_TILE (see _backward_dkv_call)."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_dq: int = 64
    block_kv_dq: int = 64
    bwd_concurrent_steps: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64")
        if min(self.max_concurrent_steps, self.bwd_concurrent_steps) < 2:
            raise ValueError("need at least 2 pipeline slots")

    @property
    def seq_multiple(self) -> int:
        return math.lcm(2 * self.block_q, self.block_kv, 2 * self.block_q_dq, self.block_kv_dq,
                        DKV_TILE)


def _t(ref):
    """Transposed view of a [rows, cols] SMEM tile (wgmma reads it K-major)."""
    return ref.transpose((1, 0))


def _bcast_rows(x_r, shape):
    return lax.broadcast_in_dim(x_r, shape, [0])


def _bcast_cols(x_c, shape):
    return lax.broadcast_in_dim(x_c, shape, [1])


def _visible(shape, row0, col0, *, rows_are_queries, seg_rows=None, seg_cols=None):
    """Causal (and same-segment) visibility of a [rows, cols] score tile in the WGMMA layout."""
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA) + row0
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA) + col0
    vis = rows >= cols if rows_are_queries else cols >= rows
    if seg_rows is not None:
        vis = vis & (_bcast_rows(seg_rows, shape) == _bcast_cols(seg_cols, shape))
    return vis


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def _forward_call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo_bc, *, scale: float,
                  config: Config, has_segments: bool, interpret: bool):
    """o[B, T, N, Hv] (q dtype) and lse2[B, N, T] (fp32, log2 domain).

    seg_bt[B, T] int32 (ignored unless has_segments); kv_lo_bc[B, T // (2 block_q)] int32: first
    key block each CTA must visit (0 without segments).
    """
    B, T, N, Hn = q_nope.shape
    Hr, Hv = q_rope.shape[-1], v.shape[-1]
    bq, bkv, stages = config.block_q, config.block_kv, config.max_concurrent_steps
    n_q_ctas = T // (2 * bq)
    dtype = q_nope.dtype
    c = scale * LOG2E
    reuse_q_for_o = Hv == Hn  # o staged in q's SMEM tile (_forward_scratch)

    def kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, seg_ref, kvlo_ref, o_ref, lse_ref, *,
               qn_smem2, qr_smem2, o_smem2, segq_smem2, lse_smem2, kn_smem, kr_smem, v_smem,
               segk_smem, q_bars, k_bars, v_bars, k_free, v_free, sched):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        qc = n_q_ctas - 1 - lax.axis_index("q_seq")  # heaviest causal rows first
        cta_q0 = qc * (2 * bq)
        kv_lo = kvlo_ref[b, qc] if has_segments else jnp.int32(0)
        n_cta = pl.cdiv(cta_q0 + 2 * bq, bkv) - kv_lo  # key blocks the memory warpgroup streams

        def schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")
            q0 = cta_q0 + wg * bq
            rows = pl.ds(q0, bq)
            qn_smem, qr_smem = qn_smem2.at[wg], qr_smem2.at[wg]
            plgpu.copy_gmem_to_smem(qn_ref.at[b, rows, h], qn_smem, q_bars.at[wg])
            plgpu.copy_gmem_to_smem(qr_ref.at[b, rows, h], qr_smem, q_bars.at[wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq_smem2.at[wg], q_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])
            seg_q = (plgpu.load(segq_smem2.at[wg], layout=ROWS) if has_segments else None)
            n_steps = pl.cdiv(q0 + bq, bkv) - kv_lo
            # Key blocks entirely below the diagonal need no mask (segments always need one).
            n_full = jnp.int32(0) if has_segments else lax.div(q0, jnp.int32(bkv))

            plgpu.barrier_wait(k_bars.at[0])
            pl.when(wg == 1)(schedule_barrier)

            def kv_step(i, carry, *, masked):
                acc, m, l = carry
                slot = lax.rem(i, jnp.int32(stages))
                s = mma([(qn_smem, _t(kn_smem.at[slot])), (qr_smem, _t(kr_smem.at[slot]))],
                        (bq, bkv), interpret=interpret, between=schedule_barrier)
                s = s * c
                if masked:
                    seg_k = (plgpu.load(segk_smem.at[slot], layout=COLS)
                             if has_segments else None)
                    vis = _visible((bq, bkv), q0, (kv_lo + i) * bkv, rows_are_queries=True,
                                   seg_rows=seg_q, seg_cols=seg_k)
                    s = jnp.where(vis, s, -jnp.inf)
                plgpu.barrier_arrive(k_free.at[slot])
                m_new = jnp.maximum(m, s.max(axis=1))
                # A row that has seen no visible key yet (packed documents) keeps m = -inf; shift
                # by 0 instead so that alpha and p come out 0 rather than NaN.
                m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if has_segments else m_new
                alpha = jnp.exp2(m - m_ref)
                p = jnp.exp2(s - _bcast_rows(m_ref, s.shape))
                acc = acc * _bcast_rows(alpha, acc.shape)
                l = l * alpha
                p16 = p.astype(dtype)
                l = l + p.sum(axis=1)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(sched)  # the other warpgroup's QK wgmma is issued

                def wait_next_k():
                    @pl.when(i + 1 < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bars.at[lax.rem(i + 1, jnp.int32(stages))])

                acc = mma([(p16, v_smem.at[slot])], acc, interpret=interpret, between=wait_next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def drain_step(i, _):
                # Keep the slot ring and the ping-pong barrier in step with the other warpgroup
                # for the key blocks only it needs. Waiting on the (already requested) tiles keeps
                # every barrier phase observed, which mbarrier parity waits rely on.
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                schedule_barrier()
                schedule_barrier()

            carry = (wgmma_zeros((bq, Hv)), row_vector(-jnp.inf, bq), row_vector(0.0, bq))
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            carry = lax.fori_loop(n_full, n_steps, functools.partial(kv_step, masked=True), carry)
            lax.fori_loop(n_steps, n_cta, drain_step, None)
            pl.when(wg == 0)(schedule_barrier)

            acc, m, l = carry
            o_smem = qn_smem if reuse_q_for_o else o_smem2.at[wg]
            o_smem[...] = (acc * _bcast_rows(1.0 / l, acc.shape)).astype(dtype)
            lse_smem2.at[wg][...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, rows, h])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGS, action="decrease")

            def load_k(i, slot):
                kv = pl.ds((kv_lo + i) * bkv, bkv)
                plgpu.copy_gmem_to_smem(kn_ref.at[b, kv, h], kn_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(kr_ref.at[b, kv], kr_smem.at[slot], k_bars.at[slot])
                if has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, kv], segk_smem.at[slot],
                                            k_bars.at[slot])

            def load_v(i, slot):
                kv = pl.ds((kv_lo + i) * bkv, bkv)
                plgpu.copy_gmem_to_smem(v_ref.at[b, kv, h], v_smem.at[slot], v_bars.at[slot])

            for i in range(stages):
                @pl.when(i < n_cta)
                def _prologue(i=i):
                    load_k(i, i)
                    load_v(i, i)

            @pl.loop(stages, jnp.maximum(n_cta, stages))
            def _steady(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                load_k(i, slot)
                plgpu.barrier_wait(v_free.at[slot])
                load_v(i, slot)

            @pl.loop(jnp.maximum(n_cta - stages, 0), n_cta)
            def _tail(i):  # observe the last releases too (every mbarrier phase gets awaited)
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    scratch = _forward_scratch(Hn, Hr, Hv, dtype, config, has_segments)
    call = plgpu.kernel(
        _drop_none_kwargs(kernel, scratch),
        out_type=(jax.ShapeDtypeStruct((B, T, N, Hv), dtype),
                  jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        scratch_types={k: s for k, s in scratch.items() if s is not None},
        grid=(N, n_q_ctas, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        kernel_name="mla_attention_fwd",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    return call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo_bc)


# ----------------------------------------------------------------------------------------------
# Backward: dq
# ----------------------------------------------------------------------------------------------
def _backward_dq_call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, kv_lo_bc, *,
                scale: float, config: Config, has_segments: bool, interpret: bool):
    """dq_nope[B, T, N, Hn], dq_rope[B, T, N, Hr] (q dtype).

    do[B, T, N, Hv]; lse2, delta[B, N, T] fp32 (delta = rowsum(o * do));
    kv_lo_bc[B, T // (2 block_q_dq)] int32: first key block each CTA visits.
    """
    B, T, N, Hn = q_nope.shape
    Hr, Hv = q_rope.shape[-1], v.shape[-1]
    bq, bkv, stages = config.block_q_dq, config.block_kv_dq, config.bwd_concurrent_steps
    n_q_ctas = T // (2 * bq)
    dtype = q_nope.dtype
    c = scale * LOG2E

    def kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref,
               kvlo_ref, dqn_ref, dqr_ref, *, qn_smem2, qr_smem2, do_smem2, lse_smem2,
               delta_smem2, segq_smem2, kn_smem, kr_smem, v_smem, segk_smem, q_bars, kv_bars,
               kv_free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        qc = n_q_ctas - 1 - lax.axis_index("q_seq")
        cta_q0 = qc * (2 * bq)
        kv_lo = kvlo_ref[b, qc] if has_segments else jnp.int32(0)
        n_cta = pl.cdiv(cta_q0 + 2 * bq, bkv) - kv_lo

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")
            q0 = cta_q0 + wg * bq
            rows = pl.ds(q0, bq)
            qn_smem, qr_smem, do_smem = qn_smem2.at[wg], qr_smem2.at[wg], do_smem2.at[wg]
            plgpu.copy_gmem_to_smem(qn_ref.at[b, rows, h], qn_smem, q_bars.at[wg])
            plgpu.copy_gmem_to_smem(qr_ref.at[b, rows, h], qr_smem, q_bars.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, q_bars.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem2.at[wg], q_bars.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem2.at[wg], q_bars.at[wg])
            if has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq_smem2.at[wg], q_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])
            lse = plgpu.load(lse_smem2.at[wg], layout=ROWS)
            delta = plgpu.load(delta_smem2.at[wg], layout=ROWS)
            seg_q = plgpu.load(segq_smem2.at[wg], layout=ROWS) if has_segments else None
            n_steps = pl.cdiv(q0 + bq, bkv) - kv_lo
            n_full = jnp.int32(0) if has_segments else lax.div(q0, jnp.int32(bkv))

            def kv_step(i, carry, *, masked):
                dqn, dqr = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(kv_bars.at[slot])
                s, dp = mma_multi(
                    [([(qn_smem, _t(kn_smem.at[slot])), (qr_smem, _t(kr_smem.at[slot]))],
                      (bq, bkv)),
                     ([(do_smem, _t(v_smem.at[slot]))], (bq, bkv))],
                    interpret=interpret)
                s = s * c
                if masked:
                    seg_k = (plgpu.load(segk_smem.at[slot], layout=COLS)
                             if has_segments else None)
                    vis = _visible((bq, bkv), q0, (kv_lo + i) * bkv, rows_are_queries=True,
                                   seg_rows=seg_q, seg_cols=seg_k)
                    s = jnp.where(vis, s, -jnp.inf)
                p = jnp.exp2(s - _bcast_rows(lse, s.shape))
                ds = (p * (dp - _bcast_rows(delta, dp.shape))).astype(dtype)
                dqn, dqr = mma_multi([([(ds, kn_smem.at[slot])], dqn),
                                      ([(ds, kr_smem.at[slot])], dqr)], interpret=interpret)
                plgpu.barrier_arrive(kv_free.at[slot])
                return dqn, dqr

            def drain_step(i, _):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(kv_bars.at[slot])
                plgpu.barrier_arrive(kv_free.at[slot])

            carry = (wgmma_zeros((bq, Hn)), wgmma_zeros((bq, Hr)))
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            carry = lax.fori_loop(n_full, n_steps, functools.partial(kv_step, masked=True), carry)
            lax.fori_loop(n_steps, n_cta, drain_step, None)
            dqn, dqr = carry
            qn_smem[...] = (dqn * scale).astype(dtype)
            qr_smem[...] = (dqr * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qn_smem, dqn_ref.at[b, rows, h])
            plgpu.copy_smem_to_gmem(qr_smem, dqr_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGS, action="decrease")

            def load(i, slot):
                kv = pl.ds((kv_lo + i) * bkv, bkv)
                bar = kv_bars.at[slot]
                plgpu.copy_gmem_to_smem(kn_ref.at[b, kv, h], kn_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(kr_ref.at[b, kv], kr_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(v_ref.at[b, kv, h], v_smem.at[slot], bar)
                if has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, kv], segk_smem.at[slot], bar)

            _stream(load, n_cta, stages, kv_free)

    scratch = _dq_scratch(Hn, Hr, Hv, dtype, config, has_segments)
    call = plgpu.kernel(
        _drop_none_kwargs(kernel, scratch),
        out_type=(jax.ShapeDtypeStruct((B, T, N, Hn), dtype),
                  jax.ShapeDtypeStruct((B, T, N, Hr), dtype)),
        scratch_types={k: s for k, s in scratch.items() if s is not None},
        grid=(N, n_q_ctas, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        kernel_name="mla_attention_dq",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    return call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, kv_lo_bc)


# ----------------------------------------------------------------------------------------------
# Backward: dk, dv
# ----------------------------------------------------------------------------------------------
def _backward_dkv_call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, q_hi_bc, *,
                       scale: float, config: Config, has_segments: bool, interpret: bool):
    """dk_nope[B, S, N, Hn], dv[B, S, N, Hv] (q dtype) and per-head dk_rope[B, S, N, Hr] (fp32).

    A CTA owns DKV_TILE keys and visits DKV_TILE query rows per step; its two compute
    warpgroups split the gradient's columns: for each query block the score warpgroup (0) forms
    S^T and P^T and accumulates dK_nope, the gradient warpgroup (1) forms dP^T and dS^T and
    accumulates dV and dK_rope. P^T goes 0 -> 1 and dS^T 1 -> 0 through double-buffered SMEM
    tiles; warpgroup 0 forms S^T of the next block before its dK_nope of the last, so each
    hand-off hides behind the other's wgmmas. Each warpgroup holds 64 or 96 accumulator
    registers per thread (a split by key rows held 160 and spilled) and both do equal tensor work
    (192 + 128 and 128 + 128 + 64 deep).
    q_hi_bc[B, S // DKV_TILE] int32: one past the last query block each CTA visits.
    """
    B, T, N, Hn = q_nope.shape
    Hr, Hv = q_rope.shape[-1], v.shape[-1]
    bq = bkv = DKV_TILE
    stages = config.bwd_concurrent_steps
    n_kv_ctas = T // bkv
    dtype = q_nope.dtype
    c = scale * LOG2E

    def kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref,
               qhi_ref, dkn_ref, dv_ref, dkr_ref, *, kn_smem, kr_smem, v_smem, dkr_smem,
               segk_smem, qn_smem, qr_smem, do_smem, lse_smem, delta_smem, segq_smem, p_smem,
               ds_smem, k_bar, q_bars, q_free, p_ready, p_free, ds_ready, ds_free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        kc = lax.axis_index("kv_seq")  # heaviest first: key block 0 meets every query block
        k0 = kc * bkv
        rows = pl.ds(k0, bkv)
        q_hi = qhi_ref[b, kc] if has_segments else jnp.int32(T // bq)
        n_steps = q_hi - lax.div(k0, jnp.int32(bq))  # query blocks q_hi - 1 down to the diagonal
        # Query blocks wholly at or after the last key of this block need no mask.
        n_full = (jnp.int32(0) if has_segments
                  else jnp.maximum(q_hi - pl.cdiv(k0 + bkv - 1, jnp.int32(bq)), 0))

        def load_keys():
            plgpu.copy_gmem_to_smem(kn_ref.at[b, rows, h], kn_smem, k_bar)
            plgpu.copy_gmem_to_smem(kr_ref.at[b, rows], kr_smem, k_bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h], v_smem, k_bar)
            if has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segk_smem, k_bar)

        @pl.when(wg == 0)
        def _scores():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")
            load_keys()
            plgpu.barrier_wait(k_bar)
            seg_k = plgpu.load(segk_smem, layout=ROWS) if has_segments else None
            # The key tile is stationary: as a register operand it is read from SMEM once.
            k_ops = (plgpu.load(kn_smem, layout=WGMMA), plgpu.load(kr_smem, layout=WGMMA))

            def dk_nope(i, dkn):
                """dK_nope += dS^T(i) Q_nope(i), once the gradient warpgroup has formed dS^T(i)."""
                slot = lax.rem(i, jnp.int32(stages))
                pb = lax.rem(i, jnp.int32(2))
                plgpu.barrier_wait(ds_ready.at[pb])
                dkn = mma([(ds_smem.at[pb], qn_smem.at[slot])], dkn, interpret=interpret)
                plgpu.barrier_arrive(ds_free.at[pb])
                plgpu.barrier_arrive(q_free.at[slot])
                return dkn

            def q_step(i, dkn, *, masked):
                # P^T(i) first, then dK for block i - 1: the gradient warpgroup forms dS^T(i - 1)
                # while this one forms S^T(i), so neither waits on the other's hand-off.
                slot = lax.rem(i, jnp.int32(stages))
                pb = lax.rem(i, jnp.int32(2))
                plgpu.barrier_wait(q_bars.at[slot])
                s_t = mma([(k_ops[0], _t(qn_smem.at[slot])), (k_ops[1], _t(qr_smem.at[slot]))],
                          (bkv, bq), interpret=interpret)
                s_t = s_t * c
                if masked:
                    seg_q = (plgpu.load(segq_smem.at[slot], layout=COLS)
                             if has_segments else None)
                    vis = _visible((bkv, bq), k0, (q_hi - 1 - i) * bq, rows_are_queries=False,
                                   seg_rows=seg_k, seg_cols=seg_q)
                    s_t = jnp.where(vis, s_t, -jnp.inf)
                lse = plgpu.load(lse_smem.at[slot], layout=COLS)
                p16 = jnp.exp2(s_t - _bcast_cols(lse, s_t.shape)).astype(dtype)

                @pl.when(i >= 2)
                def _():
                    plgpu.barrier_wait(p_free.at[pb])  # the gradient WG has read P^T(i - 2)

                p_smem.at[pb][...] = p16
                plgpu.commit_smem()
                plgpu.barrier_arrive(p_ready.at[pb])
                return lax.cond(i >= 1, lambda d: dk_nope(i - 1, d), lambda d: d, dkn)

            dkn = wgmma_zeros((bkv, Hn))
            dkn = lax.fori_loop(0, n_full, functools.partial(q_step, masked=False), dkn)
            dkn = lax.fori_loop(n_full, n_steps, functools.partial(q_step, masked=True), dkn)
            dkn = lax.cond(n_steps >= 1, lambda d: dk_nope(n_steps - 1, d), lambda d: d, dkn)
            _await_last_two(p_free, n_steps)
            kn_smem[...] = (dkn * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(kn_smem, dkn_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _gradients():
            plgpu.set_max_registers(COMPUTE_REGS, action="increase")
            plgpu.barrier_wait(k_bar)
            v_op = plgpu.load(v_smem, layout=WGMMA)

            def q_step(i, carry):
                dkr, dv = carry
                slot = lax.rem(i, jnp.int32(stages))
                pb = lax.rem(i, jnp.int32(2))
                plgpu.barrier_wait(q_bars.at[slot])
                dp_t = mma([(v_op, _t(do_smem.at[slot]))], (bkv, bq), interpret=interpret)
                delta = plgpu.load(delta_smem.at[slot], layout=COLS)
                dp_t = dp_t - _bcast_cols(delta, dp_t.shape)
                plgpu.barrier_wait(p_ready.at[pb])
                p16 = plgpu.load(p_smem.at[pb], layout=WGMMA)
                plgpu.barrier_arrive(p_free.at[pb])
                ds16 = (p16.astype(jnp.float32) * dp_t).astype(dtype)

                @pl.when(i >= 2)
                def _():
                    plgpu.barrier_wait(ds_free.at[pb])  # the score WG's dK(i - 2) has read it

                ds_smem.at[pb][...] = ds16
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[pb])
                dkr, dv = mma_multi([([(ds16, qr_smem.at[slot])], dkr),
                                     ([(p16, do_smem.at[slot])], dv)], interpret=interpret)
                plgpu.barrier_arrive(q_free.at[slot])
                return dkr, dv

            dkr, dv = lax.fori_loop(0, n_steps, q_step,
                                    (wgmma_zeros((bkv, Hr)), wgmma_zeros((bkv, Hv))))
            _await_last_two(ds_free, n_steps)
            v_smem[...] = dv.astype(dtype)
            dkr_smem[...] = dkr * scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, rows, h])
            plgpu.copy_smem_to_gmem(dkr_smem, dkr_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGS, action="decrease")

            def load(i, slot):
                q_rows = pl.ds((q_hi - 1 - i) * bq, bq)
                bar = q_bars.at[slot]
                plgpu.copy_gmem_to_smem(qn_ref.at[b, q_rows, h], qn_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(qr_ref.at[b, q_rows, h], qr_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(do_ref.at[b, q_rows, h], do_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, q_rows], lse_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, q_rows], delta_smem.at[slot], bar)
                if has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, q_rows], segq_smem.at[slot], bar)

            _stream(load, n_steps, stages, q_free)

    scratch = _dkv_scratch(Hn, Hr, Hv, dtype, config, has_segments)
    call = plgpu.kernel(
        _drop_none_kwargs(kernel, scratch),
        out_type=(jax.ShapeDtypeStruct((B, T, N, Hn), dtype),
                  jax.ShapeDtypeStruct((B, T, N, Hv), dtype),
                  jax.ShapeDtypeStruct((B, T, N, Hr), jnp.float32)),
        scratch_types={k: s for k, s in scratch.items() if s is not None},
        grid=(N, n_kv_ctas, B),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        kernel_name="mla_attention_dkv",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    return call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, q_hi_bc)


def _forward_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the forward kernel (None: not allocated)."""
    bq, bkv, stages = config.block_q, config.block_kv, config.max_concurrent_steps
    n_k_copies = 3 if has_segments else 2
    n_q_copies = 3 if has_segments else 2
    return dict(
        qn_smem2=plgpu.SMEM((2, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem2=plgpu.SMEM((2, bq, Hr), dtype, transforms=TRANSFORMS),
        o_smem2=(None if Hv == Hn
                 else plgpu.SMEM((2, bq, Hv), dtype, transforms=TRANSFORMS)),
        segq_smem2=plgpu.SMEM((2, bq), jnp.int32) if has_segments else None,
        lse_smem2=plgpu.SMEM((2, bq), jnp.float32),
        kn_smem=plgpu.SMEM((stages, bkv, Hn), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        v_smem=plgpu.SMEM((stages, bkv, Hv), dtype, transforms=TRANSFORMS),
        segk_smem=plgpu.SMEM((stages, bkv), jnp.int32) if has_segments else None,
        q_bars=plgpu.Barrier(num_arrivals=n_q_copies, num_barriers=2),
        k_bars=plgpu.Barrier(num_arrivals=n_k_copies, num_barriers=stages),
        v_bars=plgpu.Barrier(num_barriers=stages),
        k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        sched=plgpu.Barrier(num_arrivals=2),
    )


def _dq_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the dq kernel (None: not allocated)."""
    bq, bkv, stages = config.block_q_dq, config.block_kv_dq, config.bwd_concurrent_steps
    return dict(
        qn_smem2=plgpu.SMEM((2, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem2=plgpu.SMEM((2, bq, Hr), dtype, transforms=TRANSFORMS),
        do_smem2=plgpu.SMEM((2, bq, Hv), dtype, transforms=TRANSFORMS),
        lse_smem2=plgpu.SMEM((2, bq), jnp.float32),
        delta_smem2=plgpu.SMEM((2, bq), jnp.float32),
        segq_smem2=plgpu.SMEM((2, bq), jnp.int32) if has_segments else None,
        kn_smem=plgpu.SMEM((stages, bkv, Hn), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        v_smem=plgpu.SMEM((stages, bkv, Hv), dtype, transforms=TRANSFORMS),
        segk_smem=plgpu.SMEM((stages, bkv), jnp.int32) if has_segments else None,
        q_bars=plgpu.Barrier(num_arrivals=6 if has_segments else 5, num_barriers=2),
        kv_bars=plgpu.Barrier(num_arrivals=4 if has_segments else 3, num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )


def _dkv_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the dk/dv kernel (None: not allocated)."""
    bq = bkv = DKV_TILE
    stages = config.bwd_concurrent_steps
    return dict(
        kn_smem=plgpu.SMEM((bkv, Hn), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((bkv, Hr), dtype, transforms=TRANSFORMS),
        v_smem=plgpu.SMEM((bkv, Hv), dtype, transforms=TRANSFORMS),
        dkr_smem=plgpu.SMEM((bkv, Hr), jnp.float32),
        segk_smem=plgpu.SMEM((bkv,), jnp.int32) if has_segments else None,
        qn_smem=plgpu.SMEM((stages, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((stages, bq, Hr), dtype, transforms=TRANSFORMS),
        do_smem=plgpu.SMEM((stages, bq, Hv), dtype, transforms=TRANSFORMS),
        lse_smem=plgpu.SMEM((stages, bq), jnp.float32),
        delta_smem=plgpu.SMEM((stages, bq), jnp.float32),
        segq_smem=plgpu.SMEM((stages, bq), jnp.int32) if has_segments else None,
        p_smem=plgpu.SMEM((2, bkv, bq), dtype, transforms=TRANSFORMS),
        ds_smem=plgpu.SMEM((2, bkv, bq), dtype, transforms=TRANSFORMS),
        k_bar=plgpu.Barrier(num_arrivals=4 if has_segments else 3),
        q_bars=plgpu.Barrier(num_arrivals=6 if has_segments else 5, num_barriers=stages),
        q_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        p_ready=plgpu.Barrier(num_barriers=2),
        p_free=plgpu.Barrier(num_barriers=2),
        ds_ready=plgpu.Barrier(num_barriers=2),
        ds_free=plgpu.Barrier(num_barriers=2),
    )


# ----------------------------------------------------------------------------------------------
# What the kernels support
# ----------------------------------------------------------------------------------------------
def unsupported(Hn: int, Hr: int, Hv: int, *, has_segments: bool = True,
                config: Config | None = None) -> str | None:
    """Why the three kernels cannot run these head dims (None: they can).

    TMA copies into the 128-byte-swizzled tiles move whole 64-wide bf16 column blocks, so each
    head dim must be a multiple of 64 (mla_attention.py pads smaller ones), and each kernel's
    tiles must fit the shared memory of one CTA (SMEM_LIMIT). Segment ids add a few small
    buffers, so has_segments=True is the stricter check.
    """
    config = Config() if config is None else config
    for name, d in (("qk_nope_head_dim", Hn), ("qk_rope_head_dim", Hr), ("v_head_dim", Hv)):
        if d % 64:
            return f"{name}={d} is not a multiple of 64 (the kernels' 128-byte swizzle tile)"
    for kernel, scratch in (("forward", _forward_scratch), ("dq", _dq_scratch),
                            ("dk/dv", _dkv_scratch)):
        used = smem_bytes(scratch(Hn, Hr, Hv, jnp.bfloat16, config, has_segments))
        if used > SMEM_LIMIT:
            return (f"head dims {Hn}/{Hr}/{Hv} (nope/rope/v) need {used} bytes of shared memory "
                    f"in the {kernel} kernel, above the {SMEM_LIMIT} a Hopper CTA has "
                    f"(DeepSeek-V3's 128/64/128 fits; so do smaller dims)")
    return None


# ----------------------------------------------------------------------------------------------
# Entry points used by mla_attention._flash (custom_vjp)
# ----------------------------------------------------------------------------------------------
def compute_dtype(dtype) -> jnp.dtype:
    """wgmma operand dtype: bf16/f16 as given; fp32 inputs are rounded to bf16 (fp32 accumulate)."""
    return jnp.dtype(dtype) if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.bfloat16)


def _kv_lo(first_bt, rows_per_cta, block_kv):
    B, T = first_bt.shape
    return (first_bt.reshape(B, T // rows_per_cta, rows_per_cta).min(-1) // block_kv
            ).astype(jnp.int32)


def _q_hi(last_bt, keys_per_cta, block_q):
    B, T = last_bt.shape
    return (last_bt.reshape(B, T // keys_per_cta, keys_per_cta).max(-1) // block_q + 1
            ).astype(jnp.int32)


def forward(q_nope, q_rope, k_nope, k_rope, v, seg_bt, bounds, *, scale: float, config: Config,
            has_segments: bool, interpret: bool):
    """o[B, T, N, Hv], lse2[B, N, T]. bounds = segment_bounds(seg_bt) or None."""
    B, T = seg_bt.shape
    rows = 2 * config.block_q
    kv_lo = (_kv_lo(bounds[0], rows, config.block_kv) if has_segments
             else jnp.zeros((B, T // rows), jnp.int32))
    return _forward_call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo, scale=scale,
                         config=config, has_segments=has_segments, interpret=interpret)


def backward(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, bounds, *,
             scale: float, config: Config, has_segments: bool, interpret: bool):
    """(dq_nope, dq_rope, dk_nope, dk_rope[B, S, Hr] summed over heads, dv)."""
    B, T = seg_bt.shape
    rows = 2 * config.block_q_dq
    if has_segments:
        kv_lo = _kv_lo(bounds[0], rows, config.block_kv_dq)
        q_hi = _q_hi(bounds[1], DKV_TILE, DKV_TILE)
    else:
        kv_lo = jnp.zeros((B, T // rows), jnp.int32)
        q_hi = jnp.zeros((B, T // DKV_TILE), jnp.int32)
    kw = dict(scale=scale, config=config, has_segments=has_segments, interpret=interpret)
    with jax.named_scope("mla_mgpu_dq"):
        dq_nope, dq_rope = _backward_dq_call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta,
                                             seg_bt, kv_lo, **kw)
    if interpret:
        # The GPU interpreter deadlocks when XLA runs two interpreted kernels at once (dq and dk/dv
        # are independent); make dk/dv's operands depend on dq.
        _, (q_nope, q_rope, k_nope, k_rope, v, do) = lax.optimization_barrier(
            ((dq_nope, dq_rope), (q_nope, q_rope, k_nope, k_rope, v, do)))
    with jax.named_scope("mla_mgpu_dkv"):
        dk_nope, dv, dk_rope_bsnh = _backward_dkv_call(q_nope, q_rope, k_nope, k_rope, v, do,
                                                       lse2, delta, seg_bt, q_hi, **kw)
        dk_rope = dk_rope_bsnh.sum(axis=2).astype(k_rope.dtype)
    return dq_nope, dq_rope, dk_nope, dk_rope, dv


# ----------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------
def _stream(load, n_steps, stages, free_bars):
    """Memory warpgroup: issue `load(step, slot)` for steps [0, n_steps) through a ring of slots,
    waiting for both compute warpgroups to free a slot before refilling it."""
    for i in range(stages):
        @pl.when(i < n_steps)
        def _prologue(i=i):
            load(i, i)

    @pl.loop(stages, jnp.maximum(n_steps, stages))
    def _steady(i):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(free_bars.at[slot])
        load(i, slot)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _tail(i):  # observe the last releases too (every mbarrier phase gets awaited)
        plgpu.barrier_wait(free_bars.at[lax.rem(i, jnp.int32(stages))])


def _await_last_two(bars, n_steps):
    """Wait for the releases of a double buffer's last two uses (steps n_steps - 2, n_steps - 1)
    that the loop did not wait for, so that every mbarrier phase is observed."""
    @pl.loop(jnp.maximum(n_steps - 2, 0), n_steps)
    def _(i):
        plgpu.barrier_wait(bars.at[lax.rem(i, jnp.int32(2))])


def _drop_none_kwargs(kernel, scratch):
    """plgpu.kernel passes scratch refs by name; unused (None) scratch entries arrive as None."""
    missing = {k: None for k, s in scratch.items() if s is None}

    @functools.wraps(kernel)
    def wrapped(*refs, **scratch_refs):
        return kernel(*refs, **scratch_refs, **missing)

    return wrapped

