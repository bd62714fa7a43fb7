"""Causal MLA flash attention for Hopper in Pallas Mosaic GPU: forward, dq, dk/dv and fused backward
kernels.

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
  fused:   the dk/dv kernel (Config.backward="fused") that also forms each query block's dQ
           contribution, dS K (warpgroup 0 dQ_nope, warpgroup 1 dQ_rope), and adds it into an fp32
           dQ in GMEM: a TMA reduce-add on the GPU, or (the interpreter has no TMA reduction) a
           copy into this key block's slice of a [S / DKV_TILE, ...] buffer summed by XLA. The
           split backward's dq kernel, and its second pass over S and dP, are gone.
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
    mma,
    mma_multi,
    row_vector,
    smem_bytes,
    stream,
    tma_barrier,
    warp_specialized_kernel,
    wgmma_zeros,
)
from pallas_kernels._mla_mgpu_common import compute_dtype as compute_dtype  # mla_attention.py
from pallas_kernels._mla_mgpu_common import transposed as _t

# Keys per dk/dv CTA and query rows per step: the warpgroups' registers (accumulators of
# DKV_TILE rows, the key/value tiles as wgmma operands) leave no room for larger tiles.
DKV_TILE = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes. Forward and dq: a CTA's two compute warpgroups own block_q (block_q_dq) query
    rows each. dk/dv's tiles are fixed at DKV_TILE (see _backward_dkv_call).

    backward: "split" (a dq kernel and a dk/dv kernel) or "fused" (one kernel, dQ added into fp32
    GMEM from each key block's CTA; it runs fused_concurrent_steps pipeline slots, as its dQ
    staging tile leaves no room for three). dq_accumulation (fused only): "reduce" (TMA
    reduce-add into [B, T, N, H] fp32; not in the interpreter), "partial" (each key block's
    CTA writes its own slice of [S / DKV_TILE, B, T, N, H] fp32, summed by XLA: for the
    interpreter and small checks, it holds S / DKV_TILE copies of dQ) or "auto" (reduce on the
    GPU, partial when interpreting).
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_dq: int = 64
    block_kv_dq: int = 64
    bwd_concurrent_steps: int = 3
    backward: str = "split"
    dq_accumulation: str = "auto"
    fused_concurrent_steps: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 64")
        if min(self.max_concurrent_steps, self.bwd_concurrent_steps,
               self.fused_concurrent_steps) < 2:
            raise ValueError("need at least 2 pipeline slots")
        if self.backward not in ("split", "fused"):
            raise ValueError(f"backward={self.backward!r} is not 'split' or 'fused'")
        if self.dq_accumulation not in ("auto", "reduce", "partial"):
            raise ValueError(f"dq_accumulation={self.dq_accumulation!r} is not 'auto', "
                             "'reduce' or 'partial'")

    @property
    def seq_multiple(self) -> int:
        wgs = COMPUTE_WGS  # forward and dq CTAs own one query tile per compute warpgroup
        return math.lcm(wgs * self.block_q, self.block_kv, wgs * self.block_q_dq,
                        self.block_kv_dq, DKV_TILE)


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


@dataclasses.dataclass(frozen=True)
class _Static:
    """Trace-time constants of one kernel: head dims, that kernel's tiles, switches."""

    T: int
    Hn: int
    Hr: int
    Hv: int
    bq: int            # query rows of one tile (forward, dq: of one compute warpgroup)
    bkv: int           # key rows of one tile
    stages: int        # slots of the memory warpgroup's ring
    dtype: jnp.dtype   # q dtype: wgmma operands and outputs
    scale: float
    has_segments: bool
    interpret: bool
    dq_acc: str | None = None  # fused backward: "reduce" or "partial"; None: no dQ (dk/dv)

    @property
    def c(self) -> float:
        """scale * log2 e: scores in the log2 domain."""
        return self.scale * LOG2E

    @property
    def n_q_ctas(self) -> int:
        """Forward and dq: CTAs along the queries (each owns COMPUTE_WGS tiles of bq rows)."""
        return self.T // (COMPUTE_WGS * self.bq)


def _static(q_nope, q_rope, v, bq, bkv, stages, *, scale, has_segments, interpret,
            dq_acc=None) -> _Static:
    _, T, _, Hn = q_nope.shape
    return _Static(T=T, Hn=Hn, Hr=q_rope.shape[-1], Hv=v.shape[-1], bq=bq, bkv=bkv,
                   stages=stages, dtype=q_nope.dtype, scale=scale, has_segments=has_segments,
                   interpret=interpret, dq_acc=dq_acc)


class _QueryCta(NamedTuple):
    """Where a forward or dq CTA sits, and the key blocks its memory warpgroup streams."""

    b: jax.Array
    h: jax.Array
    wg: jax.Array
    q0: jax.Array     # first of its COMPUTE_WGS * bq query rows
    kv_lo: jax.Array  # first key block any of its rows sees
    n_cta: jax.Array  # key blocks kv_lo .. kv_lo + n_cta - 1


def _query_cta(st: _Static, kvlo_ref) -> _QueryCta:
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    qc = st.n_q_ctas - 1 - lax.axis_index("q_seq")  # heaviest causal rows first
    cta_q0 = qc * (COMPUTE_WGS * st.bq)
    kv_lo = kvlo_ref[b, qc] if st.has_segments else jnp.int32(0)
    n_cta = pl.cdiv(cta_q0 + COMPUTE_WGS * st.bq, st.bkv) - kv_lo
    return _QueryCta(b, h, wg, cta_q0, kv_lo, n_cta)


def _query_steps(st: _Static, q0, kv_lo):
    """(n_steps, n_full): key blocks the query tile from row q0 visits, and how many of them
    lie entirely below the diagonal and need no mask (segments always need one)."""
    n_steps = pl.cdiv(q0 + st.bq, st.bkv) - kv_lo
    n_full = jnp.int32(0) if st.has_segments else lax.div(q0, jnp.int32(st.bkv))
    return n_steps, n_full


def _query_kernel(compute, memory, st: _Static, refs, smem):
    """A forward or dq CTA: its compute warpgroups run compute(st, refs, smem, cta), its memory
    warpgroup memory(st, refs, smem, cta)."""
    cta = _query_cta(st, refs.kvlo)

    @pl.when(cta.wg < COMPUTE_WGS)
    def _compute():
        compute(st, refs, smem, cta)

    @pl.when(cta.wg == COMPUTE_WGS)
    def _memory():
        memory(st, refs, smem, cta)


