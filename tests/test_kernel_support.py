"""What each Pallas kernel claims to support, checked against Mosaic GPU's own lowering for CUDA
(layout inference, TMA tiling, the shared-memory budget; no GPU needed), and what `auto` picks.

At the edge of every claim: the largest supported shapes lower, the first unsupported ones are
refused by our predicate AND fail in Mosaic when the predicate is bypassed (so the predicate is
neither too loose nor too strict there), and an explicit "pallas" on them is refused with a clear
message naming the dim. Whole models lower for CUDA through `auto` for every preset.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import dsv3_jax
from dsv3_jax.config import PRESETS
from dsv3_jax.model import implementations
from dsv3_jax.model.transformer import Transformer
from pallas_kernels import (
    _mla_attention_mgpu,
    _mla_decode_mgpu,
    dispatch_gpu,
    expert_dispatch,
    grouped_matmul,
    mla_attention,
    mla_decode,
)

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def _lowers(fn, *args) -> str:
    """"ok" if fn lowers for CUDA, else the compiler's error."""
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# MLA training attention
# ---------------------------------------------------------------------------------------------
def _attention_args(Hn, Hr, Hv, N=2, T=256):
    return (S((1, T, N, Hn), BF16), S((1, T, N, Hr), BF16), S((1, T, N, Hn), BF16),
            S((1, T, Hr), BF16), S((1, T, N, Hv), BF16), S((1, T), jnp.int32))


def _attention_grad(implementation):
    def loss(*a):
        o = mla_attention.mla_attention(*a, scale=0.1, implementation=implementation)
        return o.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=range(5))


def _raw_attention_grad(*args):
    """The three Mosaic GPU kernels without the wrapper's check or padding."""
    q_nope, q_rope, k_nope, k_rope, v, seg = args
    cfg = _mla_attention_mgpu.Config()
    bounds = mla_attention.segment_bounds(seg)
    o, lse = _mla_attention_mgpu.forward(q_nope, q_rope, k_nope, k_rope, v, seg, bounds,
                                         scale=0.1, config=cfg, has_segments=True,
                                         interpret=False)
    delta = jnp.zeros(lse.shape, jnp.float32)
    return _mla_attention_mgpu.backward(q_nope, q_rope, k_nope, k_rope, v, o, lse, delta, seg,
                                        bounds, scale=0.1, config=cfg, has_segments=True,
                                        interpret=False)


# Supported: tiny's dims (padded to 64), odd small dims, the largest that fit (DeepSeek-V3's).
@pytest.mark.parametrize("dims", [(16, 8, 16), (8, 8, 8), (24, 40, 72), (64, 128, 64),
                                  (128, 64, 128)])
def test_supported_attention_dims_lower(dims):
    assert mla_attention.pallas_unsupported("gpu", *dims) is None
    assert _lowers(_attention_grad("pallas_gpu"), *_attention_args(*dims)) == "ok"


# The first unsupported: one more 64-column block on any head dim past DeepSeek-V3's.
@pytest.mark.parametrize("dims", [(128, 64, 192), (128, 128, 128), (192, 64, 128),
                                  (64, 64, 192)])
def test_first_unsupported_attention_dims_are_refused_and_really_do_not_fit(dims):
    reason = mla_attention.pallas_unsupported("gpu", *dims)
    assert reason is not None and "shared memory" in reason and "/".join(map(str, dims)) in reason
    raw = _lowers(_raw_attention_grad, *_attention_args(*dims))
    assert "exceeds available shared memory" in raw, raw
    with pytest.raises(ValueError, match="implementation 'pallas' on gpu: head dims"):
        jax.jit(_attention_grad("pallas_gpu")).trace(*_attention_args(*dims))


def test_unpadded_dims_fail_in_mosaic_without_the_wrapper():
    """The padding is what makes tiny's dims run: the raw kernels reject them."""
    raw = _lowers(_raw_attention_grad, *_attention_args(16, 8, 16))
    assert raw != "ok"
    assert "not a multiple of 64" in _mla_attention_mgpu.unsupported(16, 8, 16)


# ---------------------------------------------------------------------------------------------
# Absorbed decode
# ---------------------------------------------------------------------------------------------
def _decode_args(R, Hr, N, Tq, B=2, L=512):
    return (S((B, Tq, N, R), BF16), S((B, Tq, N, Hr), BF16), S((B, L, R + Hr), BF16),
            S((B,), jnp.int32))


