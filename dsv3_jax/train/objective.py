"""The training objective and the auxiliary-loss-free bias update.

Legend: B sequences, T positions, D model dim, V vocab, E experts, K top-k.
Loss = CE(next token) + lambda * mean_k CE(MTP depth k) + alpha * sum_layers L_bal  (SPEC.md 5-6)
Every term is a sum over tokens (or sequences) divided by a count taken over the WHOLE batch,
so gradient accumulation over microbatches gives exactly the large-batch gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.transformer import head_logits


def targets_and_masks(tokens_bs, segment_ids_bs, depth: int):
    """From windows of T+1 tokens (S = T+1): inputs [B,T], and for d = 0..depth the targets
    t_{i+d+1} and masks [B,T] (target in the same document as position i; padding id 0 off)."""
    T = tokens_bs.shape[1] - 1
    inputs_bt, seg_bt = tokens_bs[:, :T], segment_ids_bs[:, :T]
    targets, masks = [], []
    for d in range(depth + 1):
        shift = d + 1
        tgt = jnp.pad(tokens_bs[:, shift:], [(0, 0), (0, shift - 1)])[:, :T]
        tseg = jnp.pad(segment_ids_bs[:, shift:], [(0, 0), (0, shift - 1)],
                       constant_values=-1)[:, :T]
        targets.append(tgt)
        masks.append((tseg == seg_bt) & (seg_bt != 0))
    return inputs_bt, seg_bt, targets, masks


LOSS_CHUNK = 512  # positions per chunk of the fused cross-entropy (logits never whole)


def cross_entropy_sum(params, h_btd, targets_bt, mask_bt, chunk: int = LOSS_CHUNK,
                      parallel=None):
    """Sum over masked positions of -log p(target) under the output head.

    Fused and chunked over T: the [B, T, V] fp32 logits never exist at once, and when
    differentiated the forward pass of each chunk also makes its gradients (softmax - one-hot
    times the head, both ways), so the backward pass only scales them: the head's GEMMs run 3
    times instead of 4 (forward, recompute, two gradients), and no [B, T, V] value is kept.
    With a mesh it runs per device over the batch shards (`parallel.batch_axes`), so the head's
    weight gradient is summed over devices once per call, not once per chunk.
    """
    ce = functools.partial(_fused_ce_sum, chunk=chunk)
    if parallel is None:
        return ce(params["head"], h_btd, targets_bt, mask_bt)
    rows, replicated = parallel.spec("batch"), parallel.spec()

    def local(w_dv, h_, t_, m_):
        return ce(w_dv, h_, t_, m_)[None]

    # check_vma=False: the transpose sums the replicated head's per-device cotangents over the
    # batch axes (once, here), as in dsv3_jax.parallel.expert_parallel.
    per_device = jax.shard_map(local, mesh=parallel.mesh,
                               in_specs=(replicated, rows, rows, rows), out_specs=rows,
                               check_vma=False)(
        params["head"], h_btd, targets_bt, mask_bt)
    return jnp.sum(per_device)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce_sum(w_dv, h_btd, targets_bt, mask_bt, chunk):
    return _ce_chunks(w_dv, h_btd, targets_bt, mask_bt, chunk, with_grads=False)[0]


def _fused_ce_fwd(w_dv, h_btd, targets_bt, mask_bt, chunk):
    total, dw_dv, dh_btd = _ce_chunks(w_dv, h_btd, targets_bt, mask_bt, chunk, with_grads=True)
    return total, (dw_dv, dh_btd, jnp.zeros((0,), h_btd.dtype))  # the last: h's dtype


def _fused_ce_bwd(chunk, residuals, ct):
    dw_dv, dh_btd, like_h = residuals
    return (ct * dw_dv, (ct * dh_btd).astype(like_h.dtype), None, None)


_fused_ce_sum.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def split_positions(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], T zero-padded to n whole chunks (the caller masks or
    drops the padded positions): the chunks a scan over positions takes."""
    B, T = x.shape[:2]
    n = -(-T // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)


def _ce_chunks(w_dv, h_btd, targets_bt, mask_bt, chunk: int, with_grads: bool):
    """(sum of -log p, and with_grads: d/dW fp32 [D, V], d/dh fp32 [B, T, D]), chunk by chunk.
    GEMMs in h's dtype with fp32 accumulation and output, as `head_logits`."""
    B, T, D = h_btd.shape
    V = w_dv.shape[1]
    chunk = min(chunk, T)
    n = -(-T // chunk)

    w = w_dv.astype(h_btd.dtype)

    def one(carry, xs):
        total, dw = carry
        h_c, t_c, m_c = xs
        logits_bcv = head_logits({"head": w}, h_c)
        logz_bc = logsumexp_one_pass(logits_bcv)
        picked_bc = jnp.take_along_axis(logits_bcv, t_c[..., None], axis=-1)[..., 0]
        total = total + jnp.sum(jnp.where(m_c, logz_bc - picked_bc, 0.0))
        if not with_grads:
            return (total, dw), None
        # d(logz - picked)/dlogits = softmax - one_hot(target), on masked positions only.
        one_hot = jnp.arange(V) == t_c[..., None]
        dlogits = jnp.where(m_c[..., None], jnp.exp(logits_bcv - logz_bc[..., None])
                            - one_hot, 0.0).astype(h_btd.dtype)
        dh_c = jnp.einsum("BCV,DV->BCD", dlogits, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("BCD,BCV->DV", h_c, dlogits, preferred_element_type=jnp.float32)
        return (total, dw), dh_c

    zero = jnp.zeros((), jnp.float32)
    dw0 = jnp.zeros((D, V), jnp.float32) if with_grads else zero
    xs = tuple(split_positions(x, chunk) for x in (h_btd, targets_bt, mask_bt))  # pads masked
    (total, dw), dh = jax.lax.scan(one, (zero, dw0), xs)
    if not with_grads:
        return total, None, None
    dh_btd = dh.swapaxes(0, 1).reshape(B, n * chunk, D)[:, :T]
    return total, dw, dh_btd


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """log(sum(exp(x))) over the last axis, reading x once: an online (max, scaled sum)
    reduction (as in flash attention) instead of a max pass and then a sum pass. x is the
    [.., V] fp32 logits, the step's largest array, so each pass over it costs milliseconds."""
    # A finite floor rather than -inf: XLA may combine two initial values, and -inf - -inf
    # would make a NaN.
    floor = jnp.asarray(jnp.finfo(x.dtype).min, x.dtype)

    def combine(a, b):
        (ma, sa), (mb, sb) = a, b
        m = jnp.maximum(ma, mb)
        scale = jnp.exp(-jnp.abs(ma - mb))  # exp(min - max): the smaller side's factor
        return m, jnp.where(ma >= mb, sa + sb * scale, sb + sa * scale)

    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (floor, jnp.zeros((), x.dtype)), combine,
                          (x.ndim - 1,))
    return m + jnp.log(s)


def balance_loss_sum(cfg: ModelConfig, router_stats: dict[str, Any]) -> jax.Array:
    """Sum over sequences and MoE layers of sum_i f_i P_i (SPEC.md section 5), where per
    sequence f_i = E / (K * T_valid) * count_i = E * count_i / sum_j count_j and P_i is the
    mean normalized affinity over the sequence's valid tokens."""
    total = jnp.zeros((), jnp.float32)
    for counts, affinity in _layer_stats(router_stats):  # [..., B, E]
        routed = jnp.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
        total += jnp.sum(cfg.n_routed_experts * counts / routed * affinity)
    return total


def _layer_stats(router_stats: dict[str, Any]):
    """(expert_counts, mean_affinity) pairs of every MoE module in the sown statistics."""
    if "expert_counts" in router_stats:
        yield router_stats["expert_counts"], router_stats["mean_affinity"]
        return
    for value in router_stats.values():
        if isinstance(value, dict):
            yield from _layer_stats(value)


def expert_loads(router_stats: dict[str, Any]) -> dict[str, Any]:
    """Tree like router_bias, leaves [..., E]: tokens routed to each expert over the batch."""
    if "expert_counts" in router_stats:
        return {"bias": router_stats["expert_counts"].sum(axis=-2)}
    return {k: expert_loads(v) for k, v in router_stats.items() if isinstance(v, dict)}


def update_bias(router_bias: dict[str, Any], loads: dict[str, Any], rate) -> dict[str, Any]:
    """b_i += rate * sign(mean_load - load_i) per MoE layer (paper 2.1.2), from the loads of the
    whole global batch. Underloaded experts gain bias, overloaded ones lose it."""
    def step(b, load):
        mean = jnp.mean(load, axis=-1, keepdims=True)
        return b + rate * jnp.sign(mean - load).astype(b.dtype)

    return jax.tree.map(step, router_bias, loads)
