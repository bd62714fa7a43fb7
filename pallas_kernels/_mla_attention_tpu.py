"""Causal MLA flash attention in Pallas Mosaic TPU: forward, dq and dk/dv kernels.

Legend (as in mla_attention.py): B batch, T query length == S key length, N heads, Hn nope head dim,
Hr rope head dim (one rope key shared by all heads), Hv value head dim.

Same interface and residuals as the Mosaic GPU kernels (_mla_attention_mgpu.py), written the TPU
way: a (B, N, query block, key block) grid whose innermost axis accumulates in VMEM scratch, head-
major [B, N, T, H] operands (the wrapper transposes), the shared rope key read from its single
[B, S, Hr] copy, per-row statistics broadcast over 128 lanes. Scalar-prefetched tables bound the
key blocks each query block visits (and the converse in dk/dv): blocks off the causal band or
before the first key of the block's documents are neither fetched (their block index repeats) nor
computed. lse is in the natural-log domain here; only mla_attention._flash passes it between the
forward and backward of the same backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
_TRANS_B = (((1,), (1,)), ((), ()))  # x[m, k] . y[n, k] -> [m, n]
_TRANS_A = (((0,), (0,)), ((), ()))  # x[k, m] . y[k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 128
    block_kv: int = 128

    @property
    def seq_multiple(self) -> int:
        return max(self.block_q, self.block_kv)

    def __post_init__(self):
        if self.block_q % LANES or self.block_kv % LANES:
            raise ValueError("TPU MLA attention blocks must be multiples of 128")
        big, small = max(self.block_q, self.block_kv), min(self.block_q, self.block_kv)
        if big % small:
            raise ValueError("block_q and block_kv must divide one another")


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


# The smallest default scoped VMEM of a Mosaic TPU kernel: 16 MiB on v5e and v5p (Mosaic's
# "CompileTimeScopedVmemOom" limit compiling for v5p), 32 MiB on v6e (the same, for v6e).
VMEM_LIMIT = 16 * 1024 * 1024


def unsupported(Hn: int, Hr: int, Hv: int, *, config: Config | None = None) -> str | None:
    """Why the three kernels cannot run these head dims (None: they can), by Mosaic TPU's
    documented rules: a block's last two dims must be multiples of (8, 128) or span the array,
    and every kernel's double-buffered blocks and scratch must fit the scoped VMEM.

    Head dims are always whole in a block and sequence blocks are multiples of 128 (the wrapper
    pads T), so only VMEM can refuse. The estimate is the largest kernel (dk/dv: q-side and
    k-side blocks of every operand, fp32 accumulators), counted at 4 bytes an element.
    """
    config = Config() if config is None else config
    b = max(config.block_q, config.block_kv)
    width = Hn + Hr + Hv
    vmem = 4 * (2 * 2 * b * (width + 2 * LANES) + 2 * b * width + b * width)
    if vmem > VMEM_LIMIT:
        return (f"head dims {Hn}/{Hr}/{Hv} (nope/rope/v) need about {vmem} bytes of VMEM, "
                f"above the {VMEM_LIMIT} scoped for a Mosaic TPU kernel")
    return None


def causal_steps(T: int, config: Config) -> int:
    """(query block, key block) pairs on or below the causal diagonal: the steps a kernel
    computes per (batch, head) without segments (segments only skip more)."""
    bq, bkv = config.block_q, config.block_kv
    return sum(((i + 1) * bq - 1) // bkv + 1 for i in range(T // bq))


def _cost(q_nope, config: Config, *, matmul_widths, q_row_bytes: int, kv_row_bytes: int,
          streamed_side: str, out_row_bytes: int) -> pl.CostEstimate:
    """What one of the three kernels executes, for XLA's scheduler and cost_analysis (which
    otherwise counts a kernel as nothing). Per (batch, head): `causal_steps` block pairs, each
    one [bq, bkv] product per head width in `matmul_widths` and one exp per score. The
    resident side's rows are read once, the streamed side's ("q" | "kv") once per step; each
    row's outputs are written once."""
    B, T, N, _ = q_nope.shape
    bq, bkv = config.block_q, config.block_kv
    steps = causal_steps(T, config)
    if streamed_side == "kv":
        reads = steps * bkv * kv_row_bytes + T * q_row_bytes
    else:
        reads = steps * bq * q_row_bytes + T * kv_row_bytes
    return pl.CostEstimate(flops=2 * B * N * steps * bq * bkv * sum(matmul_widths),
                           transcendentals=B * N * steps * bq * bkv,
                           bytes_accessed=B * N * (reads + T * out_row_bytes))


