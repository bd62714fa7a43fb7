"""The Mosaic GPU block-scaled FP8 grouped matmul (pallas_kernels/_gmm_fp8_gpu.py), interpreted
on the CPU, against its plain-JAX reference on the same quantized operands (dsv3_jax.model.fp8).

Tolerance: relative L2 < 1e-5 for fp32 outputs (1e-4 for the weight gradient, see "grads").
The kernel and the reference form the same E4M3 x E4M3 products (exact in fp32) and the same
per-chunk scaling; only the order of the fp32 sums differs (about 1e-7 relative seen). bf16
outputs: < 4e-3 (one rounding to bf16, 2^-9 relative RMS, plus the above).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model import fp8
from pallas_kernels import _gmm_fp8_gpu as k8
from tests import gpu_interpret


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _operands(seed, M, K, N, sizes):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.lognormal(0, 1, (M, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), K, N)) * 0.05, jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


def _quantized(x, w):
    qa, sa = fp8.quantize_tiles(x, axis=1)
    qb, sb = fp8.quantize_blocks(w)
    return qa, sa.T, jnp.swapaxes(qb, 1, 2), sb


# M, K, N, group sizes (sum <= M: rows past it are the tail), out dtype
GPU_CASES = {
    "ragged-empty-tail-f32": (200, 256, 256, [70, 0, 120, 1], jnp.float32),
    "unaligned-K-N-bf16": (100, 200, 136, [33, 67], jnp.bfloat16),
    "one-group-f32": (128, 384, 128, [128], jnp.float32),
    "one-warpgroup-ragged-f32": (200, 256, 256, [70, 0, 120, 1], jnp.float32),
    "grads": (136, 256, 128, [60, 0, 76], jnp.float32),
    "experts-swiglu": (96, 128, 128, [40, 0, 56], jnp.float32),
    "benchmark-dry-run": None,
    # The dense form (matmul_fp8: one group, no tail pass) against fp8.scaled_matmul.
    "dense-f32": (200, 384, 256, None, jnp.float32),
    "dense-unaligned-bf16": (100, 200, 136, None, jnp.bfloat16),
    "dense-one-warpgroup-f32": (70, 256, 128, None, jnp.float32),
    "dense-linear-grads": (136, 256, 200, None, jnp.float32),
    "benchmark-dense-dry-run": None,
}


def _run_dense_case(name):
    """matmul_fp8 against scaled_matmul on the same quantized operands (tolerances as in the
    module docstring); "dense-linear-grads": fp8.linear(implementation="pallas_gpu") against
    the emulation, forward and both gradients (the weight gradient is the emulation's own code
    on the same residuals: fp32 order only)."""
    M, K, N, _, out_dtype = GPU_CASES[name]
    x, w, _ = _operands(5, M, K, N, [M])
    w = w[0]
    if name == "dense-linear-grads":
        ct = jnp.asarray(np.random.default_rng(6).standard_normal((M, N)), jnp.float32)

        def loss(impl):
            return lambda x, w: jnp.sum(fp8.linear(
                x, w, implementation=impl, interpret=True) * ct)

        assert _rel(fp8.linear(x, w, implementation="pallas_gpu", interpret=True),
                    fp8.linear(x, w)) < 1e-5
        got = jax.grad(loss("pallas_gpu"), (0, 1))(x, w)
        want = jax.grad(loss("xla"), (0, 1))(x, w)
        for a, b in zip(got, want, strict=True):
            assert _rel(a, b) < 1e-5, _rel(a, b)
        return
    qa, sa = fp8.quantize_tiles(x, axis=1)
    qw, sw = fp8.quantize_blocks(w)
    cfg = k8.Fp8GmmConfig(warp_specialized="one-warpgroup" not in name)
    out = k8.matmul_fp8(qa, sa.T, qw.T, sw, out_dtype=out_dtype, cfg=cfg, interpret=True)
    ref = fp8.scaled_matmul(qa, sa, qw, fp8.block_scales_along_n(sw, N))
    assert out.dtype == out_dtype and out.shape == (M, N)
    tol = 1e-5 if out_dtype == jnp.float32 else 4e-3
    assert _rel(out, ref) < tol, _rel(out, ref)


def _run_gpu_case(name):
    if name.startswith("benchmark-"):  # benchmarks/fp8_gemm.py end to end, tiny, interpreted
        from benchmarks import fp8_gemm
        fp8_gemm.main(["--dry-run", "--dense"] if "dense" in name else ["--dry-run"])
        return
    if name.startswith("dense-"):
        _run_dense_case(name)
        return
    M, K, N, sizes, out_dtype = GPU_CASES[name]
    x, w, gs = _operands(0, M, K, N, sizes)
    if name == "experts-swiglu":
        # The routed experts' block (gate, up, SwiGLU, down) on the kernel vs emulated, with its
        # gradients: the same quantized operands throughout, so fp32-order differences only,
        # grown through SwiGLU's quantized product h (1e-4).
        w_down = jnp.swapaxes(w, 1, 2) * 0.5

        def loss(impl):
            def f(x, wg, wu, wd):
                y = fp8.experts_swiglu(x, gs, wg, wu, wd, implementation=impl, interpret=True)
                return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
            return f

        args = (x, w, w * 0.9, w_down)
        assert _rel(loss("pallas_gpu")(*args), loss("xla")(*args)) < 1e-4
        got = jax.grad(loss("pallas_gpu"), (0, 1, 2, 3))(*args)
        want = jax.grad(loss("xla"), (0, 1, 2, 3))(*args)
        for a, b in zip(got, want, strict=True):
            assert _rel(a, b) < 1e-4, _rel(a, b)
        return
    if name == "grads":
        ct = jnp.asarray(np.random.default_rng(1).standard_normal((M, N)), jnp.float32)

        def loss(impl):
            return lambda x, w: jnp.sum(fp8.grouped_linear(
                x, w, gs, implementation=impl, interpret=True) * ct)

        got = jax.grad(loss("pallas_gpu"), (0, 1))(x, w)
        want = jax.grad(loss("xla"), (0, 1))(x, w)
        assert _rel(got[0], want[0]) < 1e-5, _rel(got[0], want[0])  # input gradient: kernel
        # The weight gradient: the same quantized operands on the bf16x3 transposed kernel
        # (2^-17 relative per product) vs XLA's fp32 ragged transpose.
        assert _rel(got[1], want[1]) < 1e-4, _rel(got[1], want[1])
        return
    args = _quantized(x, w)
    cfg = k8.Fp8GmmConfig(warp_specialized=not name.startswith("one-warpgroup"))
    out = k8.gmm_fp8(*args, gs, out_dtype=out_dtype, cfg=cfg, interpret=True)
    ref = k8.reference(*args, gs)
    assert out.dtype == out_dtype and out.shape == (M, N)
    tol = 1e-5 if out_dtype == jnp.float32 else 4e-3
    assert _rel(out, ref) < tol, _rel(out, ref)
    total = sum(sizes)
    assert np.all(np.asarray(out[total:]) == 0)
    # And the emulated grouped linear (dsv3_jax.model.fp8) is the same arithmetic.
    assert _rel(fp8.grouped_linear(x, w, gs), ref) < 1e-5


@pytest.fixture(scope="module")
def gpu_interpret_results():
    return gpu_interpret.run_worker(__file__)


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mosaic_gpu_fp8_gmm_matches_reference(name, gpu_interpret_results):
    result = gpu_interpret.case_result(gpu_interpret_results, name)
    assert result == "ok", result


def test_reference_equals_scaled_matmul_per_group():
    """The kernel's reference, group by group, is fp8.scaled_matmul (the recipe's GEMM)."""
    x, w, gs = _operands(2, 96, 256, 256, [40, 0, 50])
    qa, sa_cm, qb_gnk, sb = _quantized(x, w)
    ref = np.asarray(k8.reference(qa, sa_cm, qb_gnk, sb, gs))
    for g, (lo, hi) in enumerate([(0, 40), (40, 40), (40, 90)]):
        if hi == lo:
            continue
        want = fp8.scaled_matmul(qa[lo:hi], sa_cm.T[lo:hi], jnp.swapaxes(qb_gnk[g], 0, 1),
                                 fp8.block_scales_along_n(sb[g], 256))
        assert _rel(ref[lo:hi], want) < 1e-6
    assert np.all(ref[90:] == 0)


def test_block_tiles_store_every_row_of_every_group_once():
    for M, sizes, tile in [(200, [70, 0, 120, 1], 64), (64, [64], 64), (300, [1] * 9, 128)]:
        meta = np.asarray(k8.block_tiles(jnp.asarray(sizes, jnp.int32), M, tile))
        owner = np.full(M, -1)
        for g, start, lo, hi in meta.T:
            assert start % tile == 0 and 0 <= lo <= hi <= tile
            rows = np.arange(start + lo, start + hi)
            assert np.all(owner[rows] == -1)
            owner[rows] = g
        ends = np.cumsum(sizes)
        expected = np.searchsorted(ends, np.arange(M), side="right")
        expected[np.arange(M) >= ends[-1]] = -1
        np.testing.assert_array_equal(owner, expected)


def test_lowers_for_cuda_at_deepseek_v3_expert_shapes():
    """Mosaic GPU's layout inference and lowering run on the CPU: the kernel compiles for the
    H200 at DeepSeek-V3's expert GEMM shapes (gate/up: K 7168, N 2048; down: K 2048, N 7168),
    both variants."""
    for K, N, ws in ((7168, 2048, True), (2048, 7168, True), (2048, 1024, False)):
        cfg = k8.Fp8GmmConfig(warp_specialized=ws)
        M, G = 8192, 8
        args = (jax.ShapeDtypeStruct((M, K), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((K // 128, M), jnp.float32),
                jax.ShapeDtypeStruct((G, N, K), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((G, K // 128, N // 128), jnp.float32),
                jax.ShapeDtypeStruct((G,), jnp.int32))
        lowered = jax.jit(lambda *a, cfg=cfg: k8.gmm_fp8(*a, cfg=cfg)).trace(*args).lower(
            lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_dense_lowers_for_cuda_at_deepseek_v3_dense_shapes():
    """The dense form compiles for the H200 (Mosaic GPU lowering on the CPU) at DeepSeek-V3's
    dense linears' forward products: kv_a (7168 -> 576, N padded to 640), q_b (1536 -> 24576),
    wo (16384 -> 7168)."""
    for K, N in ((7168, 576), (1536, 24576), (16384, 7168)):
        M = 4096
        args = (jax.ShapeDtypeStruct((M, K), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((K // 128, M), jnp.float32),
                jax.ShapeDtypeStruct((N, K), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((K // 128, -(-N // 128)), jnp.float32))
        lowered = jax.jit(k8.matmul_fp8).trace(*args).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_refuses_operands_that_are_not_e4m3():
    x, w, gs = _operands(4, 64, 128, 128, [64])
    qa, sa_cm, qb, sb = _quantized(x, w)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        k8.gmm_fp8(qa.astype(jnp.bfloat16), sa_cm, qb, sb, gs, interpret=True)
    with pytest.raises(ValueError, match="scales"):
        k8.gmm_fp8(qa, sa_cm.T, qb, sb, gs, interpret=True)


if __name__ == "__main__" and gpu_interpret.WORKER_FLAG in sys.argv:
    gpu_interpret.worker_main(GPU_CASES, _run_gpu_case)