def _raw_decode(R, Hr, N, Tq):
    """Mosaic lowering of the kernels with the predicate bypassed."""
    def fn(*a):
        original = _mla_decode_mgpu.unsupported
        _mla_decode_mgpu.unsupported = lambda *_, **__: None
        try:
            return _mla_decode_mgpu.decode(*a, scale=0.1)
        finally:
            _mla_decode_mgpu.unsupported = original
    return _lowers(fn, *_decode_args(R, Hr, N, Tq))


@pytest.mark.parametrize("R, Hr, N, Tq", [(128, 64, 1, 1), (512, 64, 128, 2), (512, 64, 16, 2),
                                          (640, 64, 16, 1), (512, 128, 16, 1)])
def test_supported_decode_shapes_lower(R, Hr, N, Tq):
    assert mla_decode.pallas_unsupported("gpu", R, Hr, N, Tq) is None
    fn = lambda *a: mla_decode.mla_decode(*a, scale=0.1,  # noqa: E731
                                          implementation="pallas_gpu")
    assert _lowers(fn, *_decode_args(R, Hr, N, Tq)) == "ok"


# Each one past a supported neighbour above: more rows, a wider rope dim or latent.
@pytest.mark.parametrize("R, Hr, N, Tq", [(512, 128, 16, 2), (640, 64, 16, 2), (512, 128, 33, 1),
                                          (768, 64, 1, 1)])
def test_first_unsupported_decode_shapes_are_refused_and_do_not_fit(R, Hr, N, Tq):
    reason = mla_decode.pallas_unsupported("gpu", R, Hr, N, Tq)
    assert reason is not None and f"kv_lora_rank={R}" in reason and "shared memory" in reason
    assert "exceeds available shared memory" in _raw_decode(R, Hr, N, Tq)
    with pytest.raises(ValueError, match="mla_decode implementation 'pallas' on gpu"):
        jax.jit(lambda *a: mla_decode.mla_decode(*a, scale=0.1,
                                                 implementation="pallas_gpu")
                ).trace(*_decode_args(R, Hr, N, Tq))


@pytest.mark.parametrize("R, Hr, dim", [(32, 64, "kv_lora_rank=32"), (192, 64, "kv_lora_rank=192"),
                                        (128, 8, "qk_rope_head_dim=8"),
                                        (128, 32, "qk_rope_head_dim=32")])
def test_decode_tile_multiples_are_refused_and_fail_in_mosaic(R, Hr, dim):
    reason = mla_decode.pallas_unsupported("gpu", R, Hr, 4, 1)
    assert reason is not None and dim in reason
    assert _raw_decode(R, Hr, 4, 1) != "ok"


# ---------------------------------------------------------------------------------------------
# Expert dispatch: the row kernels (the grouped matmuls pad any shape; see test_grouped_matmul)
# ---------------------------------------------------------------------------------------------
# Each with the view the kernels used to take for it (R < 8 rows of C, chunks of R * C values).
@pytest.mark.parametrize("D, view", [(64, (1, 64)), (96, (3, 32)), (160, (5, 32)), (192, (3, 64))])
def test_dims_without_a_row_view_fail_in_mosaic_and_fall_back(D, view):
    assert dispatch_gpu.row_view(D) is None
    assert "no R x C row view" in dispatch_gpu.rows_unsupported(D, 4)
    original = dispatch_gpu.row_view
    dispatch_gpu.row_view = lambda _: view
    try:
        raw = _lowers(lambda x, s: dispatch_gpu.gather_rows(x, s), S((64, D), BF16),
                      S((256,), jnp.int32))
    finally:
        dispatch_gpu.row_view = original
    assert "layout" in raw.lower(), raw


@pytest.mark.parametrize("D", [128, 384, 1152, 2560, 7168])
def test_dims_with_a_row_view_lower(D):
    assert dispatch_gpu.rows_unsupported(D, 8) is None
    assert _lowers(lambda x, s: dispatch_gpu.gather_rows(x, s), S((64, D), BF16),
                   S((256,), jnp.int32)) == "ok"


def test_combine_shared_memory_edge():
    """fp32 rows of 2048: 8 per token fit a CTA's SMEM, 10 do not (and Mosaic agrees)."""
    def combine(K):
        return _lowers(lambda y, i, w: dispatch_gpu.combine_rows(y, i, w, BF16),
                       S((64 * K, 2048), jnp.float32), S((64, K), jnp.int32),
                       S((64, K), jnp.float32))
    assert dispatch_gpu.rows_unsupported(2048, 8, 4) is None and combine(8) == "ok"
    assert "shared memory" in dispatch_gpu.rows_unsupported(2048, 10, 4)
    assert "exceeds available shared memory" in combine(10)


