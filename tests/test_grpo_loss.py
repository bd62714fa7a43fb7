"""The GRPO objective against an independent reference: the formulas written out per token in
numpy (value) and their derivatives worked by hand (gradient), on fixed log-probs, rewards and
masks; group advantages (with and without the std, with failed rewards) the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.rl import loss as grpo

B, T, G = 6, 7, 3
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.05


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    old = rng.normal(-2.0, 0.5, (B, T))
    # Ratios spread over [0.6, 1.5] so tokens fall on both sides of both clip edges.
    logp = old + rng.uniform(np.log(0.6), np.log(1.5), (B, T))
    ref = old + rng.normal(0, 0.3, (B, T))
    mask = rng.random((B, T)) < 0.7
    mask[4] = False  # a sequence with no response token (a failed reward)
    adv = rng.normal(0, 1, B)
    adv[4] = 0.0
    return logp, old, ref, adv, mask


def reference_per_token(logp, old, ref, a):
    """One token's loss term and whether its ratio was clipped, from the formulas."""
    ratio = np.exp(logp - old)
    clipped = min(max(ratio, 1 - EPS), 1 + EPS_HIGH)
    pg = -min(ratio * a, clipped * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    return pg + BETA * kl, kl, clipped * a < ratio * a


def reference_loss(logp, old, ref, adv, mask, aggregation):
    terms = [[reference_per_token(logp[i, t], old[i, t], ref[i, t], adv[i])[0]
              for t in range(T) if mask[i, t]] for i in range(B)]
    if aggregation == "token":
        flat = [x for seq in terms for x in seq]
        return sum(flat) / len(flat)
    per_seq = [sum(seq) / len(seq) for seq in terms if seq]
    return sum(per_seq) / len(per_seq)


def reference_grad(logp, old, ref, adv, mask, aggregation):
    """d loss / d logp: the unclipped branch gives -ratio * A (the clipped one is constant in
    logp), k3 gives beta * (1 - exp(ref - logp)); scaled by the token's aggregation weight."""
    grad = np.zeros((B, T))
    lengths = mask.sum(1)
    tokens, sequences = mask.sum(), (lengths > 0).sum()
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            ratio = np.exp(logp[i, t] - old[i, t])
            _, _, was_clipped = reference_per_token(logp[i, t], old[i, t], ref[i, t], adv[i])
            d = (0.0 if was_clipped else -ratio * adv[i]) + BETA * (1 - np.exp(ref[i, t]
                                                                              - logp[i, t]))
            weight = 1 / tokens if aggregation == "token" else 1 / (lengths[i] * sequences)
            grad[i, t] = d * weight
    return grad


def loss_fn(aggregation, old, ref, adv, mask):
    def f(logp):
        return grpo.grpo_loss(logp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                              jnp.asarray(mask), epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA,
                              aggregation=aggregation)
    return f


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_loss_and_gradient_equal_the_reference(case, aggregation):
    logp, old, ref, adv, mask = case
    f = loss_fn(aggregation, old, ref, adv, mask)
    (value, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    # float32 against float64 over a few dozen terms of size ~1: relative 1e-5.
    np.testing.assert_allclose(float(value), reference_loss(logp, old, ref, adv, mask,
                                                            aggregation), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), reference_grad(logp, old, ref, adv, mask,
                                                                aggregation),
                               rtol=1e-4, atol=1e-7)
    kl = [reference_per_token(logp[i, t], old[i, t], ref[i, t], adv[i])[1]
          for i in range(B) for t in range(T) if mask[i, t]]
    clipped = [reference_per_token(logp[i, t], old[i, t], ref[i, t], adv[i])[2]
               for i in range(B) for t in range(T) if mask[i, t]]
    np.testing.assert_allclose(float(stats["kl"]), np.mean(kl), rtol=1e-5)
    np.testing.assert_allclose(float(stats["clip_fraction"]), np.mean(clipped), rtol=1e-6)
    assert 0 < np.mean(clipped) < 0.5  # the case really exercises both branches
    # ... at both edges: clipped above 1 + eps_high (A > 0) and below 1 - eps (A < 0).
    ratio = np.exp(logp - old)
    clipped_bt = np.array([[reference_per_token(logp[i, t], old[i, t], ref[i, t], adv[i])[2]
                            for t in range(T)] for i in range(B)]) & mask
    assert np.any(clipped_bt & (ratio > 1 + EPS_HIGH) & (adv[:, None] > 0))
    assert np.any(clipped_bt & (ratio < 1 - EPS) & (adv[:, None] < 0))


def test_the_two_aggregations_differ_when_lengths_differ(case):
    logp, old, ref, adv, mask = case
    values = [float(loss_fn(a, old, ref, adv, mask)(jnp.asarray(logp, jnp.float32))[0])
              for a in grpo.AGGREGATIONS]
    assert abs(values[0] - values[1]) > 1e-3, values


def test_ratio_one_gives_minus_the_mean_advantage_and_k3_is_zero_at_the_reference(case):
    _, old, _, adv, mask = case
    value, stats = grpo.grpo_loss(jnp.asarray(old), jnp.asarray(old), jnp.asarray(old),
                                  jnp.asarray(adv), jnp.asarray(mask), epsilon=EPS,
                                  epsilon_high=EPS_HIGH, beta=BETA, aggregation="token")
    expected = -np.sum(adv[:, None] * mask) / mask.sum()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert float(stats["kl"]) == 0 and float(stats["clip_fraction"]) == 0
    assert float(stats["ratio_max_deviation"]) == 0


def test_masked_tokens_get_no_gradient(case):
    logp, old, ref, adv, mask = case
    grad = jax.grad(lambda x: loss_fn("token", old, ref, adv, mask)(x)[0])(
        jnp.asarray(logp, jnp.float32))
    assert np.all(np.asarray(grad)[~mask] == 0)


def reference_advantages(rewards, scale_by_std):
    out = []
    for g in range(len(rewards) // G):
        group = rewards[g * G:(g + 1) * G]
        good = [r for r in group if np.isfinite(r)]
        mean = sum(good) / len(good)
        std = (sum((r - mean) ** 2 for r in good) / len(good)) ** 0.5
        for r in group:
            if not np.isfinite(r):
                out.append(0.0)
            else:
                out.append((r - mean) / (std + grpo.STD_EPS) if scale_by_std else r - mean)
    return np.array(out)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_equal_the_reference(scale_by_std):
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, np.nan, 1.0, 0.0, np.inf, 3.0, -1.0])
    got = grpo.group_advantages(rewards, G, scale_by_std)
    np.testing.assert_allclose(got, reference_advantages(rewards, scale_by_std), rtol=1e-6,
                               atol=1e-7)
    assert np.all(got[3:6] == 0)  # an all-equal group teaches nothing
    assert got[6] == 0 and got[9] == 0  # failed rewards get no advantage
    if scale_by_std:
        assert abs(got[0]) > 1  # normalized: the scale of a std, not of the reward
    else:
        np.testing.assert_allclose(got[:3], [0.5, -0.5, 0.0], atol=1e-7)


