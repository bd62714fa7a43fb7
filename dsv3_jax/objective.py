"""The training objective and the auxiliary-loss-free bias update.

Legend: B sequences, T positions, D model dim, V vocab, E experts, K top-k.
Loss = CE(next token) + lambda * mean_k CE(MTP depth k) + alpha * sum_layers L_bal  (SPEC.md 5-6)
Every term is a sum over tokens (or sequences) divided by a count taken over the WHOLE batch,
so gradient accumulation over microbatches gives exactly the large-batch gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import head_logits


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


def cross_entropy_sum(params, h_btd, targets_bt, mask_bt, chunk: int = 512):
    """Sum over masked positions of -log p(target), chunked over T so the [B, T, V] fp32 logits
    never exist at once (each chunk is recomputed in the backward pass)."""
    B, T, D = h_btd.shape
    chunk = min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    h = jnp.pad(h_btd, [(0, 0), (0, pad), (0, 0)]).reshape(B, n, chunk, D).swapaxes(0, 1)
    tg = jnp.pad(targets_bt, [(0, 0), (0, pad)]).reshape(B, n, chunk).swapaxes(0, 1)
    mk = jnp.pad(mask_bt, [(0, 0), (0, pad)]).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        h_c, t_c, m_c = xs
        logits_bcv = head_logits(params, h_c)
        logz = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked = jnp.take_along_axis(logits_bcv, t_c[..., None], axis=-1)[..., 0]
        return carry + jnp.sum(jnp.where(m_c, logz - picked, 0.0)), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (h, tg, mk))
    return total


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