def _row_bytes(isz: int, *widths: int, stats: int = 0, seg: int = 0) -> int:
    """Bytes of one sequence row of some head-dim operands (isz each), `stats` fp32 statistics
    and `seg` int32 segment ids (each 128 lanes wide, as the kernels hold them)."""
    return isz * sum(widths) + 4 * LANES * stats + 4 * seg


def _dot(x, y, dims):
    return lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


def _scores(qn, qr, kn, kr, scale):
    """[bq, bkv] fp32: scale * (q_nope k_nope^T + q_rope k_rope^T)."""
    return (_dot(qn, kn, _TRANS_B) + _dot(qr, kr, _TRANS_B)) * scale


def _visible(q0, k0, bq, bkv, segq_ref, segk_ref):
    """[bq, bkv] bool: causal and (when segment refs are given) same document."""
    rows = lax.broadcasted_iota(jnp.int32, (bq, bkv), 0) + q0
    cols = lax.broadcasted_iota(jnp.int32, (bq, bkv), 1) + k0
    vis = cols <= rows
    if segq_ref is not None:
        seg_q = jnp.tile(segq_ref[...], (1, bkv // LANES))  # [bq, bkv]
        seg_k = segk_ref[:1, :]  # [1, bkv]
        vis = vis & (seg_q == seg_k)
    return vis


def _lanes(x_t, n):
    """[..., T] -> [..., T, n] broadcast (TPU keeps per-row statistics lane-replicated)."""
    return jnp.broadcast_to(x_t[..., None], (*x_t.shape, n))


def _seg_operands(seg_bt):
    """Query-side [B, T, 128] and key-side [B, 8, T] segment ids (TPU-friendly tiles)."""
    B, T = seg_bt.shape
    return _lanes(seg_bt, LANES), jnp.broadcast_to(seg_bt[:, None, :], (B, SUBLANES, T))


def _bhtd(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, N, H] <-> [B, N, T, H]


class _Dims(NamedTuple):
    """The sizes of one attention call (legend above) that its kernels are built from."""

    B: int
    T: int
    N: int
    Hn: int
    Hr: int
    Hv: int
    nq: int           # query blocks
    nkv: int          # key blocks
    dtype: jnp.dtype  # of q, k, v and do: the matmul operands
    isz: int          # bytes of one element of dtype


def _dims(q_nope, q_rope, v, config: Config) -> _Dims:
    B, T, N, Hn = q_nope.shape
    dtype = q_nope.dtype
    return _Dims(B, T, N, Hn, q_rope.shape[-1], v.shape[-1], T // config.block_q,
                 T // config.block_kv, dtype, jnp.dtype(dtype).itemsize)


# ----------------------------------------------------------------------------------------------
# Which blocks each grid step visits
# ----------------------------------------------------------------------------------------------
def _kv_lo(bounds, B: int, nq: int, config: Config, has_segments: bool):
    """[B, nq] int32: the first key block each query block visits (the first key of its
    documents; 0 without segments)."""
    if has_segments:
        return (bounds[0].reshape(B, nq, config.block_q).min(-1) // config.block_kv
                ).astype(jnp.int32)
    return jnp.zeros((B, nq), jnp.int32)


def _q_hi(bounds, B: int, nq: int, nkv: int, config: Config, has_segments: bool):
    """[B, nkv] int32: the last query block each key block is seen by (the last query of its
    documents; the last block without segments)."""
    if has_segments:
        return (bounds[1].reshape(B, nkv, config.block_kv).max(-1) // config.block_q
                ).astype(jnp.int32)
    return jnp.full((B, nkv), nq - 1, jnp.int32)


def _kv_hi(i, config: Config):
    """The last key block query block i visits (the one holding its diagonal)."""
    return ((i + 1) * config.block_q - 1) // config.block_kv


def _q_lo(j, config: Config):
    """The first query block that sees key block j (the one holding its diagonal)."""
    return (j * config.block_kv) // config.block_q


class _IndexMaps(NamedTuple):
    """Index maps of one kernel's grid for the head-major query-side (`q`) and key-side (`kv`)
    operands [B, N, T, width], the shared rope key [B, S, Hr] and the segment-id tiles. A block
    outside the visited band maps to the nearest visited one, so it is not fetched again."""

    q: Callable
    kv: Callable
    k_rope: Callable
    seg_q: Callable
    seg_k: Callable


def _query_major(config: Config) -> _IndexMaps:
    """Grid (B, N, query block i, key block j) with prefetched lo[B, nq] = `_kv_lo` (forward,
    dq): query block i visits key blocks lo[b, i] .. _kv_hi(i)."""
    def kv_block(b, i, j, lo_ref):
        return jnp.clip(j, lo_ref[b, i], _kv_hi(i, config))

    return _IndexMaps(q=lambda b, h, i, j, lo: (b, h, i, 0),
                      kv=lambda b, h, i, j, lo: (b, h, kv_block(b, i, j, lo), 0),
                      k_rope=lambda b, h, i, j, lo: (b, kv_block(b, i, j, lo), 0),
                      seg_q=lambda b, h, i, j, lo: (b, i, 0),
                      seg_k=lambda b, h, i, j, lo: (b, 0, kv_block(b, i, j, lo)))


def _key_major(config: Config) -> _IndexMaps:
    """Grid (B, N, key block j, query block i) with prefetched hi[B, nkv] = `_q_hi` (dk/dv): key
    block j is seen by query blocks _q_lo(j) .. hi[b, j]."""
    def q_block(b, j, i, hi_ref):
        return jnp.clip(i, _q_lo(j, config), hi_ref[b, j])

    return _IndexMaps(q=lambda b, h, j, i, hi: (b, h, q_block(b, j, i, hi), 0),
                      kv=lambda b, h, j, i, hi: (b, h, j, 0),
                      k_rope=lambda b, h, j, i, hi: (b, j, 0),
                      seg_q=lambda b, h, j, i, hi: (b, q_block(b, j, i, hi), 0),
                      seg_k=lambda b, h, j, i, hi: (b, 0, j))


def _in_specs(maps: _IndexMaps, config: Config, Hn: int, Hr: int, Hv: int, *,
              backward: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of q_nope, q_rope, k_nope, k_rope, v, (backward: do, lse, delta,) seg_q,
    seg_k: the operands every kernel reads, in the order the kernels take them."""
    bq, bkv = config.block_q, config.block_kv
    specs = [pl.BlockSpec((None, None, bq, Hn), maps.q),
             pl.BlockSpec((None, None, bq, Hr), maps.q),
             pl.BlockSpec((None, None, bkv, Hn), maps.kv),
             pl.BlockSpec((None, bkv, Hr), maps.k_rope),
             pl.BlockSpec((None, None, bkv, Hv), maps.kv)]
    if backward:
        specs += [pl.BlockSpec((None, None, bq, Hv), maps.q),
                  pl.BlockSpec((None, None, bq, LANES), maps.q),
                  pl.BlockSpec((None, None, bq, LANES), maps.q)]
    return [*specs, pl.BlockSpec((None, bq, LANES), maps.seg_q),
            pl.BlockSpec((None, SUBLANES, bkv), maps.seg_k)]


def _pallas_call(kernel, *, grid, in_specs, out_specs, scratch_shapes, out_shape,
                 cost_estimate, interpret: bool):
    """One of the three kernels: a 4-axis grid whose innermost axis accumulates in the VMEM
    `scratch_shapes`, and one scalar-prefetched table of the blocks it visits."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost_estimate,
        interpret=pltpu.InterpretParams() if interpret else False,
    )


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def forward(q_nope, q_rope, k_nope, k_rope, v, seg_bt, bounds, *, scale: float, config: Config,
            has_segments: bool, interpret: bool):
    """o[B, T, N, Hv] and lse[B, N, T] (fp32, natural log)."""
    B, T, N, Hn, Hr, Hv, nq, nkv, dtype, isz = _dims(q_nope, q_rope, v, config)
    bq = config.block_q
    kv_lo = _kv_lo(bounds, B, nq, config, has_segments)
    segq, segk = _seg_operands(seg_bt)
    maps = _query_major(config)
    call = _pallas_call(
        functools.partial(_forward_kernel, scale=scale, config=config, nkv=nkv,
                          has_segments=has_segments),
        grid=(B, N, nq, nkv),
        in_specs=_in_specs(maps, config, Hn, Hr, Hv, backward=False),
        out_specs=[pl.BlockSpec((None, None, bq, Hv), maps.q),
                   pl.BlockSpec((None, None, bq, LANES), maps.q)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, Hv), jnp.float32)],
        out_shape=[jax.ShapeDtypeStruct((B, N, T, Hv), dtype),
                   jax.ShapeDtypeStruct((B, N, T, LANES), jnp.float32)],
        cost_estimate=_cost(q_nope, config, matmul_widths=(Hn + Hr, Hv),
                            q_row_bytes=_row_bytes(isz, Hn, Hr, seg=LANES),
                            kv_row_bytes=_row_bytes(isz, Hn, Hr, Hv, seg=SUBLANES),
                            streamed_side="kv", out_row_bytes=_row_bytes(isz, Hv, stats=1)),
        interpret=interpret)
    o_bnth, lse_bntl = call(kv_lo, _bhtd(q_nope), _bhtd(q_rope), _bhtd(k_nope), k_rope, _bhtd(v),
                            segq, segk)
    return _bhtd(o_bnth), lse_bntl[..., 0]


def _forward_kernel(lo_ref, qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, segk_ref, o_ref,
                    lse_ref, m_sc, l_sc, acc_sc, *, scale: float, config: Config, nkv: int,
                    has_segments: bool):
    """Query block i of head (b, h), key block j: online softmax into m, l and acc."""
    bq, bkv = config.block_q, config.block_kv
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= _kv_hi(i, config)))
    def _step():
        s = _scores(qn_ref[...], qr_ref[...], kn_ref[...], kr_ref[...], scale)
        vis = _visible(i * bq, j * bkv, bq, bkv, segq_ref if has_segments else None, segk_ref)
        s = jnp.where(vis, s, -jnp.inf)
        m_prev = m_sc[:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [bq, 1]
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp(m_prev - m_ref)
        p = jnp.exp(s - m_ref)
        l_sc[...] = jnp.broadcast_to(alpha * l_sc[:, :1] + p.sum(axis=1, keepdims=True),
                                     l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v_ref.dtype), v_ref[...],
                                                    preferred_element_type=jnp.float32)

    @pl.when(j == nkv - 1)
    def _finish():
        l = l_sc[:, :1]
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
def backward(q_nope, q_rope, k_nope, k_rope, v, do, lse, delta, seg_bt, bounds, *, scale: float,
             config: Config, has_segments: bool, interpret: bool):
    """(dq_nope, dq_rope, dk_nope, dk_rope[B, S, Hr] summed over heads, dv)."""
    B, T = seg_bt.shape
    nq, nkv = T // config.block_q, T // config.block_kv
    kv_lo = _kv_lo(bounds, B, nq, config, has_segments)
    q_hi = _q_hi(bounds, B, nq, nkv, config, has_segments)
    segq, segk = _seg_operands(seg_bt)
    qn, qr, kn, vv, dob = map(_bhtd, (q_nope, q_rope, k_nope, v, do))
    lse_l, delta_l = _lanes(lse, LANES), _lanes(delta, LANES)  # [B, N, T, 128]
    kw = dict(scale=scale, config=config, has_segments=has_segments, interpret=interpret)
    dqn, dqr = _dq_call(q_nope, q_rope, v, **kw)(kv_lo, qn, qr, kn, k_rope, vv, dob, lse_l,
                                                  delta_l, segq, segk)
    if interpret:
        # Run the interpreted dq and dk/dv kernels one after the other (they are independent, and
        # concurrently interpreted kernels can deadlock); make dk/dv's operands depend on dq.
        _, (qn, qr, kn, vv, dob) = lax.optimization_barrier(((dqn, dqr), (qn, qr, kn, vv, dob)))
    dkn, dvv, dkr_heads = _dkv_call(q_nope, q_rope, v, **kw)(q_hi, qn, qr, kn, k_rope, vv, dob,
                                                             lse_l, delta_l, segq, segk)
    dk_rope = dkr_heads.sum(axis=1).astype(k_rope.dtype)
    return _bhtd(dqn), _bhtd(dqr), _bhtd(dkn), dk_rope, _bhtd(dvv)


