"""Absorbed MLA decode attention in Pallas Mosaic TPU.

Legend (as in mla_decode.py): B sequences, Tq new tokens, N heads, R latent rank, Hr rope dim,
L cache capacity. One program per (sequence, cache block) with cache blocks innermost: the
Tq * N query rows [q_latent ; q_rope] (rows padded to a multiple of 8) stay in VMEM while cache
tiles [block_kv, R + Hr] stream through; scores are one matmul with K = R + Hr against the tile
and the output one matmul with its first R columns. Blocks past lengths[b] are neither fetched
(their block index repeats) nor computed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
_TRANS_B = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
    block_kv: int = 512


# The smallest default scoped VMEM of a Mosaic TPU kernel: 16 MiB on v5e and v5p (Mosaic's
# "CompileTimeScopedVmemOom" limit compiling for v5p), 32 MiB on v6e (the same, for v6e).
VMEM_LIMIT = 16 * 1024 * 1024


def unsupported(R: int, Hr: int, N: int, Tq: int, *, config: Config | None = None) -> str | None:
    """Why the kernel cannot run these dims (None: it can), by Mosaic TPU's documented rules:
    the kernel slices the cache tile's c_kv columns [:R] in VMEM, which must end on a 128-lane
    boundary, and the double-buffered blocks plus fp32 scratch must fit the scoped VMEM."""
    config = Config() if config is None else config
    if R % LANES:
        return f"kv_lora_rank={R} is not a multiple of {LANES} (the lane slice of the cache tile)"
    rows = -(-Tq * N // SUBLANES) * SUBLANES
    vmem = (2 * 4 * (rows * (R + Hr) + config.block_kv * (R + Hr) + rows * LANES + rows * R)
            + 4 * rows * (2 * LANES + R))
    if vmem > VMEM_LIMIT:
        return (f"{Tq} x {N} query rows with kv_lora_rank={R} need about {vmem} bytes of VMEM, "
                f"above the {VMEM_LIMIT} scoped for a Mosaic TPU kernel")
    return None


def _cost(B: int, rows: int, L: int, R: int, Hr: int, dtype) -> pl.CostEstimate:
    """What the kernel executes at full caches, for XLA's scheduler and cost_analysis (which
    otherwise counts a kernel as nothing): per sequence, scores [rows, L] over R + Hr and the
    output over R; the cache read once, the queries, limits and output once."""
    isz = jnp.dtype(dtype).itemsize
    reads = B * (L * (R + Hr) * isz + rows * (R + Hr) * isz + rows * LANES * 4)
    return pl.CostEstimate(flops=2 * B * rows * L * (2 * R + Hr),
                           transcendentals=B * rows * L,
                           bytes_accessed=reads + B * rows * R * isz)


def decode(q_latent, q_rope, kv_cache, lengths, *, scale: float, config: Config | None = None,
           interpret: bool = False):
    """o_latent[B, Tq, N, R] (see mla_decode.py for the semantics)."""
    config = Config() if config is None else config
    B, Tq, N, R = q_latent.shape
    Hr, L = q_rope.shape[-1], kv_cache.shape[1]
    reason = unsupported(R, Hr, N, Tq, config=config)
    if reason:
        raise ValueError(f"mla_decode implementation 'pallas' on tpu: {reason}; use "
                         "implementation 'xla'")
    bkv = config.block_kv
    n_rows = Tq * N
    rows = -(-n_rows // SUBLANES) * SUBLANES
    pad_l = -L % bkv
    nkv = (L + pad_l) // bkv
    with jax.named_scope("mla_decode_tpu_prep"):
        q_brk = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
        q_brk = jnp.pad(q_brk.reshape(B, n_rows, R + Hr), ((0, 0), (0, rows - n_rows), (0, 0)))
        kv = jnp.pad(kv_cache, ((0, 0), (0, pad_l), (0, 0))) if pad_l else kv_cache
        lengths = lengths.astype(jnp.int32)
        # Query row r (token r // N) sees cache rows <= lengths - Tq + r // N.
        token_r = jnp.arange(rows, dtype=jnp.int32) // N
        limit_br = jnp.minimum(lengths[:, None] - Tq + token_r[None, :], lengths[:, None] - 1)
        limit_brl = jnp.broadcast_to(limit_br[..., None], (B, rows, LANES))

    def last_block(b, len_ref):
        return (len_ref[b] - 1) // bkv

    def kernel(len_ref, q_ref, kv_ref, lim_ref, o_ref, m_sc, l_sc, acc_sc):
        b, j = pl.program_id(0), pl.program_id(1)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(j <= last_block(b, len_ref))
        def _step():
            kv_tile = kv_ref[...]  # [bkv, R + Hr]
            s = lax.dot_general(q_ref[...], kv_tile, _TRANS_B,
                                preferred_element_type=jnp.float32) * scale  # [rows, bkv]
            pos = lax.broadcasted_iota(jnp.int32, s.shape, 1) + j * bkv
            s = jnp.where(pos <= lim_ref[:, :1], s, -jnp.inf)
            m_prev = m_sc[:, :1]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            l_sc[...] = jnp.broadcast_to(alpha * l_sc[:, :1] + p.sum(axis=1, keepdims=True),
                                         l_sc.shape)
            m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
            acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
                p.astype(kv_tile.dtype), kv_tile[:, :R], preferred_element_type=jnp.float32)

        @pl.when(j == nkv - 1)
        def _finish():
            o_ref[...] = (acc_sc[...] / l_sc[:, :1]).astype(o_ref.dtype)

    o_brr = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, nkv),
            in_specs=[
                pl.BlockSpec((None, rows, R + Hr), lambda b, j, ln: (b, 0, 0)),
                pl.BlockSpec((None, bkv, R + Hr),
                             lambda b, j, ln: (b, jnp.minimum(j, last_block(b, ln)), 0)),
                pl.BlockSpec((None, rows, LANES), lambda b, j, ln: (b, 0, 0)),
            ],
            out_specs=pl.BlockSpec((None, rows, R), lambda b, j, ln: (b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((rows, LANES), jnp.float32),
                            pltpu.VMEM((rows, LANES), jnp.float32),
                            pltpu.VMEM((rows, R), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((B, rows, R), q_latent.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(B, rows, L + pad_l, R, Hr, q_latent.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(lengths, q_brk, kv, limit_brl)
    return o_brr[:, :n_rows].reshape(B, Tq, N, R)
