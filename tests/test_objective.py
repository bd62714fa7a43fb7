"""Objective pieces against direct formulas: chunked CE, masks, the balance loss, the bias rule,
and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np

import dsv3_jax
from dsv3_jax.model.moe import route
from dsv3_jax.train import objective, optim

TINY = dsv3_jax.preset("tiny")


def test_chunked_cross_entropy_equals_the_direct_sum():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 37, 8, 50  # T not a multiple of the chunk
    params = {"head": jnp.asarray(rng.standard_normal((D, V)), jnp.float32)}
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) > 0.3)
    logits = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(params["head"]))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0] * mask).sum()
    got = objective.cross_entropy_sum(params, h, targets, mask, chunk=8)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)  # fp32 vs fp64 reference


def test_fused_cross_entropy_gradients_equal_autodiff_of_the_direct_formula():
    """The fused loss makes its gradients in the forward pass; they must be what autodiff of
    the plain formula gives, for the head and for h, under a non-unit upstream cotangent."""
    rng = np.random.default_rng(2)
    B, T, D, V = 2, 21, 8, 40
    params = {"head": jnp.asarray(rng.standard_normal((D, V)), jnp.float32)}
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) > 0.3)

    def direct(p, x):
        logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", x, p["head"]), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)

    def fused(p, x):
        return objective.cross_entropy_sum(p, x, targets, mask, chunk=8)

    want = jax.grad(lambda p, x: 3.0 * direct(p, x), argnums=(0, 1))(params, h)
    got = jax.grad(lambda p, x: 3.0 * fused(p, x), argnums=(0, 1))(params, h)
    # fp32 both ways, different summation order: a few ulps of the largest entries.
    np.testing.assert_allclose(got[0]["head"], want[0]["head"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[1][~mask]).max()) == 0.0  # masked positions get no gradient


def test_targets_never_cross_documents():
    tokens = jnp.arange(10)[None]
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    _, _, targets, masks = objective.targets_and_masks(tokens, seg, depth=1)
    np.testing.assert_array_equal(targets[0][0], np.arange(1, 10))
    np.testing.assert_array_equal(masks[0][0], [1, 1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(masks[1][0], [1, 0, 0, 1, 1, 0, 0, 1, 0])


def test_balance_loss_is_the_paper_formula():
    rng = np.random.default_rng(1)
    E, K, T = 16, 4, 10
    counts = rng.multinomial(K * T, np.ones(E) / E, size=(3, 2)).astype(np.float32)  # [L,B,E]
    affinity = rng.dirichlet(np.ones(E), size=(3, 2)).astype(np.float32)
    stats = {"moe_layers": {"moe": {"expert_counts": counts, "mean_affinity": affinity}}}
    f = E / (K * T) * counts  # SPEC.md section 5
    want = (f * affinity).sum()
    got = objective.balance_loss_sum(TINY, stats)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_bias_update_rule():
    bias = {"moe": {"bias": jnp.zeros((2, 4))}}
    loads = {"moe": {"bias": jnp.asarray([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])}}
    new = objective.update_bias(bias, loads, 0.01)["moe"]["bias"]
    np.testing.assert_allclose(new, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]])
    same = objective.update_bias(bias, loads, 0.0)["moe"]["bias"]
    np.testing.assert_array_equal(same, 0.0)


def test_bias_update_balances_a_deliberately_unbalanced_router():
    """Tokens whose affinities strongly prefer experts 0-3: repeated route -> count -> update
    steps drive max/mean load toward 1; with gamma 0 nothing moves."""
    rng = np.random.default_rng(2)
    T, E = 512, TINY.n_routed_experts
    logits = rng.standard_normal((T, E)) * 0.5
    logits[:, :4] += 2.0
    scores = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))

    def imbalance_after(gamma, steps=200):
        bias = {"bias": jnp.zeros(E)}
        for _ in range(steps):
            idx, _ = route(scores, bias["bias"], TINY)
            load = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.float32)
            bias = objective.update_bias(bias, {"bias": load}, gamma)
        return float(load.max() / load.mean()), bias["bias"]

    start, _ = imbalance_after(0.0, steps=1)
    balanced, _ = imbalance_after(0.01)
    unchanged, bias0 = imbalance_after(0.0)
    assert start > 3.0 and balanced < 1.3
    assert unchanged == start and float(jnp.abs(bias0).max()) == 0.0


def test_schedules():
    lr = optim.piecewise_schedule(0.0, [("linear", 10, 1.0), ("constant", 5, 1.0),
                                        ("cosine", 10, 0.1), ("constant", 5, 0.05)])
    cosine_at_9 = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 9 / 10))
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 15, 20, 24, 25, 99)],
                               [0, 0.5, 1.0, 1.0, 0.55, cosine_at_9, 0.05, 0.05],
                               rtol=1e-5, atol=1e-7)
    lam = optim.token_schedule([(0, 0.3), (10e12, 0.1)])
    assert float(lam(9.9e12)) == np.float32(0.3) and float(lam(10e12)) == np.float32(0.1)
    params = dsv3_jax.init(TINY, jax.random.key(0))["params"]
    mask = optim.decay_mask(params)
    assert mask["moe_layers"]["attn"]["wq_a"] and not mask["final_norm"]["scale"]
    assert not mask["moe_layers"]["attn"]["kv_norm"]["scale"]


def test_one_pass_logsumexp_equals_the_two_pass_formula():
    # Ranges from tiny to huge logits; the finite floor must not leak into the result.
    for scale, shift in ((1e-3, 0.0), (1.0, 5.0), (30.0, -200.0), (1e30, 0.0)):
        x = jax.random.normal(jax.random.key(1), (3, 4, 1037), jnp.float32) * scale + shift
        got = jax.jit(objective.logsumexp_one_pass)(x)
        want = jax.nn.logsumexp(x, axis=-1)
        # fp32 rounding of a sum of 1037 terms, ordered differently: a few ulps.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