def _dq_call(q_nope, q_rope, v, *, scale: float, config: Config, has_segments: bool,
             interpret: bool):
    """The dq kernel: grid (B, N, query block, key block), key blocks innermost."""
    B, T, N, Hn, Hr, Hv, nq, nkv, dtype, isz = _dims(q_nope, q_rope, v, config)
    bq = config.block_q
    maps = _query_major(config)
    return _pallas_call(
        functools.partial(_dq_kernel, scale=scale, config=config, nkv=nkv,
                          has_segments=has_segments),
        grid=(B, N, nq, nkv),
        in_specs=_in_specs(maps, config, Hn, Hr, Hv, backward=True),
        out_specs=[pl.BlockSpec((None, None, bq, Hn), maps.q),
                   pl.BlockSpec((None, None, bq, Hr), maps.q)],
        scratch_shapes=[pltpu.VMEM((bq, Hn), jnp.float32), pltpu.VMEM((bq, Hr), jnp.float32)],
        out_shape=[jax.ShapeDtypeStruct((B, N, T, Hn), dtype),
                   jax.ShapeDtypeStruct((B, N, T, Hr), dtype)],
        cost_estimate=_cost(q_nope, config, matmul_widths=(Hn + Hr, Hv, Hn + Hr),
                            q_row_bytes=_row_bytes(isz, Hn, Hr, Hv, stats=2, seg=LANES),
                            kv_row_bytes=_row_bytes(isz, Hn, Hr, Hv, seg=SUBLANES),
                            streamed_side="kv", out_row_bytes=_row_bytes(isz, Hn, Hr)),
        interpret=interpret)