def _mask_keys(st: _Static, smem, s, q0, kv_lo, i, slot, seg_q):
    """Scores s [bq, bkv] of the query rows from q0 against key block kv_lo + i (ring slot
    `slot`), with the keys a row may not see (later ones, other documents) at -inf."""
    seg_k = (plgpu.load(smem.segk_smem.at[slot], layout=COLS)
             if st.has_segments else None)
    vis = _visible((st.bq, st.bkv), q0, (kv_lo + i) * st.bkv, rows_are_queries=True,
                   seg_rows=seg_q, seg_cols=seg_k)
    return jnp.where(vis, s, -jnp.inf)


def _key_ring(stages: int, bkv: int, Hn, Hr, Hv, dtype, has_segments: bool) -> dict:
    """SMEM ring of the key blocks a forward or dq memory warpgroup streams: k_nope, k_rope, v
    and the key segment ids (None: not allocated)."""
    return dict(
        kn_smem=plgpu.SMEM((stages, bkv, Hn), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((stages, bkv, Hr), dtype, transforms=TRANSFORMS),
        v_smem=plgpu.SMEM((stages, bkv, Hv), dtype, transforms=TRANSFORMS),
        segk_smem=plgpu.SMEM((stages, bkv), jnp.int32) if has_segments else None,
    )


def _copy_key_block(st: _Static, refs, smem, cta: _QueryCta, i, slot, *, bars, with_v: bool):
    """TMA copies of key block kv_lo + i into ring slot `slot`, on barrier bars[slot]: k_nope,
    k_rope, v (with_v) and the key segment ids."""
    b, h = cta.b, cta.h
    kv = pl.ds((cta.kv_lo + i) * st.bkv, st.bkv)
    bar = bars.at[slot]
    plgpu.copy_gmem_to_smem(refs.kn.at[b, kv, h], smem.kn_smem.at[slot], bar)
    plgpu.copy_gmem_to_smem(refs.kr.at[b, kv], smem.kr_smem.at[slot], bar)
    if with_v:
        plgpu.copy_gmem_to_smem(refs.v.at[b, kv, h], smem.v_smem.at[slot], bar)
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs.seg.at[b, kv], smem.segk_smem.at[slot], bar)


