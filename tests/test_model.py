"""Model behaviour on the tiny config: cache exactness, packing, gradients, shapes, errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.config import ModelConfig

TINY = dsv3_jax.preset("tiny")


@pytest.fixture(scope="module")
def variables():
    v = dsv3_jax.init(TINY, jax.random.key(0))
    # Non-zero biases of both signs, so selection and weights differ.
    v["router_bias"] = jax.tree.map(
        lambda b: 0.05 * jax.random.uniform(jax.random.key(1), b.shape, minval=-1, maxval=1),
        v["router_bias"])
    return v


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_absorbed_decode_equals_expanded_forward(variables):
    """Prefill 5 tokens (expanded form), then decode the rest 1 and 2 at a time (absorbed form
    over the latent cache): every step's logits equal the full forward's at those positions.
    fp32 throughout; the two forms differ in association order only (~1e-6), tolerance 1e-4."""
    T = 13
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, T))
    full = np.asarray(dsv3_jax.forward(TINY, variables, tokens).logits)
    cache = dsv3_jax.init_cache(TINY, batch=2, max_len=16)
    logits, cache = dsv3_jax.prefill(TINY, variables, tokens[:, :5], np.array([5, 5]), cache)
    assert rel_err(logits, full[:, :5]) < 1e-4
    pos = 5
    for step in (1, 2, 1, 2, 2):
        logits, cache = dsv3_jax.decode(TINY, variables, tokens[:, pos:pos + step], cache)
        assert rel_err(logits, full[:, pos:pos + step]) < 1e-4, pos
        pos += step
    assert pos == T and np.all(np.asarray(cache.lengths) == T)


def test_batched_prompts_of_different_lengths(variables):
    """Right-padded prompts of lengths 3 and 7 in one batch decode as each would alone."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, TINY.vocab_size, 9), rng.integers(0, TINY.vocab_size, 9)
    prompts = np.zeros((2, 7), np.int64)
    prompts[0, :3], prompts[1] = a[:3], b[:7]
    cache = dsv3_jax.init_cache(TINY, batch=2, max_len=12)
    _, cache = dsv3_jax.prefill(TINY, variables, prompts, np.array([3, 7]), cache)
    step, cache = dsv3_jax.decode(TINY, variables, np.array([[a[3]], [b[7]]]), cache)
    alone_a = dsv3_jax.forward(TINY, variables, a[None, :4]).logits[0, -1]
    alone_b = dsv3_jax.forward(TINY, variables, b[None, :8]).logits[0, -1]
    assert rel_err(step[0, 0], alone_a) < 1e-4
    assert rel_err(step[1, 0], alone_b) < 1e-4


def test_packed_documents_do_not_attend_across_segments(variables):
    """Two documents packed in one row with segment_ids give each document's own logits."""
    rng = np.random.default_rng(2)
    doc1, doc2 = rng.integers(0, TINY.vocab_size, 6), rng.integers(0, TINY.vocab_size, 9)
    packed = np.concatenate([doc1, doc2])[None]
    segments = np.array([[1] * 6 + [2] * 9])
    out = dsv3_jax.forward(TINY, variables, packed, segment_ids=segments)
    alone1 = dsv3_jax.forward(TINY, variables, doc1[None]).logits
    alone2 = dsv3_jax.forward(TINY, variables, doc2[None]).logits
    assert rel_err(out.logits[:, :6], alone1) < 1e-5
    assert rel_err(out.logits[:, 6:], alone2) < 1e-5
    # Without segment ids the second document sees the first: the check above can fail.
    unpacked = dsv3_jax.forward(TINY, variables, packed).logits
    assert rel_err(unpacked[:, 6:], alone2) > 1e-3


def test_padding_is_excluded_from_router_statistics(variables):
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 10))
    segments = np.ones((2, 10), np.int32)
    segments[1, 6:] = 0
    stats = dsv3_jax.forward(TINY, variables, tokens, segment_ids=segments).router_stats
    counts = stats["moe_layers"]["moe"]["expert_counts"]  # [layers, B, E]
    assert counts.shape == (TINY.n_moe_layers, 2, TINY.n_routed_experts)
    np.testing.assert_array_equal(counts.sum(-1)[:, 0], 10 * TINY.n_activated_experts)
    np.testing.assert_array_equal(counts.sum(-1)[:, 1], 6 * TINY.n_activated_experts)
    affinity = stats["moe_layers"]["moe"]["mean_affinity"]
    np.testing.assert_allclose(affinity.sum(-1), 1.0, rtol=1e-5)