def _dkv_call(q_nope, q_rope, v, *, scale: float, config: Config, has_segments: bool,
              interpret: bool):
    """The dk/dv kernel: grid (B, N, key block, query block), query blocks innermost; dk_rope
    per head in fp32."""
    B, T, N, Hn, Hr, Hv, nq, nkv, dtype, isz = _dims(q_nope, q_rope, v, config)
    bkv = config.block_kv
    maps = _key_major(config)
    return _pallas_call(
        functools.partial(_dkv_kernel, scale=scale, config=config, nq=nq,
                          has_segments=has_segments),
        grid=(B, N, nkv, nq),
        in_specs=_in_specs(maps, config, Hn, Hr, Hv, backward=True),
        out_specs=[pl.BlockSpec((None, None, bkv, Hn), maps.kv),
                   pl.BlockSpec((None, None, bkv, Hv), maps.kv),
                   pl.BlockSpec((None, None, bkv, Hr), maps.kv)],
        scratch_shapes=[pltpu.VMEM((bkv, Hn), jnp.float32), pltpu.VMEM((bkv, Hv), jnp.float32),
                        pltpu.VMEM((bkv, Hr), jnp.float32)],
        out_shape=[jax.ShapeDtypeStruct((B, N, T, Hn), dtype),
                   jax.ShapeDtypeStruct((B, N, T, Hv), dtype),
                   jax.ShapeDtypeStruct((B, N, T, Hr), jnp.float32)],
        cost_estimate=_cost(q_nope, config, matmul_widths=(Hn + Hr, Hv, Hv, Hn + Hr),
                            q_row_bytes=_row_bytes(isz, Hn, Hr, Hv, stats=2, seg=LANES),
                            kv_row_bytes=_row_bytes(isz, Hn, Hr, Hv, seg=SUBLANES),
                            streamed_side="q", out_row_bytes=_row_bytes(isz, Hn, Hv) + 4 * Hr),
        interpret=interpret)


