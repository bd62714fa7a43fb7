"""Absorbed MLA decode: Pallas kernels (Mosaic GPU and Mosaic TPU, interpret mode) vs the plain-JAX
reference; the Mosaic GPU kernel lowered for CUDA at the benchmark shapes; and the absorbed
reference against the expanded attention reference (the same function).

Tolerance: relative Frobenius error against the reference on fp32-upcast inputs. The kernels take
bf16 operands (the GPU kernel rounds fp32 inputs to bf16 for its wgmmas) and round P and the output
to bf16, about 2^-8 relative each: 2e-2.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mla_decode_mgpu, _mla_decode_tpu
from pallas_kernels.mla_attention import reference as attention_reference
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import reference as decode_reference
from tests import gpu_interpret


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, B, Tq, N, R, Hr, L, dtype):
    ks = jax.random.split(jax.random.key(seed), 3)
    q_latent = jax.random.normal(ks[0], (B, Tq, N, R), dtype)
    q_rope = jax.random.normal(ks[1], (B, Tq, N, Hr), dtype)
    kv_cache = jax.random.normal(ks[2], (B, L, R + Hr), dtype)
    return q_latent, q_rope, kv_cache


def _check(implementation, config, B, Tq, N, R, L, lengths, dtype):
    Hr = 64
    q_latent, q_rope, kv_cache = _inputs(L + N, B, Tq, N, R, Hr, L, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    scale = (R + Hr) ** -0.5
    o = mla_decode(q_latent, q_rope, kv_cache, lengths, scale=scale,
                   implementation=implementation, interpret=True, config=config)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    o_ref = jax.jit(decode_reference, static_argnames="scale")(
        f32(q_latent), f32(q_rope), f32(kv_cache), lengths, scale=scale)
    assert o.shape == (B, Tq, N, R) and o.dtype == dtype
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert _rel(o, o_ref) < 2e-2, _rel(o, o_ref)


# Cache lengths that are not tile multiples, one sequence nearly empty (lengths == Tq + small),
# two new tokens (MTP verification), several key splits merged by log-sum-exp, and the real
# 512-wide latent with 128 heads (two 64-row groups per sequence). Tq * N <= 32 takes the
# transposed few-rows kernel unless few_rows_max=0 forces the row-major one. Run in a child
# process with 4 host devices (see tests/gpu_interpret.py).
GPU_CASES = {  # B, Tq, N, R, L, lengths, splits, few_rows_max, dtype
    "few-rows-N16": (2, 1, 16, 128, 200, [200, 7], None, 32, jnp.bfloat16),
    "few-rows-Tq2-splits3-f32": (2, 2, 8, 128, 300, [3, 290], 3, 32, jnp.float32),
    "row-major-Tq2-splits2": (2, 2, 8, 128, 150, [150, 4], 2, 0, jnp.bfloat16),
    "row-major-N128-R512": (1, 1, 128, 512, 130, [130], 1, 32, jnp.bfloat16),
    "row-major-6-and-5-tiles-f32": (2, 1, 8, 128, 330, [330, 260], 1, 0, jnp.float32),
}


def _run_gpu_case(name):
    B, Tq, N, R, L, lengths, splits, few_rows_max, dtype = GPU_CASES[name]
    config = _mla_decode_mgpu.Config(num_splits=splits, few_rows_max=few_rows_max)
    _check("pallas_gpu", config, B, Tq, N, R, L, lengths, dtype)


@pytest.fixture(scope="module")
def gpu_interpret_results():
    return gpu_interpret.run_worker(__file__)


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mosaic_gpu_matches_reference(name, gpu_interpret_results):
    result = gpu_interpret.case_result(gpu_interpret_results, name)
    assert result == "ok", result


@pytest.mark.parametrize(
    "B, Tq, N, L, lengths, dtype",
    [
        (2, 1, 16, 300, [300, 5], jnp.bfloat16),
        (1, 2, 4, 200, [131], jnp.float32),
    ],
)
def test_mosaic_tpu_matches_reference(B, Tq, N, L, lengths, dtype):
    _check("pallas_tpu", _mla_decode_tpu.Config(block_kv=128), B, Tq, N, 128, L, lengths,
           dtype)


@pytest.mark.parametrize("B, L, N, Tq", [
    (64, 4096, 128, 1), (64, 4096, 16, 2), (3, 1001, 128, 1), (2, 700, 16, 2),
    (64, 4096, 128, 2)])
def test_mosaic_gpu_lowers_for_cuda_at_benchmark_shape(B, L, N, Tq):
    """Layout inference, TMA tiling and the SMEM budget pass for the real 512 + 64 cache (no GPU
    needed): the row-major kernel (128 heads) and the few-rows kernel (16 heads, 2 tokens), at
    the benchmark shapes and at capacities that are not multiples of the 8-row TMA tile (which
    failed on the GPU before the wrapper padded them)."""
    S = jax.ShapeDtypeStruct
    args = (S((B, Tq, N, 512), jnp.bfloat16), S((B, Tq, N, 64), jnp.bfloat16),
            S((B, L, 576), jnp.bfloat16), S((B,), jnp.int32))
    config = _mla_decode_mgpu.Config()
    fn = lambda *a: mla_decode(*a, scale=0.1, implementation="pallas_gpu",  # noqa: E731
                               config=config)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_absorbed_decode_equals_expanded_attention():
    """Folding W_UK into the query and W_UV after the softmax (mla_decode) gives the expanded
    attention of the newest Tq tokens over the whole prefix (mla_attention), per SPEC section 2."""
    o_absorbed, o_expanded = jax.jit(_absorbed_and_expanded)(jax.random.key(7))
    np.testing.assert_allclose(o_absorbed, o_expanded, rtol=1e-4, atol=1e-5)


def _absorbed_and_expanded(key):
    B, S, N, Hn, Hr, Hv, R, Tq = 2, 24, 3, 16, 8, 12, 32, 2
    ks = jax.random.split(key, 6)
    c_kv = jax.random.normal(ks[0], (B, S, R), jnp.float32)
    k_rope = jax.random.normal(ks[1], (B, S, Hr), jnp.float32)
    q_nope = jax.random.normal(ks[2], (B, S, N, Hn), jnp.float32)
    q_rope = jax.random.normal(ks[3], (B, S, N, Hr), jnp.float32)
    w_uk = jax.random.normal(ks[4], (N, Hn, R), jnp.float32) / R**0.5
    w_uv = jax.random.normal(ks[5], (N, Hv, R), jnp.float32) / R**0.5
    scale = (Hn + Hr) ** -0.5
    k_nope = jnp.einsum("BSR,NHR->BSNH", c_kv, w_uk)
    v = jnp.einsum("BSR,NHR->BSNH", c_kv, w_uv)
    o_expanded = attention_reference(q_nope, q_rope, k_nope, k_rope, v, scale=scale)[:, -Tq:]
    q_latent = jnp.einsum("BTNH,NHR->BTNR", q_nope[:, -Tq:], w_uk)
    kv_cache = jnp.concatenate([c_kv, k_rope], axis=-1)
    lengths = jnp.full((B,), S, jnp.int32)
    o_latent = decode_reference(q_latent, q_rope[:, -Tq:], kv_cache, lengths, scale=scale)
    o_absorbed = jnp.einsum("BTNR,NHR->BTNH", o_latent, w_uv)
    return o_absorbed, o_expanded


if __name__ == "__main__" and gpu_interpret.WORKER_FLAG in sys.argv:
    gpu_interpret.worker_main(GPU_CASES, _run_gpu_case)