def _schedule_barrier(sched):
    """The forward's ping-pong: each compute warpgroup arrives and waits for the other."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
class _ForwardRefs(NamedTuple):
    qn: Any    # q_nope[B, T, N, Hn]
    qr: Any    # q_rope[B, T, N, Hr]
    kn: Any    # k_nope[B, S, N, Hn]
    kr: Any    # k_rope[B, S, Hr]
    v: Any     # v[B, S, N, Hv]
    seg: Any   # seg_bt[B, T]
    kvlo: Any  # kv_lo_bc[B, T // (2 block_q)]
    o: Any     # o[B, T, N, Hv]
    lse: Any   # lse2[B, N, T]


def _forward_call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo_bc, *, scale: float,
                  config: Config, has_segments: bool, interpret: bool):
    """o[B, T, N, Hv] (q dtype) and lse2[B, N, T] (fp32, log2 domain).

    seg_bt[B, T] int32 (ignored unless has_segments); kv_lo_bc[B, T // (2 block_q)] int32: first
    key block each CTA must visit (0 without segments).
    """
    B, T, N, _ = q_nope.shape
    st = _static(q_nope, q_rope, v, config.block_q, config.block_kv, config.max_concurrent_steps,
                 scale=scale, has_segments=has_segments, interpret=interpret)
    call = warp_specialized_kernel(
        functools.partial(_query_kernel, _forward_compute, _forward_memory, st), _ForwardRefs,
        _forward_scratch(st.Hn, st.Hr, st.Hv, st.dtype, config, has_segments),
        out_type=(jax.ShapeDtypeStruct((B, T, N, st.Hv), st.dtype),
                  jax.ShapeDtypeStruct((B, N, T), jnp.float32)),
        grid=(N, st.n_q_ctas, B), grid_names=("heads", "q_seq", "batch"),
        compute_wgs=COMPUTE_WGS, kernel_name="mla_attention_fwd", interpret=interpret)
    return call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo_bc)


def _forward_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the forward kernel (None: not allocated)."""
    bq, bkv, stages = config.block_q, config.block_kv, config.max_concurrent_steps
    wgs = COMPUTE_WGS
    smem = dict(
        qn_smem2=plgpu.SMEM((wgs, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem2=plgpu.SMEM((wgs, bq, Hr), dtype, transforms=TRANSFORMS),
        o_smem2=(None if Hv == Hn  # o staged in q_nope's tile (_forward_store)
                 else plgpu.SMEM((wgs, bq, Hv), dtype, transforms=TRANSFORMS)),
        segq_smem2=plgpu.SMEM((wgs, bq), jnp.int32) if has_segments else None,
        lse_smem2=plgpu.SMEM((wgs, bq), jnp.float32),
        **_key_ring(stages, bkv, Hn, Hr, Hv, dtype, has_segments),
    )
    return smem | dict(
        q_bars=tma_barrier(smem["qn_smem2"], smem["qr_smem2"], smem["segq_smem2"],
                           num_barriers=wgs),
        k_bars=tma_barrier(smem["kn_smem"], smem["kr_smem"], smem["segk_smem"],
                           num_barriers=stages),
        v_bars=tma_barrier(smem["v_smem"], num_barriers=stages),
        k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        sched=plgpu.Barrier(num_arrivals=wgs),
    )


def _forward_compute(st: _Static, refs: _ForwardRefs, smem, cta: _QueryCta):
    """Compute warpgroup cta.wg: o and lse2 of its bq query rows, ping-ponging with the other
    (one runs its softmax while the other's wgmmas run)."""
    schedule_barrier = functools.partial(_schedule_barrier, smem.sched)
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")
    b, h, wg = cta.b, cta.h, cta.wg
    q0 = cta.q0 + wg * st.bq
    rows = pl.ds(q0, st.bq)
    qn_smem, qr_smem = smem.qn_smem2.at[wg], smem.qr_smem2.at[wg]
    plgpu.copy_gmem_to_smem(refs.qn.at[b, rows, h], qn_smem, smem.q_bars.at[wg])
    plgpu.copy_gmem_to_smem(refs.qr.at[b, rows, h], qr_smem, smem.q_bars.at[wg])
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs.seg.at[b, rows], smem.segq_smem2.at[wg], smem.q_bars.at[wg])
    plgpu.barrier_wait(smem.q_bars.at[wg])
    seg_q = (plgpu.load(smem.segq_smem2.at[wg], layout=ROWS) if st.has_segments else None)
    n_steps, n_full = _query_steps(st, q0, cta.kv_lo)

    plgpu.barrier_wait(smem.k_bars.at[0])
    pl.when(wg == 1)(schedule_barrier)
    step = functools.partial(_forward_kv_step, st, smem, qn_smem, qr_smem, q0, cta.kv_lo, seg_q,
                             n_steps, schedule_barrier)
    carry = (wgmma_zeros((st.bq, st.Hv)), row_vector(-jnp.inf, st.bq), row_vector(0.0, st.bq))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
    lax.fori_loop(n_steps, cta.n_cta,
                  functools.partial(_forward_drain_step, st, smem, schedule_barrier), None)
    pl.when(wg == 0)(schedule_barrier)
    _forward_store(st, refs, smem, b, h, wg, rows, qn_smem, carry)


def _forward_kv_step(st: _Static, smem, qn_smem, qr_smem, q0, kv_lo, seg_q, n_steps,
                     schedule_barrier, i, carry, *, masked):
    """Key block kv_lo + i: S = q k^T (the other warpgroup's softmax runs meanwhile), online
    softmax, then acc += P v (waiting for the next key tile meanwhile)."""
    acc, m, l = carry
    slot = lax.rem(i, jnp.int32(st.stages))
    s = mma([(qn_smem, _t(smem.kn_smem.at[slot])), (qr_smem, _t(smem.kr_smem.at[slot]))],
            (st.bq, st.bkv), interpret=st.interpret, between=schedule_barrier)
    s = s * st.c
    if masked:
        s = _mask_keys(st, smem, s, q0, kv_lo, i, slot, seg_q)
    plgpu.barrier_arrive(smem.k_free.at[slot])
    acc, l, m_new, p16 = _forward_softmax(st, s, acc, m, l)
    plgpu.barrier_arrive(smem.sched)  # softmax done
    plgpu.barrier_wait(smem.v_bars.at[slot])
    plgpu.barrier_wait(smem.sched)  # the other warpgroup's QK wgmma is issued

    def wait_next_k():
        @pl.when(i + 1 < n_steps)
        def _():
            plgpu.barrier_wait(smem.k_bars.at[lax.rem(i + 1, jnp.int32(st.stages))])

    acc = mma([(p16, smem.v_smem.at[slot])], acc, interpret=st.interpret, between=wait_next_k)
    plgpu.barrier_arrive(smem.v_free.at[slot])
    return acc, m_new, l


def _forward_softmax(st: _Static, s, acc, m, l):
    """Online softmax of one score tile: (acc rescaled, l, m_new, P in the operand dtype)."""
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no visible key yet (packed documents) keeps m = -inf; shift by 0
    # instead so that alpha and p come out 0 rather than NaN.
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if st.has_segments else m_new
    alpha = jnp.exp2(m - m_ref)
    p = jnp.exp2(s - _bcast_rows(m_ref, s.shape))
    acc = acc * _bcast_rows(alpha, acc.shape)
    l = l * alpha
    p16 = p.astype(st.dtype)
    l = l + p.sum(axis=1)
    return lax.optimization_barrier((acc, l, m_new, p16))


def _forward_drain_step(st: _Static, smem, schedule_barrier, i, _):
    """Keep the slot ring and the ping-pong barrier in step with the other warpgroup for the key
    blocks only it needs. Waiting on the (already requested) tiles keeps every barrier phase
    observed, which mbarrier parity waits rely on."""
    slot = lax.rem(i, jnp.int32(st.stages))
    plgpu.barrier_wait(smem.k_bars.at[slot])
    plgpu.barrier_arrive(smem.k_free.at[slot])
    plgpu.barrier_wait(smem.v_bars.at[slot])
    plgpu.barrier_arrive(smem.v_free.at[slot])
    schedule_barrier()
    schedule_barrier()


def _forward_store(st: _Static, refs: _ForwardRefs, smem, b, h, wg, rows, qn_smem, carry):
    """o = acc / l (staged in q_nope's tile when Hv == Hn) and lse2 = m + log2 l to GMEM."""
    acc, m, l = carry
    o_smem = qn_smem if st.Hv == st.Hn else smem.o_smem2.at[wg]
    o_smem[...] = (acc * _bcast_rows(1.0 / l, acc.shape)).astype(st.dtype)
    smem.lse_smem2.at[wg][...] = m + jnp.log2(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, refs.o.at[b, rows, h])
    plgpu.copy_smem_to_gmem(smem.lse_smem2.at[wg], refs.lse.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _forward_memory(st: _Static, refs: _ForwardRefs, smem, cta: _QueryCta):
    """Memory warpgroup: key blocks (k_nope, k_rope, key segment ids; then v on barriers of
    their own, so the QK^T wgmma need not wait for v)."""
    plgpu.set_max_registers(MEMORY_REGS, action="decrease")
    b, h = cta.b, cta.h
    load_k = functools.partial(_copy_key_block, st, refs, smem, cta, bars=smem.k_bars,
                               with_v=False)

    def load_v(i, slot):
        kv = pl.ds((cta.kv_lo + i) * st.bkv, st.bkv)
        plgpu.copy_gmem_to_smem(refs.v.at[b, kv, h], smem.v_smem.at[slot], smem.v_bars.at[slot])

    stream(cta.n_cta, st.stages, (load_k, smem.k_free), (load_v, smem.v_free))


# ----------------------------------------------------------------------------------------------
# Backward: dq
# ----------------------------------------------------------------------------------------------
class _DqRefs(NamedTuple):
    qn: Any     # q_nope[B, T, N, Hn]
    qr: Any     # q_rope[B, T, N, Hr]
    kn: Any     # k_nope[B, S, N, Hn]
    kr: Any     # k_rope[B, S, Hr]
    v: Any      # v[B, S, N, Hv]
    do: Any     # do[B, T, N, Hv]
    lse: Any    # lse2[B, N, T]
    delta: Any  # delta[B, N, T]
    seg: Any    # seg_bt[B, T]
    kvlo: Any   # kv_lo_bc[B, T // (2 block_q_dq)]
    dqn: Any    # dq_nope[B, T, N, Hn]
    dqr: Any    # dq_rope[B, T, N, Hr]


def _backward_dq_call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, kv_lo_bc, *,
                      scale: float, config: Config, has_segments: bool, interpret: bool):
    """dq_nope[B, T, N, Hn], dq_rope[B, T, N, Hr] (q dtype).

    do[B, T, N, Hv]; lse2, delta[B, N, T] fp32 (delta = rowsum(o * do));
    kv_lo_bc[B, T // (2 block_q_dq)] int32: first key block each CTA visits.
    """
    B, T, N, _ = q_nope.shape
    st = _static(q_nope, q_rope, v, config.block_q_dq, config.block_kv_dq,
                 config.bwd_concurrent_steps, scale=scale, has_segments=has_segments,
                 interpret=interpret)
    call = warp_specialized_kernel(
        functools.partial(_query_kernel, _dq_compute, _dq_memory, st), _DqRefs,
        _dq_scratch(st.Hn, st.Hr, st.Hv, st.dtype, config, has_segments),
        out_type=(jax.ShapeDtypeStruct((B, T, N, st.Hn), st.dtype),
                  jax.ShapeDtypeStruct((B, T, N, st.Hr), st.dtype)),
        grid=(N, st.n_q_ctas, B), grid_names=("heads", "q_seq", "batch"),
        compute_wgs=COMPUTE_WGS, kernel_name="mla_attention_dq", interpret=interpret)
    return call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, kv_lo_bc)


def _dq_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the dq kernel (None: not allocated)."""
    bq, bkv, stages = config.block_q_dq, config.block_kv_dq, config.bwd_concurrent_steps
    wgs = COMPUTE_WGS
    smem = dict(
        qn_smem2=plgpu.SMEM((wgs, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem2=plgpu.SMEM((wgs, bq, Hr), dtype, transforms=TRANSFORMS),
        do_smem2=plgpu.SMEM((wgs, bq, Hv), dtype, transforms=TRANSFORMS),
        lse_smem2=plgpu.SMEM((wgs, bq), jnp.float32),
        delta_smem2=plgpu.SMEM((wgs, bq), jnp.float32),
        segq_smem2=plgpu.SMEM((wgs, bq), jnp.int32) if has_segments else None,
        **_key_ring(stages, bkv, Hn, Hr, Hv, dtype, has_segments),
    )
    q_tiles = ("qn_smem2", "qr_smem2", "do_smem2", "lse_smem2", "delta_smem2", "segq_smem2")
    return smem | dict(
        q_bars=tma_barrier(*(smem[k] for k in q_tiles), num_barriers=wgs),
        kv_bars=tma_barrier(smem["kn_smem"], smem["kr_smem"], smem["v_smem"], smem["segk_smem"],
                            num_barriers=stages),
        kv_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
    )


def _dq_compute(st: _Static, refs: _DqRefs, smem, cta: _QueryCta):
    """Compute warpgroup cta.wg: dq of its bq query rows."""
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")
    b, h, wg = cta.b, cta.h, cta.wg
    q0 = cta.q0 + wg * st.bq
    rows = pl.ds(q0, st.bq)
    qn_smem, qr_smem, do_smem = smem.qn_smem2.at[wg], smem.qr_smem2.at[wg], smem.do_smem2.at[wg]
    bar = smem.q_bars.at[wg]
    plgpu.copy_gmem_to_smem(refs.qn.at[b, rows, h], qn_smem, bar)
    plgpu.copy_gmem_to_smem(refs.qr.at[b, rows, h], qr_smem, bar)
    plgpu.copy_gmem_to_smem(refs.do.at[b, rows, h], do_smem, bar)
    plgpu.copy_gmem_to_smem(refs.lse.at[b, h, rows], smem.lse_smem2.at[wg], bar)
    plgpu.copy_gmem_to_smem(refs.delta.at[b, h, rows], smem.delta_smem2.at[wg], bar)
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs.seg.at[b, rows], smem.segq_smem2.at[wg], bar)
    plgpu.barrier_wait(bar)
    lse = plgpu.load(smem.lse_smem2.at[wg], layout=ROWS)
    delta = plgpu.load(smem.delta_smem2.at[wg], layout=ROWS)
    seg_q = plgpu.load(smem.segq_smem2.at[wg], layout=ROWS) if st.has_segments else None
    n_steps, n_full = _query_steps(st, q0, cta.kv_lo)

    step = functools.partial(_dq_kv_step, st, smem, qn_smem, qr_smem, do_smem, q0, cta.kv_lo,
                             lse, delta, seg_q)
    carry = (wgmma_zeros((st.bq, st.Hn)), wgmma_zeros((st.bq, st.Hr)))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
    lax.fori_loop(n_steps, cta.n_cta, functools.partial(_dq_drain_step, st, smem), None)
    dqn, dqr = carry
    qn_smem[...] = (dqn * st.scale).astype(st.dtype)
    qr_smem[...] = (dqr * st.scale).astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qn_smem, refs.dqn.at[b, rows, h])
    plgpu.copy_smem_to_gmem(qr_smem, refs.dqr.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _dq_kv_step(st: _Static, smem, qn_smem, qr_smem, do_smem, q0, kv_lo, lse, delta, seg_q, i,
                carry, *, masked):
    """Key block kv_lo + i: S and dP, then dq += dS k."""
    dqn, dqr = carry
    slot = lax.rem(i, jnp.int32(st.stages))
    plgpu.barrier_wait(smem.kv_bars.at[slot])
    kn_smem, kr_smem = smem.kn_smem.at[slot], smem.kr_smem.at[slot]
    s, dp = mma_multi(
        [([(qn_smem, _t(kn_smem)), (qr_smem, _t(kr_smem))], (st.bq, st.bkv)),
         ([(do_smem, _t(smem.v_smem.at[slot]))], (st.bq, st.bkv))],
        interpret=st.interpret)
    s = s * st.c
    if masked:
        s = _mask_keys(st, smem, s, q0, kv_lo, i, slot, seg_q)
    p = jnp.exp2(s - _bcast_rows(lse, s.shape))
    ds = (p * (dp - _bcast_rows(delta, dp.shape))).astype(st.dtype)
    dqn, dqr = mma_multi([([(ds, kn_smem)], dqn), ([(ds, kr_smem)], dqr)],
                         interpret=st.interpret)
    plgpu.barrier_arrive(smem.kv_free.at[slot])
    return dqn, dqr


def _dq_drain_step(st: _Static, smem, i, _):
    """A key block only the other warpgroup needs: observe its arrival and release it."""
    slot = lax.rem(i, jnp.int32(st.stages))
    plgpu.barrier_wait(smem.kv_bars.at[slot])
    plgpu.barrier_arrive(smem.kv_free.at[slot])


def _dq_memory(st: _Static, refs: _DqRefs, smem, cta: _QueryCta):
    """Memory warpgroup: key blocks (k_nope, k_rope, v, key segment ids)."""
    plgpu.set_max_registers(MEMORY_REGS, action="decrease")
    load = functools.partial(_copy_key_block, st, refs, smem, cta, bars=smem.kv_bars,
                             with_v=True)
    stream(cta.n_cta, st.stages, (load, smem.kv_free))


# ----------------------------------------------------------------------------------------------
# Backward: dk, dv
# ----------------------------------------------------------------------------------------------
class _DkvRefs(NamedTuple):
    qn: Any     # q_nope[B, T, N, Hn]
    qr: Any     # q_rope[B, T, N, Hr]
    kn: Any     # k_nope[B, S, N, Hn]
    kr: Any     # k_rope[B, S, Hr]
    v: Any      # v[B, S, N, Hv]
    do: Any     # do[B, T, N, Hv]
    lse: Any    # lse2[B, N, T]
    delta: Any  # delta[B, N, T]
    seg: Any    # seg_bt[B, T]
    qhi: Any    # q_hi_bc[B, S // DKV_TILE]
    dkn: Any    # dk_nope[B, S, N, Hn]
    dv: Any     # dv[B, S, N, Hv]
    dkr: Any    # dk_rope per head [B, S, N, Hr] fp32


class _KeyCta(NamedTuple):
    """Where a dk/dv CTA sits and the query blocks it visits (q_hi - 1 down to the diagonal)."""

    b: jax.Array
    h: jax.Array
    wg: jax.Array
    k0: jax.Array       # first of its DKV_TILE keys
    rows: pl.Slice      # its key rows
    q_hi: jax.Array     # one past the last query block any of its keys is seen by
    n_steps: jax.Array  # query blocks visited
    n_full: jax.Array   # the first n_full of them need no mask


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
    st = _static(q_nope, q_rope, v, DKV_TILE, DKV_TILE, config.bwd_concurrent_steps,
                 scale=scale, has_segments=has_segments, interpret=interpret)
    call = _key_block_call(st, q_nope.shape, _DkvRefs,
                           _dkv_scratch(st.Hn, st.Hr, st.Hv, st.dtype, config, has_segments),
                           "mla_attention_dkv", interpret)
    return call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, q_hi_bc)


def _key_block_call(st: _Static, q_shape, refs_type, scratch: dict, kernel_name: str,
                    interpret: bool):
    """The dk/dv kernel (_dkv_kernel) over one CTA per (head, key block, batch), returning
    dk_nope, dv (q dtype) and per-head fp32 dk_rope; the fused backward's refs add dQ."""
    B, T, N, _ = q_shape
    return warp_specialized_kernel(
        functools.partial(_dkv_kernel, st), refs_type, scratch,
        out_type=(jax.ShapeDtypeStruct((B, T, N, st.Hn), st.dtype),
                  jax.ShapeDtypeStruct((B, T, N, st.Hv), st.dtype),
                  jax.ShapeDtypeStruct((B, T, N, st.Hr), jnp.float32)),
        grid=(N, T // st.bkv, B), grid_names=("heads", "kv_seq", "batch"),
        compute_wgs=COMPUTE_WGS, kernel_name=kernel_name, interpret=interpret)


def _dkv_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the dk/dv kernel (None: not allocated)."""
    return _key_block_scratch(Hn, Hr, Hv, dtype, config.bwd_concurrent_steps, has_segments)


def _key_block_scratch(Hn, Hr, Hv, dtype, stages: int, has_segments: bool) -> dict:
    """SMEM and barriers of a dk/dv or fused CTA with `stages` query-block slots."""
    bq = bkv = DKV_TILE
    smem = dict(
        kn_smem=plgpu.SMEM((bkv, Hn), dtype, transforms=TRANSFORMS),
        kr_smem=plgpu.SMEM((bkv, Hr), dtype, transforms=TRANSFORMS),
        v_smem=plgpu.SMEM((bkv, Hv), dtype, transforms=TRANSFORMS),
        # dk_rope's staging tile; in the fused kernel first dQ_rope's (bq == bkv rows).
        dkr_smem=plgpu.SMEM((bkv, Hr), jnp.float32),
        segk_smem=plgpu.SMEM((bkv,), jnp.int32) if has_segments else None,
        qn_smem=plgpu.SMEM((stages, bq, Hn), dtype, transforms=TRANSFORMS),
        qr_smem=plgpu.SMEM((stages, bq, Hr), dtype, transforms=TRANSFORMS),
        do_smem=plgpu.SMEM((stages, bq, Hv), dtype, transforms=TRANSFORMS),
        lse_smem=plgpu.SMEM((stages, bq), jnp.float32),
        delta_smem=plgpu.SMEM((stages, bq), jnp.float32),
        segq_smem=plgpu.SMEM((stages, bq), jnp.int32) if has_segments else None,
        # P^T and dS^T pass between the compute warpgroups through double buffers.
        p_smem=plgpu.SMEM((2, bkv, bq), dtype, transforms=TRANSFORMS),
        ds_smem=plgpu.SMEM((2, bkv, bq), dtype, transforms=TRANSFORMS),
    )
    q_tiles = ("qn_smem", "qr_smem", "do_smem", "lse_smem", "delta_smem", "segq_smem")
    return smem | dict(
        k_bar=tma_barrier(smem["kn_smem"], smem["kr_smem"], smem["v_smem"], smem["segk_smem"]),
        q_bars=tma_barrier(*(smem[k] for k in q_tiles), num_barriers=stages),
        q_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        # One warpgroup writes each hand-off buffer and the other reads it.
        p_ready=plgpu.Barrier(num_barriers=2),
        p_free=plgpu.Barrier(num_barriers=2),
        ds_ready=plgpu.Barrier(num_barriers=2),
        ds_free=plgpu.Barrier(num_barriers=2),
    )


def _key_cta(st: _Static, qhi_ref) -> _KeyCta:
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    kc = lax.axis_index("kv_seq")  # heaviest first: key block 0 meets every query block
    k0 = kc * st.bkv
    rows = pl.ds(k0, st.bkv)
    q_hi = qhi_ref[b, kc] if st.has_segments else jnp.int32(st.T // st.bq)
    n_steps = q_hi - lax.div(k0, jnp.int32(st.bq))  # query blocks q_hi - 1 down to the diagonal
    # Query blocks wholly at or after the last key of this block need no mask.
    n_full = (jnp.int32(0) if st.has_segments
              else jnp.maximum(q_hi - pl.cdiv(k0 + st.bkv - 1, jnp.int32(st.bq)), 0))
    return _KeyCta(b, h, wg, k0, rows, q_hi, n_steps, n_full)


def _dkv_kernel(st: _Static, refs: _DkvRefs, smem):
    cta = _key_cta(st, refs.qhi)

    @pl.when(cta.wg == 0)
    def _scores():
        _dkv_scores(st, refs, smem, cta)

    @pl.when(cta.wg == 1)
    def _gradients():
        _dkv_gradients(st, refs, smem, cta)

    @pl.when(cta.wg == COMPUTE_WGS)
    def _memory():
        _dkv_memory(st, refs, smem, cta)


def _dkv_scores(st: _Static, refs: _DkvRefs, smem, cta: _KeyCta):
    """Score warpgroup (0): loads the key tiles, forms S^T and P^T, accumulates dK_nope."""
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")
    b, h, rows = cta.b, cta.h, cta.rows
    plgpu.copy_gmem_to_smem(refs.kn.at[b, rows, h], smem.kn_smem, smem.k_bar)
    plgpu.copy_gmem_to_smem(refs.kr.at[b, rows], smem.kr_smem, smem.k_bar)
    plgpu.copy_gmem_to_smem(refs.v.at[b, rows, h], smem.v_smem, smem.k_bar)
    if st.has_segments:
        plgpu.copy_gmem_to_smem(refs.seg.at[b, rows], smem.segk_smem, smem.k_bar)
    plgpu.barrier_wait(smem.k_bar)
    seg_k = plgpu.load(smem.segk_smem, layout=ROWS) if st.has_segments else None
    # The key tile is stationary: as a register operand it is read from SMEM once.
    k_ops = (plgpu.load(smem.kn_smem, layout=WGMMA), plgpu.load(smem.kr_smem, layout=WGMMA))
    dk_nope = functools.partial(_dkv_dk_nope, st, refs, smem, cta)
    step = functools.partial(_dkv_score_step, st, smem, cta, k_ops, seg_k, dk_nope)
    dkn = wgmma_zeros((st.bkv, st.Hn))
    dkn = lax.fori_loop(0, cta.n_full, functools.partial(step, masked=False), dkn)
    dkn = lax.fori_loop(cta.n_full, cta.n_steps, functools.partial(step, masked=True), dkn)
    dkn = lax.cond(cta.n_steps >= 1, lambda d: dk_nope(cta.n_steps - 1, d), lambda d: d, dkn)
    _await_last_two(smem.p_free, cta.n_steps)
    smem.kn_smem[...] = (dkn * st.scale).astype(st.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem.kn_smem, refs.dkn.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _dkv_score_step(st: _Static, smem, cta: _KeyCta, k_ops, seg_k, dk_nope, i, dkn, *, masked):
    """P^T(i) first, then dK for block i - 1: the gradient warpgroup forms dS^T(i - 1) while this
    one forms S^T(i), so neither waits on the other's hand-off."""
    slot = lax.rem(i, jnp.int32(st.stages))
    pb = lax.rem(i, jnp.int32(2))
    plgpu.barrier_wait(smem.q_bars.at[slot])
    s_t = mma([(k_ops[0], _t(smem.qn_smem.at[slot])), (k_ops[1], _t(smem.qr_smem.at[slot]))],
              (st.bkv, st.bq), interpret=st.interpret)
    s_t = s_t * st.c
    if masked:
        seg_q = (plgpu.load(smem.segq_smem.at[slot], layout=COLS)
                 if st.has_segments else None)
        vis = _visible((st.bkv, st.bq), cta.k0, (cta.q_hi - 1 - i) * st.bq,
                       rows_are_queries=False, seg_rows=seg_k, seg_cols=seg_q)
        s_t = jnp.where(vis, s_t, -jnp.inf)
    lse = plgpu.load(smem.lse_smem.at[slot], layout=COLS)
    p16 = jnp.exp2(s_t - _bcast_cols(lse, s_t.shape)).astype(st.dtype)

    @pl.when(i >= 2)
    def _():
        plgpu.barrier_wait(smem.p_free.at[pb])  # the gradient WG has read P^T(i - 2)

    smem.p_smem.at[pb][...] = p16
    plgpu.commit_smem()
    plgpu.barrier_arrive(smem.p_ready.at[pb])
    return lax.cond(i >= 1, lambda d: dk_nope(i - 1, d), lambda d: d, dkn)


def _dkv_dk_nope(st: _Static, refs, smem, cta: _KeyCta, i, dkn):
    """dK_nope += dS^T(i) Q_nope(i), once the gradient warpgroup has formed dS^T(i); fused, also
    dQ_nope(i) = dS(i) K_nope (dS^T's tile read transposed), added into GMEM."""
    slot = lax.rem(i, jnp.int32(st.stages))
    pb = lax.rem(i, jnp.int32(2))
    plgpu.barrier_wait(smem.ds_ready.at[pb])
    ds_t = smem.ds_smem.at[pb]
    groups = [([(ds_t, smem.qn_smem.at[slot])], dkn)]
    if st.dq_acc is not None:
        groups.append(([(_t(ds_t), smem.kn_smem)], (st.bq, st.Hn)))
    dkn, *dqn = mma_multi(groups, interpret=st.interpret)
    plgpu.barrier_arrive(smem.ds_free.at[pb])
    plgpu.barrier_arrive(smem.q_free.at[slot])
    if dqn:
        _add_dq(st, cta, dqn[0], smem.dqn_smem, refs.dqn, i)
    return dkn


def _add_dq(st: _Static, cta: _KeyCta, dq, dq_smem, dq_ref, i):
    """Adds query block q_hi - 1 - i's dQ contribution dq [bq, H] (fp32, unscaled) from this key
    block: a TMA reduce-add into dq_ref [B, T, N, H] ("reduce"), or a copy into this key block's
    slice of dq_ref [S / bkv, B, T, N, H] ("partial"; each slice is written once per query block,
    so no two CTAs write one place)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's copy has read dq_smem
    dq_smem[...] = dq
    plgpu.commit_smem()
    q_rows = pl.ds((cta.q_hi - 1 - i) * st.bq, st.bq)
    if st.dq_acc == "reduce":
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[cta.b, q_rows, cta.h], reduction_op="add")
    else:
        kc = lax.div(cta.k0, jnp.int32(st.bkv))
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[kc, cta.b, q_rows, cta.h])


def _dkv_gradients(st: _Static, refs: _DkvRefs, smem, cta: _KeyCta):
    """Gradient warpgroup (1): forms dP^T and dS^T, accumulates dV and dK_rope."""
    plgpu.set_max_registers(COMPUTE_REGS, action="increase")
    plgpu.barrier_wait(smem.k_bar)
    v_op = plgpu.load(smem.v_smem, layout=WGMMA)
    step = functools.partial(_dkv_gradient_step, st, refs, smem, cta, v_op)
    dkr, dv = lax.fori_loop(0, cta.n_steps, step,
                            (wgmma_zeros((st.bkv, st.Hr)), wgmma_zeros((st.bkv, st.Hv))))
    _await_last_two(smem.ds_free, cta.n_steps)
    if st.dq_acc is not None:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dkr_smem staged dQ_rope
    smem.v_smem[...] = dv.astype(st.dtype)
    smem.dkr_smem[...] = dkr * st.scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem.v_smem, refs.dv.at[cta.b, cta.rows, cta.h])
    plgpu.copy_smem_to_gmem(smem.dkr_smem, refs.dkr.at[cta.b, cta.rows, cta.h])
    plgpu.wait_smem_to_gmem(0)


def _dkv_gradient_step(st: _Static, refs, smem, cta: _KeyCta, v_op, i, carry):
    """Query block i: dP^T = v do^T - delta, dS^T = P^T * dP^T (handed to the score warpgroup),
    then dK_rope += dS^T q_rope and dV += P^T do; fused, also dQ_rope(i) = dS(i) k_rope, added
    into GMEM."""
    dkr, dv = carry
    slot = lax.rem(i, jnp.int32(st.stages))
    pb = lax.rem(i, jnp.int32(2))
    plgpu.barrier_wait(smem.q_bars.at[slot])
    dp_t = mma([(v_op, _t(smem.do_smem.at[slot]))], (st.bkv, st.bq), interpret=st.interpret)
    delta = plgpu.load(smem.delta_smem.at[slot], layout=COLS)
    dp_t = dp_t - _bcast_cols(delta, dp_t.shape)
    plgpu.barrier_wait(smem.p_ready.at[pb])
    p16 = plgpu.load(smem.p_smem.at[pb], layout=WGMMA)
    plgpu.barrier_arrive(smem.p_free.at[pb])
    ds16 = (p16.astype(jnp.float32) * dp_t).astype(st.dtype)

    @pl.when(i >= 2)
    def _():
        plgpu.barrier_wait(smem.ds_free.at[pb])  # the score WG's dK(i - 2) has read it

    smem.ds_smem.at[pb][...] = ds16
    plgpu.commit_smem()
    plgpu.barrier_arrive(smem.ds_ready.at[pb])
    groups = [([(ds16, smem.qr_smem.at[slot])], dkr), ([(p16, smem.do_smem.at[slot])], dv)]
    if st.dq_acc is not None:
        groups.append(([(_t(smem.ds_smem.at[pb]), smem.kr_smem)], (st.bq, st.Hr)))
    dkr, dv, *dqr = mma_multi(groups, interpret=st.interpret)
    plgpu.barrier_arrive(smem.q_free.at[slot])
    if dqr:
        _add_dq(st, cta, dqr[0], smem.dkr_smem, refs.dqr, i)
    return dkr, dv


def _dkv_memory(st: _Static, refs: _DkvRefs, smem, cta: _KeyCta):
    """Memory warpgroup: query blocks q_hi - 1 down to the diagonal (q_nope, q_rope, do, lse2,
    delta, query segment ids)."""
    plgpu.set_max_registers(MEMORY_REGS, action="decrease")
    b, h = cta.b, cta.h

    def load(i, slot):
        q_rows = pl.ds((cta.q_hi - 1 - i) * st.bq, st.bq)
        bar = smem.q_bars.at[slot]
        plgpu.copy_gmem_to_smem(refs.qn.at[b, q_rows, h], smem.qn_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(refs.qr.at[b, q_rows, h], smem.qr_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(refs.do.at[b, q_rows, h], smem.do_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(refs.lse.at[b, h, q_rows], smem.lse_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(refs.delta.at[b, h, q_rows], smem.delta_smem.at[slot], bar)
        if st.has_segments:
            plgpu.copy_gmem_to_smem(refs.seg.at[b, q_rows], smem.segq_smem.at[slot], bar)

    stream(cta.n_steps, st.stages, (load, smem.q_free))


# ----------------------------------------------------------------------------------------------
# Backward: fused (dk, dv and dq from one kernel)
# ----------------------------------------------------------------------------------------------
class _FusedRefs(NamedTuple):
    qn: Any     # q_nope[B, T, N, Hn]
    qr: Any     # q_rope[B, T, N, Hr]
    kn: Any     # k_nope[B, S, N, Hn]
    kr: Any     # k_rope[B, S, Hr]
    v: Any      # v[B, S, N, Hv]
    do: Any     # do[B, T, N, Hv]
    lse: Any    # lse2[B, N, T]
    delta: Any  # delta[B, N, T]
    seg: Any    # seg_bt[B, T]
    qhi: Any    # q_hi_bc[B, S // DKV_TILE]
    dqn: Any    # unscaled fp32 dQ_nope: [B, T, N, Hn] ("reduce") or [S // DKV_TILE, B, T, N, Hn]
    dqr: Any    # unscaled fp32 dQ_rope, as dqn with Hr
    dkn: Any    # dk_nope[B, S, N, Hn]
    dv: Any     # dv[B, S, N, Hv]
    dkr: Any    # dk_rope per head [B, S, N, Hr] fp32


def dq_accumulation(config: Config, interpret) -> str:
    """How the fused backward adds up dQ: config.dq_accumulation, "auto" resolved."""
    if config.dq_accumulation == "auto":
        return "partial" if interpret else "reduce"
    if config.dq_accumulation == "reduce" and interpret:
        raise ValueError("dq_accumulation='reduce' needs TMA reductions, which the Mosaic GPU "
                         "interpreter lacks; use 'partial' (or 'auto') when interpreting")
    return config.dq_accumulation


def _backward_fused_call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, q_hi_bc, *,
                         scale: float, config: Config, has_segments: bool, interpret: bool):
    """The dk/dv kernel (see _backward_dkv_call) that also adds each query block's dQ into fp32
    GMEM: (dq_nope[B, T, N, Hn], dq_rope[B, T, N, Hr]) unscaled fp32, then _backward_dkv_call's
    dk_nope, dv, per-head dk_rope.

    Warpgroup 0 forms dQ_nope(i) = dS(i) K_nope beside its dK_nope(i) wgmma, warpgroup 1
    dQ_rope(i) = dS(i) k_rope beside dK_rope(i) and dV(i), both from dS^T's SMEM tile read
    transposed; each stages its fp32 tile in SMEM and adds it to GMEM (_add_dq). The dQ
    accumulators start as zeros in refs the kernel updates in place.
    """
    B, T, N, _ = q_nope.shape
    acc = dq_accumulation(config, interpret)
    st = _static(q_nope, q_rope, v, DKV_TILE, DKV_TILE, config.fused_concurrent_steps,
                 scale=scale, has_segments=has_segments, interpret=interpret, dq_acc=acc)
    lead = () if acc == "reduce" else (T // DKV_TILE,)
    dqn = jax.new_ref(jnp.zeros((*lead, B, T, N, st.Hn), jnp.float32))
    dqr = jax.new_ref(jnp.zeros((*lead, B, T, N, st.Hr), jnp.float32))
    call = _key_block_call(st, q_nope.shape, _FusedRefs,
                           _fused_scratch(st.Hn, st.Hr, st.Hv, st.dtype, config, has_segments),
                           "mla_attention_bwd_fused", interpret)
    dk_nope, dv, dk_rope_bsnh = call(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt,
                                     q_hi_bc, dqn, dqr)
    dq_nope, dq_rope = jax.freeze(dqn), jax.freeze(dqr)
    if lead:
        dq_nope, dq_rope = dq_nope.sum(0), dq_rope.sum(0)
    return dq_nope, dq_rope, dk_nope, dv, dk_rope_bsnh


def _fused_scratch(Hn, Hr, Hv, dtype, config: Config, has_segments: bool) -> dict:
    """SMEM and barriers of the fused kernel: the dk/dv CTA's with fused_concurrent_steps slots,
    and dQ_nope's fp32 staging tile (dQ_rope's is dkr_smem)."""
    smem = _key_block_scratch(Hn, Hr, Hv, dtype, config.fused_concurrent_steps, has_segments)
    return smem | dict(dqn_smem=plgpu.SMEM((DKV_TILE, Hn), jnp.float32))


# ----------------------------------------------------------------------------------------------
# What the kernels support
# ----------------------------------------------------------------------------------------------
def unsupported(Hn: int, Hr: int, Hv: int, *, has_segments: bool = True,
                config: Config | None = None) -> str | None:
    """Why the kernels `config` selects cannot run these head dims (None: they can).

    TMA copies into the 128-byte-swizzled tiles move whole 64-wide bf16 column blocks, so each
    head dim must be a multiple of 64 (mla_attention.py pads smaller ones), and each kernel's
    tiles must fit the shared memory of one CTA (SMEM_LIMIT). Segment ids add a few small
    buffers, so has_segments=True is the stricter check.
    """
    config = Config() if config is None else config
    for name, d in (("qk_nope_head_dim", Hn), ("qk_rope_head_dim", Hr), ("v_head_dim", Hv)):
        if d % 64:
            return f"{name}={d} is not a multiple of 64 (the kernels' 128-byte swizzle tile)"
    kernels = ((("forward", _forward_scratch), ("dq", _dq_scratch), ("dk/dv", _dkv_scratch))
               if config.backward == "split" else
               (("forward", _forward_scratch), ("fused backward", _fused_scratch)))
    for kernel, scratch in kernels:
        used = smem_bytes(scratch(Hn, Hr, Hv, jnp.bfloat16, config, has_segments))
        if used > SMEM_LIMIT:
            return (f"head dims {Hn}/{Hr}/{Hv} (nope/rope/v) need {used} bytes of shared memory "
                    f"in the {kernel} kernel, above the {SMEM_LIMIT} a Hopper CTA has "
                    f"(with the default tiles DeepSeek-V3's 128/64/128 fits; so do smaller "
                    f"dims)")
    return None


# ----------------------------------------------------------------------------------------------
# Entry points used by mla_attention._flash (custom_vjp)
# ----------------------------------------------------------------------------------------------
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
    rows = COMPUTE_WGS * config.block_q
    kv_lo = (_kv_lo(bounds[0], rows, config.block_kv) if has_segments
             else jnp.zeros((B, T // rows), jnp.int32))
    return _forward_call(q_nope, q_rope, k_nope, k_rope, v, seg_bt, kv_lo, scale=scale,
                         config=config, has_segments=has_segments, interpret=interpret)


def backward(q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, bounds, *,
             scale: float, config: Config, has_segments: bool, interpret: bool):
    """(dq_nope, dq_rope, dk_nope, dk_rope[B, S, Hr] summed over heads, dv), by the kernels
    config.backward names."""
    B, T = seg_bt.shape
    q_hi = (_q_hi(bounds[1], DKV_TILE, DKV_TILE) if has_segments
            else jnp.zeros((B, T // DKV_TILE), jnp.int32))
    kw = dict(scale=scale, config=config, has_segments=has_segments, interpret=interpret)
    if config.backward == "fused":
        with jax.named_scope("mla_mgpu_bwd_fused"):
            dqn, dqr, dk_nope, dv, dk_rope_bsnh = _backward_fused_call(
                q_nope, q_rope, k_nope, k_rope, v, do, lse2, delta, seg_bt, q_hi, **kw)
            dq_nope = (dqn * scale).astype(q_nope.dtype)
            dq_rope = (dqr * scale).astype(q_rope.dtype)
            dk_rope = dk_rope_bsnh.sum(axis=2).astype(k_rope.dtype)
        return dq_nope, dq_rope, dk_nope, dk_rope, dv
    rows = COMPUTE_WGS * config.block_q_dq
    kv_lo = (_kv_lo(bounds[0], rows, config.block_kv_dq) if has_segments
             else jnp.zeros((B, T // rows), jnp.int32))
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
def _await_last_two(bars, n_steps):
    """Wait for the releases of a double buffer's last two uses (steps n_steps - 2, n_steps - 1)
    that the loop did not wait for, so that every mbarrier phase is observed."""
    @pl.loop(jnp.maximum(n_steps - 2, 0), n_steps)
    def _(i):
        plgpu.barrier_wait(bars.at[lax.rem(i, jnp.int32(2))])

