"""The GRPO objective (DeepSeekMath 4.1.2, DeepSeek-R1 2.2.1) on per-token log-probabilities.

Legend: B sequences (groups of G consecutive rows, one group per prompt), T positions.

For sequence i with group-normalized advantage A_i and each of its response tokens t:
  r_it   = exp(logp_it - old_it)                                 ratio to the rollout policy
  pg_it  = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)
  kl_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        k3 estimator of KL(pi || ref)
  loss_it = pg_it + beta kl_it
aggregated (`aggregation`) either
  "token":    sum_it loss_it / sum_it 1          every response token of the batch weighs the
                                                 same (DAPO; long answers count more)
  "sequence": mean_i (sum_t loss_it / |o_i|)     each sequence weighs the same, its tokens
                                                 averaged (the GRPO paper's 1/G sum 1/|o_i|)
Advantages: A_i = (R_i - mean_group R) / (std_group R + 1e-4), or with scale_by_std=False
R_i - mean_group R (Dr. GRPO: dividing by the std up-weights groups that are nearly all right or
all wrong). std is the population std (ddof 0) over the group's valid rewards; a sample whose
reward is not finite (a reward function raised, or returned NaN/inf) is left out of its group's
statistics and gets advantage 0 and no loss tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("token", "sequence")
STD_EPS = 1e-4


def group_advantages(rewards_b: np.ndarray, group_size: int, scale_by_std: bool = True
                     ) -> np.ndarray:
    """Advantages [B] float32 of rewards [B] laid out as B / group_size consecutive groups;
    non-finite rewards get 0 and are left out of their group's mean and std."""
    rewards_gk = np.asarray(rewards_b, np.float64).reshape(-1, group_size)
    valid_gk = np.isfinite(rewards_gk)
    n_g = np.maximum(valid_gk.sum(-1, keepdims=True), 1)
    r_gk = np.where(valid_gk, rewards_gk, 0.0)
    mean_g = r_gk.sum(-1, keepdims=True) / n_g
    centered_gk = np.where(valid_gk, r_gk - mean_g, 0.0)
    if scale_by_std:
        std_g = np.sqrt((centered_gk ** 2).sum(-1, keepdims=True) / n_g)
        centered_gk = centered_gk / (std_g + STD_EPS)
    return centered_gk.reshape(-1).astype(np.float32)


def grpo_loss(logp_bt: jax.Array, old_bt: jax.Array, ref_bt: jax.Array | None,
              advantages_b: jax.Array, mask_bt: jax.Array, *, epsilon: float,
              epsilon_high: float, beta: float, aggregation: str
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, stats): the objective above, and over the masked tokens the mean k3 KL, the
    fraction of tokens whose ratio was clipped, and the largest |ratio - 1|. ref_bt may be None
    when beta is 0. mask_bt marks response tokens (1) of sequences that take part."""
    sums = grpo_sums(logp_bt, old_bt, ref_bt, advantages_b, mask_bt, epsilon=epsilon,
                     epsilon_high=epsilon_high, beta=beta, aggregation=aggregation)
    return normalized(sums, aggregation, sums["tokens"], sums["sequences"])


def grpo_sums(logp_bt: jax.Array, old_bt: jax.Array, ref_bt: jax.Array | None,
              advantages_b: jax.Array, mask_bt: jax.Array, *, epsilon: float,
              epsilon_high: float, beta: float, aggregation: str) -> dict[str, jax.Array]:
    """The sums behind `grpo_loss` over these rows (the objective's numerator, KL, clipped
    tokens, token and sequence counts) and the largest |ratio - 1|: microbatches' sums add up
    to the whole batch's (`normalized` then divides by the whole batch's counts)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    mask_bt = mask_bt.astype(jnp.float32)
    adv_b1 = advantages_b[:, None]
    ratio_bt = jnp.exp(logp_bt - old_bt)
    clipped_bt = jnp.clip(ratio_bt, 1 - epsilon, 1 + epsilon_high)
    pg_bt = -jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
    if ref_bt is None:
        kl_bt = jnp.zeros_like(logp_bt)
    else:
        log_ref_over_pi_bt = ref_bt - logp_bt
        kl_bt = jnp.exp(log_ref_over_pi_bt) - log_ref_over_pi_bt - 1
    masked_bt = (pg_bt + beta * kl_bt) * mask_bt
    lengths_b = mask_bt.sum(-1)
    if aggregation == "token":
        objective = jnp.sum(masked_bt)
    else:
        objective = jnp.sum(masked_bt.sum(-1) / jnp.maximum(lengths_b, 1.0))
    # The clipped branch is the one the min picks, where it differs from the unclipped one.
    was_clipped_bt = ((adv_b1 > 0) & (ratio_bt > 1 + epsilon_high)) | (
        (adv_b1 < 0) & (ratio_bt < 1 - epsilon))
    return {
        "objective": objective, "kl": jnp.sum(kl_bt * mask_bt),
        "clipped": jnp.sum(was_clipped_bt * mask_bt), "tokens": jnp.sum(lengths_b),
        "sequences": jnp.sum(lengths_b > 0).astype(jnp.float32),
        "ratio_max_deviation": jnp.max(jnp.abs(ratio_bt - 1) * mask_bt),
    }


def normalized(sums: dict[str, jax.Array], aggregation: str, tokens: jax.Array,
               sequences: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, stats) from `grpo_sums` and the whole batch's token and sequence counts."""
    tokens, sequences = jnp.maximum(tokens, 1.0), jnp.maximum(sequences, 1.0)
    loss = sums["objective"] / (tokens if aggregation == "token" else sequences)
    return loss, {"kl": sums["kl"] / tokens, "clip_fraction": sums["clipped"] / tokens,
                  "ratio_max_deviation": sums["ratio_max_deviation"]}
