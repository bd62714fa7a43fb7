"""Dropless expert parallelism: token-rows travel to the shard holding their expert and back.

Legend: T_ local tokens, K top-k, M_ = T_*K local token-rows, D model dim, F expert hidden,
P expert-axis size, E_ = E / P experts per shard, Q rows per (source, destination) per round.
Names ending in `_` are per-device values inside `shard_map`.

Layout: tokens are split over (data, expert); routed experts over `expert` (and, with full
parameter sharding, their D axis over `data`). Each device sorts its M_ rows by expert (so
rows for one destination shard are contiguous) and exchanges them with `all_to_all` in ROUNDS
of at most Q = ceil(capacity_factor * M_ / P) rows per (source, destination) pair: every
buffer is [P, Q, D], i.e. capacity_factor x the balanced load, never the worst case. When the
routing is more unbalanced than that, more rounds run (a while loop whose trip count is the
global maximum over pairs, so all devices agree): no row is ever dropped. Padding rows carry
zeros and the expert index E_, are left out of the grouped matmul, and so cannot make NaN.

The backward pass (custom VJP) re-runs the same rounds, exchanging the output gradient with the
inputs and recomputing each round's expert forward, so no per-round activation is stored.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.sharding import BATCH_AXES, Parallel
from pallas_kernels import expert_dispatch


def routed_experts(x_td, expert_idx_tk, weights_tk, w_gate_edf, w_up_edf, w_down_efd, *,
                   parallel: Parallel, implementation: str):
    """The routed-expert block over the mesh; same contract as expert_dispatch.routed_experts."""
    mesh, fsdp = parallel.mesh, parallel.fsdp
    w_in_spec = parallel.spec("experts", "embed", None)  # [E, D, F]
    w_out_spec = parallel.spec("experts", None, "embed")  # [E, F, D]
    rows = parallel.spec("batch", None)

    def local(x_, idx_, w_, wg_, wu_, wd_):
        T_, K = idx_.shape
        x_sorted_, group_sizes_, order_ = expert_dispatch.permute(
            x_, idx_, wg_.shape[0] * parallel.expert_size)
        if parallel.expert_size == 1:
            if fsdp:
                wg_, wu_ = (jax.lax.all_gather(w, "data", axis=1, tiled=True) for w in (wg_, wu_))
                wd_ = jax.lax.all_gather(wd_, "data", axis=2, tiled=True)
            y_sorted_ = expert_dispatch.experts_swiglu(
                x_sorted_, group_sizes_, wg_, wu_, wd_, implementation=implementation)
        else:
            q = _round_rows(T_ * K, parallel.expert_size, parallel.capacity_factor)
            y_sorted_ = _exchange(x_sorted_, group_sizes_, wg_, wu_, wd_, q, fsdp,
                                  implementation)
        return expert_dispatch.unpermute_combine(y_sorted_, order_, w_, x_.dtype)

    # check_vma=False: the transpose then sums every input's per-device cotangent over the mesh
    # axes the input is replicated on (the expert weights over data and, outside pipeline
    # stages, pipeline), which is what the per-device weight gradients below need.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows, w_in_spec, w_in_spec, w_out_spec),
        out_specs=rows, check_vma=False)(
            x_td, expert_idx_tk, weights_tk, w_gate_edf, w_up_edf, w_down_efd)


def _round_rows(m: int, p: int, capacity_factor: float) -> int:
    """Q: rows per (source, destination) pair per round, a multiple of 8."""
    return max(8, math.ceil(capacity_factor * m / p / 8) * 8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _exchange(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp, impl):
    """Expert outputs [M_, D] (fp32) for rows sorted by global expert; rounds of all-to-all."""
    return _forward(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp, impl)


def _plan(group_sizes_e, n_shards):
    """Rows for each destination shard (contiguous in the sorted order) and the round count."""
    sizes_p = group_sizes_e.reshape(n_shards, -1).sum(axis=1)
    starts_p = jnp.cumsum(sizes_p) - sizes_p
    return sizes_p, starts_p


def _gather_weights(wg_, wu_, wd_, fsdp):
    if not fsdp:
        return wg_, wu_, wd_
    return (jax.lax.all_gather(wg_, "data", axis=1, tiled=True),
            jax.lax.all_gather(wu_, "data", axis=1, tiled=True),
            jax.lax.all_gather(wd_, "data", axis=2, tiled=True))


def _pack(values_m_, starts_p, sizes_p, r, q, fill):
    """Round r's [P, Q, ...] send buffer: rows start_p + r*Q ... of each destination p."""
    offset_q = r * q + jnp.arange(q)
    valid_pq = offset_q[None, :] < sizes_p[:, None]
    row_pq = jnp.clip(starts_p[:, None] + offset_q[None, :], 0, values_m_.shape[0] - 1)
    picked = values_m_[row_pq]
    mask = valid_pq.reshape(valid_pq.shape + (1,) * (picked.ndim - 2))
    return jnp.where(mask, picked, fill), row_pq, valid_pq


def _local_experts(recv_x_pqd, recv_e_pq, wg, wu, wd, impl):
    """SwiGLU of this shard's experts on the rows received this round: [P, Q, D] -> fp32."""
    P_, Q, D = recv_x_pqd.shape
    E_ = wg.shape[0]
    e_m = recv_e_pq.reshape(P_ * Q)
    order_m = jnp.argsort(e_m, stable=True)  # padding (index E_) sorts last
    group_sizes_e = jnp.bincount(e_m, length=E_).astype(jnp.int32)  # padding left out
    y_sorted = expert_dispatch.experts_swiglu(
        recv_x_pqd.reshape(P_ * Q, D)[order_m], group_sizes_e, wg, wu, wd, implementation=impl)
    return jnp.zeros_like(y_sorted).at[order_m].set(y_sorted).reshape(P_, Q, D)