def test_chunked_token_logprobs_equal_the_whole_softmax_with_their_gradients():
    from dsv3_jax.rl.step import token_logprobs

    rng = np.random.default_rng(1)
    N, T_, D, V = 3, 11, 8, 20
    h = jnp.asarray(rng.normal(size=(N, T_, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (N, T_)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(N, T_)), jnp.float32)

    def whole(w, h):
        logp = jax.nn.log_softmax(jnp.einsum("NTD,DV->NTV", h, w) / 0.7, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], logp

    def chunked(w, h):  # 12 tokens per chunk: 4 positions of 3 rows, the last chunk padded
        return token_logprobs({"head": w}, h, targets, 0.7, chunk_tokens=12)

    picked, logp = whole(w, h)
    got, entropy = chunked(w, h)
    # Same fp32 operations in another grouping: 1e-5.
    np.testing.assert_allclose(got, picked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(logp) * logp, -1), rtol=1e-5,
                               atol=1e-5)
    g_whole = jax.grad(lambda w, h: jnp.sum(whole(w, h)[0] * weights), argnums=(0, 1))(w, h)
    g_chunk = jax.grad(lambda w, h: jnp.sum(chunked(w, h)[0] * weights), argnums=(0, 1))(w, h)
    for a, b in zip(g_chunk, g_whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