def test_gradients_are_finite_and_the_bias_gets_none(variables):
    tokens = np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 12))

    def loss(v):
        out = dsv3_jax.forward(TINY, v, tokens)
        labels = jnp.asarray(tokens[:, 1:])
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        return -jnp.take_along_axis(logp, labels[..., None], -1).mean() + jnp.mean(
            out.mtp_logits[0] ** 2)

    grads = jax.jit(jax.grad(loss))(variables)
    for path, g in jax.tree_util.tree_leaves_with_path(grads["params"]):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    # Every trained weight moves the loss (no detached parameter) ...
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["params"]))
    # ... and the bias, used only to select experts, receives exactly zero.
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["router_bias"]))


def test_full_size_shapes_without_allocating():
    counts = dsv3_jax.param_counts(dsv3_jax.preset("deepseek_v3_671b"))
    assert abs(counts["main"] / 671e9 - 1) < 0.005
    assert abs(counts["total_released"] / 685e9 - 1) < 0.005
    assert abs(counts["active"] / 37e9 - 1) < 0.03
    axes = dsv3_jax.logical_axes(dsv3_jax.preset("deepseek_v3_671b"))
    assert axes["params"]["moe_layers"]["moe"]["w_gate"] == jax.sharding.PartitionSpec(
        "moe_layers", "experts", "embed", "expert_mlp")
    shapes = nn.meta.unbox(dsv3_jax.abstract_variables(dsv3_jax.preset("deepseek_v3_671b")))
    assert shapes["params"]["moe_layers"]["moe"]["w_gate"].shape == (58, 256, 7168, 2048)
    assert shapes["router_bias"]["mtp_0"]["block"]["moe"]["bias"].shape == (256,)


def test_presets_follow_the_official_configs():
    big = dsv3_jax.preset("deepseek_v3_671b")
    assert big.softmax_scale == pytest.approx(0.135234, abs=1e-6)  # SPEC.md section 2
    hf = big.to_hf()
    assert hf["rope_scaling"]["factor"] == 40 and hf["num_nextn_predict_layers"] == 1
    assert ModelConfig.from_hf(hf) == big
    moon = dsv3_jax.preset("moonlight_16b_a3b")
    assert ModelConfig.from_hf(moon.to_hf()) == moon
    assert moon.to_hf()["q_lora_rank"] is None
    assert abs(dsv3_jax.param_counts(moon)["main"] / 16e9 - 1) < 0.03
    small = dsv3_jax.param_counts(dsv3_jax.preset("small"))
    assert 1e9 < small["main"] < 3e9


@pytest.mark.parametrize("changes, message", [
    (dict(n_activated_experts=32), "n_activated_experts"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(n_routed_experts=18), "not divisible by n_expert_groups"),
    (dict(qk_rope_head_dim=7), "must be even"),
    (dict(n_dense_layers=4), "exceeds n_layers"),
    (dict(n_activated_experts=9), "kept groups"),
    (dict(n_expert_groups=16), "at least 2 experts"),
    (dict(score_func="softmax"), "sigmoid"),
    (dict(dim=0), "dim=0"),
    (dict(moe_impl="magic"), "moe_impl"),
])
def test_impossible_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_unknown_presets_and_fields_are_refused():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        dsv3_jax.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        dsv3_jax.preset("tiny", n_layer=2)


def test_tokens_outside_the_vocabulary_are_refused(variables):
    with pytest.raises(ValueError, match=r"token id 320 is outside the vocabulary \[0, 320\)"):
        dsv3_jax.forward(TINY, variables, np.array([[1, 320]]))
    with pytest.raises(ValueError, match="token id -1"):
        dsv3_jax.forward(TINY, variables, np.array([[-1, 3]]))


def test_hf_import_errors_name_the_tensor(variables):
    tensors = dsv3_jax.to_hf_state_dict(TINY, variables)
    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj"):
        dsv3_jax.from_hf_state_dict(TINY, missing)
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.o_proj.weight"] = np.zeros((64, 63), np.float32)
    with pytest.raises(ValueError, match=r"o_proj.weight: expected shape \(64, 64\), found"):
        dsv3_jax.from_hf_state_dict(TINY, wrong)
    extra = dict(tensors, **{"model.layers.9.mlp.gate.weight": np.zeros((16, 64))})
    with pytest.raises(ValueError, match=r"layers\.9\.mlp\.gate\.weight"):
        dsv3_jax.from_hf_state_dict(TINY, extra)


def test_config_fields_are_the_official_names():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    official = {"vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers",
                "n_heads", "n_routed_experts", "n_shared_experts", "n_activated_experts",
                "n_expert_groups", "n_limited_groups", "score_func", "route_scale",
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "original_seq_len", "rope_theta", "rope_factor", "beta_fast",
                "beta_slow", "mscale", "max_seq_len"}
    assert official <= names