def _rounds(group_sizes_e, q):
    n_shards = jax.lax.axis_size("expert")
    sizes_p, starts_p = _plan(group_sizes_e, n_shards)
    biggest = jax.lax.pmax(sizes_p.max(), BATCH_AXES)
    return sizes_p, starts_p, (biggest + q - 1) // q


def _local_expert_index(group_sizes_e, m, n_shards):
    """For each sorted row: its expert's index within the destination shard."""
    e_m = jnp.searchsorted(jnp.cumsum(group_sizes_e), jnp.arange(m), side="right")
    return (e_m % (group_sizes_e.shape[0] // n_shards)).astype(jnp.int32)


def _prepare(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp):
    """What the forward and the backward share: the weights (gathered under fsdp), each sorted
    row's expert index within its destination shard, and the rounds (sizes, starts, count)."""
    weights = _gather_weights(wg_, wu_, wd_, fsdp)
    local_e_m = _local_expert_index(group_sizes_e, x_sorted_md.shape[0],
                                    jax.lax.axis_size("expert"))
    return weights, local_e_m, _rounds(group_sizes_e, q)


def _send(x_sorted_md, local_e_m, rounds, r, q, n_local):
    """Round r's rows to their shards: (received rows [P, Q, D], their local experts [P, Q]
    (padding: n_local), and this round's source rows and validity, for `_send_back`)."""
    sizes_p, starts_p, _ = rounds
    send_x, row_pq, valid_pq = _pack(x_sorted_md, starts_p, sizes_p, r, q, 0)
    send_e, _, _ = _pack(local_e_m, starts_p, sizes_p, r, q, n_local)
    return (jax.lax.all_to_all(send_x, "expert", 0, 0),
            jax.lax.all_to_all(send_e, "expert", 0, 0), row_pq, valid_pq)


def _send_back(out_md, values_pqd, row_pq, valid_pq):
    """Return per-row results [P, Q, D] to the rows they came from, added into out_md."""
    back = jax.lax.all_to_all(values_pqd, "expert", 0, 0)
    back = jnp.where(valid_pq[..., None], back, 0.0).astype(out_md.dtype)
    return out_md.at[row_pq.reshape(-1)].add(back.reshape(-1, out_md.shape[1]))


def _forward(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp, impl):
    (wg, wu, wd), local_e_m, rounds = _prepare(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q,
                                               fsdp)

    def one_round(r, out_md):
        recv_x, recv_e, row_pq, valid_pq = _send(x_sorted_md, local_e_m, rounds, r, q,
                                                 wg_.shape[0])
        return _send_back(out_md, _local_experts(recv_x, recv_e, wg, wu, wd, impl), row_pq,
                          valid_pq)

    return jax.lax.fori_loop(0, rounds[2], one_round,
                             jnp.zeros(x_sorted_md.shape, jnp.float32))


def _fwd(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp, impl):
    out = _forward(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q, fsdp, impl)
    return out, (x_sorted_md, group_sizes_e, wg_, wu_, wd_)


def _bwd(q, fsdp, impl, residuals, d_out_md):
    x_sorted_md, group_sizes_e, wg_, wu_, wd_ = residuals
    (wg, wu, wd), local_e_m, rounds = _prepare(x_sorted_md, group_sizes_e, wg_, wu_, wd_, q,
                                               fsdp)
    sizes_p, starts_p, n_rounds = rounds

    def one_round(r, carry):
        dx_md, dwg, dwu, dwd = carry
        recv_x, recv_e, row_pq, valid_pq = _send(x_sorted_md, local_e_m, rounds, r, q,
                                                 wg_.shape[0])
        send_dy, _, _ = _pack(d_out_md, starts_p, sizes_p, r, q, 0)
        recv_dy = jax.lax.all_to_all(send_dy, "expert", 0, 0)
        _, vjp = jax.vjp(lambda x, a, b, c: _local_experts(x, recv_e, a, b, c, impl),
                         recv_x, wg, wu, wd)
        dx_pqd, dwg_r, dwu_r, dwd_r = vjp(recv_dy)
        dx_md = _send_back(dx_md, dx_pqd, row_pq, valid_pq)
        return dx_md, dwg + dwg_r, dwu + dwu_r, dwd + dwd_r

    zeros = (jnp.zeros_like(x_sorted_md), jnp.zeros_like(wg), jnp.zeros_like(wu),
             jnp.zeros_like(wd))
    dx_md, dwg, dwu, dwd = jax.lax.fori_loop(0, n_rounds, one_round, zeros)
    # Each data-parallel row saw different tokens. Sharded weights: reduce-scatter the gradient
    # back to this device's slice. Replicated weights: shard_map's transpose sums it.
    if fsdp:
        dwg = jax.lax.psum_scatter(dwg, "data", scatter_dimension=1, tiled=True)
        dwu = jax.lax.psum_scatter(dwu, "data", scatter_dimension=1, tiled=True)
        dwd = jax.lax.psum_scatter(dwd, "data", scatter_dimension=2, tiled=True)
    return dx_md, None, dwg, dwu, dwd


_exchange.defvjp(_fwd, _bwd)