def _block_grads(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref,
                 segk_ref, q0, k0, *, scale: float, config: Config, has_segments: bool):
    """p, ds [bq, bkv] for one (query block, key block) pair."""
    s = _scores(qn_ref[...], qr_ref[...], kn_ref[...], kr_ref[...], scale)
    vis = _visible(q0, k0, config.block_q, config.block_kv,
                   segq_ref if has_segments else None, segk_ref)
    p = jnp.where(vis, jnp.exp(s - lse_ref[:, :1]), 0.0)
    dp = _dot(do_ref[...], v_ref[...], _TRANS_B)
    ds = p * (dp - delta_ref[:, :1])
    return p, ds


def _dq_kernel(lo_ref, qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref,
               segq_ref, segk_ref, dqn_ref, dqr_ref, dqn_sc, dqr_sc, *, scale: float,
               config: Config, nkv: int, has_segments: bool):
    """Query block i of head (b, h), key block j: dq += dS k."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dqn_sc[...] = jnp.zeros(dqn_sc.shape, jnp.float32)
        dqr_sc[...] = jnp.zeros(dqr_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= _kv_hi(i, config)))
    def _step():
        _, ds = _block_grads(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref,
                             segq_ref, segk_ref, i * config.block_q, j * config.block_kv,
                             scale=scale, config=config, has_segments=has_segments)
        ds = ds.astype(qn_ref.dtype)
        dqn_sc[...] += jnp.dot(ds, kn_ref[...], preferred_element_type=jnp.float32)
        dqr_sc[...] += jnp.dot(ds, kr_ref[...], preferred_element_type=jnp.float32)

    @pl.when(j == nkv - 1)
    def _finish():
        dqn_ref[...] = (dqn_sc[...] * scale).astype(dqn_ref.dtype)
        dqr_ref[...] = (dqr_sc[...] * scale).astype(dqr_ref.dtype)


def _dkv_kernel(hi_ref, qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref,
                segq_ref, segk_ref, dkn_ref, dv_ref, dkr_ref, dkn_sc, dv_sc, dkr_sc, *,
                scale: float, config: Config, nq: int, has_segments: bool):
    """Key block j of head (b, h), query block i: dv += P^T do, dk += dS^T q."""
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    dtype = qn_ref.dtype

    @pl.when(i == 0)
    def _init():
        dkn_sc[...] = jnp.zeros(dkn_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        dkr_sc[...] = jnp.zeros(dkr_sc.shape, jnp.float32)

    @pl.when((i >= _q_lo(j, config)) & (i <= hi_ref[b, j]))
    def _step():
        p, ds = _block_grads(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref,
                             segq_ref, segk_ref, i * config.block_q, j * config.block_kv,
                             scale=scale, config=config, has_segments=has_segments)
        ds = ds.astype(dtype)
        dv_sc[...] += _dot(p.astype(dtype), do_ref[...], _TRANS_A)
        dkn_sc[...] += _dot(ds, qn_ref[...], _TRANS_A)
        dkr_sc[...] += _dot(ds, qr_ref[...], _TRANS_A)

    @pl.when(i == nq - 1)
    def _finish():
        dkn_ref[...] = (dkn_sc[...] * scale).astype(dkn_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
        dkr_ref[...] = dkr_sc[...] * scale