@pytest.mark.parametrize("D, F, E, K", [(64, 32, 16, 4), (48, 16, 1, 1), (2048, 1024, 64, 10)])
def test_routed_experts_lower_where_row_kernels_cannot_run(D, F, E, K):
    """The whole Pallas block lowers for any dims: rows without kernels take XLA's gather."""
    assert expert_dispatch.pallas_unsupported("gpu", D, F, E, K) is None
    args = (S((256, D), BF16), S((256, K), jnp.int32), S((256, K), jnp.float32),
            S((E, D, F), BF16), S((E, D, F), BF16), S((E, F, D), BF16))

    def loss(*a):
        y = expert_dispatch.routed_experts(*a, implementation="pallas_gpu")
        return y.astype(jnp.float32).sum()
    assert _lowers(jax.grad(loss, argnums=(0, 2, 3, 4, 5)), *args) == "ok"


# ---------------------------------------------------------------------------------------------
# What auto picks, and what an explicit "pallas" refuses
# ---------------------------------------------------------------------------------------------
def _sweep():
    base = PRESETS["tiny"]
    for Hn, Hr, Hv in [(8, 8, 8), (16, 8, 16), (64, 64, 64), (128, 64, 128), (128, 64, 192),
                       (192, 64, 128), (128, 128, 128), (96, 32, 160)]:
        yield base.replace(qk_nope_head_dim=Hn, qk_rope_head_dim=Hr, v_head_dim=Hv)
    for R in (32, 128, 512, 640, 1024):
        yield base.replace(kv_lora_rank=R)
    for dim, F, E, K in [(32, 16, 1, 1), (64, 32, 16, 4), (96, 48, 8, 2), (7168, 2048, 256, 8),
                         (2048, 1408, 64, 6)]:
        yield base.replace(dim=dim, moe_inter_dim=F, n_routed_experts=E, n_activated_experts=K,
                           n_expert_groups=1, n_limited_groups=1)


@pytest.mark.parametrize("cfg", [*PRESETS.values(), *_sweep()])
def test_auto_picks_a_kernel_only_where_its_predicate_holds(cfg):
    impls = implementations.resolve(cfg, "gpu")
    checks = [(impls.attention, implementations.attention_unsupported(cfg, "gpu")
               or implementations.attention_padding(cfg)),
              (impls.decode, implementations.decode_unsupported(cfg, "gpu")),
              (impls.moe, implementations.moe_unsupported(cfg, "gpu")
               or implementations.moe_padding(cfg))]
    for picked, reason in checks:
        assert picked == ("xla" if reason else "pallas")
        if reason:
            assert any(reason in note for note in impls.notes)
    assert implementations.resolve(cfg, "cpu") == implementations.Implementations(
        "xla", "xla", "xla")
    tpu = implementations.resolve(cfg, "tpu")
    # On TPU: the attention kernel where supported, the decode kernel from 64 heads, XLA's
    # ragged_dot for the experts (implementations.tpu_fallback gives the estimates).
    assert tpu.attention == ("xla" if implementations.attention_unsupported(cfg, "tpu")
                             or implementations.tpu_fallback("attention_impl", cfg)
                             else "pallas")
    assert tpu.decode == ("xla" if implementations.decode_unsupported(cfg, "tpu")
                          or cfg.n_heads < implementations.DECODE_KERNEL_MIN_HEADS else "pallas")
    assert tpu.moe == "xla" and any("ragged_dot" in note for note in tpu.notes)


def test_presets_pick_what_the_readme_says_on_tpu():
    assert implementations.resolve(PRESETS["deepseek_v3_671b"], "tpu").describe().startswith(
        "attention pallas, decode pallas, experts xla")
    moonlight = implementations.resolve(PRESETS["moonlight_16b_a3b"], "tpu")
    assert (moonlight.attention, moonlight.decode, moonlight.moe) == ("pallas", "xla", "xla")


def test_presets_pick_what_the_readme_says():
    assert implementations.resolve(PRESETS["small"], "gpu").describe() == (
        "attention pallas, decode pallas, experts pallas")
    tiny = implementations.resolve(PRESETS["tiny"], "gpu")
    # tiny's head dims (16/8/16) and expert width (32) would run padded: unmeasured, so XLA.
    assert (tiny.attention, tiny.decode, tiny.moe) == ("xla", "xla", "xla")
    assert "head dims 16/8/16 run on the GPU kernel only zero-padded to 64/64/64" in (
        tiny.describe())
    assert "moe_inter_dim=32 run on the GPU grouped matmuls only zero-padded" in tiny.describe()
    assert "kv_lora_rank=32 is not a multiple of 128" in tiny.describe()
    # An explicit "pallas" runs the padded kernels.
    explicit = PRESETS["tiny"].replace(attention_impl="pallas", moe_impl="pallas")
    assert implementations.resolve(explicit, "gpu").describe().startswith(
        "attention pallas, decode xla, experts pallas")


@pytest.mark.parametrize("field, changes, needle", [
    ("attention_impl", dict(v_head_dim=192, qk_nope_head_dim=128, qk_rope_head_dim=64),
     "head dims 128/64/192"),
    ("decode_impl", {}, "kv_lora_rank=32 is not a multiple of 128"),
])
def test_explicit_pallas_is_refused_naming_the_dim(field, changes, needle):
    cfg = PRESETS["tiny"].replace(**changes, **{field: "pallas"})
    with pytest.raises(ValueError, match=f"model.{field}='pallas' cannot run on gpu: .*{needle}"):
        implementations.resolve(cfg, "gpu")


def test_explicit_pallas_experts_are_refused_without_a_kernel_backend():
    cfg = PRESETS["tiny"].replace(moe_impl="pallas")
    with pytest.raises(ValueError, match=r"model\.moe_impl='pallas' cannot run on cpu: no grouped"):
        implementations.resolve(cfg, "cpu")


def test_a_resolved_config_names_the_kernel_and_passes_through():
    small = PRESETS["small"]  # auto takes every kernel on GPU (above)
    gpu = implementations.resolved(small, "gpu")
    assert (gpu.attention_impl, gpu.decode_impl, gpu.moe_impl) == ("pallas_gpu",) * 3
    assert implementations.resolved(gpu, "gpu") == gpu
    assert implementations.resolve(gpu, "gpu").describe() == (
        implementations.resolve(small, "gpu").describe())
    cpu = implementations.resolved(small, "cpu")
    assert (cpu.attention_impl, cpu.decode_impl, cpu.moe_impl) == ("xla",) * 3
    with pytest.raises(ValueError, match=r"model\.attention_impl='pallas_gpu' cannot run on tpu: "
                                         "it is the gpu kernel"):
        implementations.resolved(gpu, "tpu")


def test_the_model_refuses_a_config_not_resolved_for_a_backend():
    """The modules read the implementation fields as they are: no backend lookup while
    tracing, so "auto" or a bare "pallas" must have been resolved (dsv3_jax.model.api does)."""
    tokens = S((1, 8), jnp.int32)
    for field in ("attention_impl", "moe_impl"):
        for request in ("auto", "pallas"):
            cfg = PRESETS["tiny"].replace(**{"attention_impl": "xla", "decode_impl": "xla",
                                             "moe_impl": "xla", field: request})
            with pytest.raises(ValueError, match=f"model.{field}='{request}' is not resolved"):
                jax.eval_shape(lambda t, cfg=cfg: Transformer(cfg).init(
                    jax.random.key(0), t, t, None, jnp.ones(t.shape, bool)), tokens)


def test_every_kernel_entry_point_takes_the_same_kernel_names():
    for module in (grouped_matmul, expert_dispatch, mla_attention, mla_decode):
        assert {"pallas", "pallas_gpu", "pallas_tpu"} <= set(module.IMPLEMENTATIONS), module


# ---------------------------------------------------------------------------------------------
# Whole models through auto, lowered for CUDA
# ---------------------------------------------------------------------------------------------
def _reduced(name):
    cfg = PRESETS[name]
    if cfg.n_layers > 4:  # the shapes of every layer kind, fewer layers
        cfg = cfg.replace(n_layers=cfg.n_dense_layers + 1)
    return cfg.replace(dtype="bfloat16")


# Every preset through auto; tiny's auto is XLA (padded shapes), so its kernels are asked for.
@pytest.mark.parametrize("name, impl", [*((n, "auto") for n in sorted(PRESETS) if n != "tiny"),
                                        ("tiny", "pallas")])
def test_every_preset_lowers_for_cuda_with_its_kernels(name, impl, monkeypatch):
    cfg = _reduced(name).replace(attention_impl=impl, moe_impl=impl)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what the model resolves on
    impls = implementations.resolve(cfg, "gpu")
    assert impls.attention == impls.moe == "pallas"
    variables = nn.meta.unbox(dsv3_jax.abstract_variables(cfg))
    tokens = S((1, 256), jnp.int32)

    def loss(params, bias, tokens):
        out = dsv3_jax.forward(cfg, {"params": params, "router_bias": bias}, tokens)
        return out.logits.astype(jnp.float32).mean()

    lowered = jax.jit(jax.grad(loss)).trace(variables["params"], variables["router_bias"],
                                            tokens).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # Forward, dq and dk/dv attention kernels and the grouped matmuls, all Mosaic GPU.
    assert text.count("mosaic_gpu") >= 4
