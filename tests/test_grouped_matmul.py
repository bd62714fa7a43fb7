"""Grouped-matmul kernels (Mosaic GPU and TPU, interpreted on the CPU) vs the plain-JAX reference.

Tolerances (relative L2 error, ||out - ref|| / ||ref||):
  * bf16 operands: < 1e-2. The kernels accumulate in fp32 like the reference, but outputs and
    (in the backward) the cotangent are rounded to bf16 (2^-8 relative per element; we see
    about 2e-3).
  * fp32 operands on the GPU kernel: < 2e-5. The kernel multiplies bf16 parts (bf16x3: hi*hi +
    hi*lo + lo*hi), which drops terms below about 2^-17 of each product (we see about 5e-6).
  * fp32 operands on the TPU kernel: < 1e-5 (fp32 products, fp32 sums in another order).
"""

import os

# The Mosaic GPU interpreter parks XLA CPU threads on simulated barriers; with the CPU client's
# thread pool sized to a 2-core machine the simulated warpgroups can deadlock. A larger pool
# (read when the CPU backend starts; tests/conftest.py is the better home) avoids it.
os.environ.setdefault("PJRT_NPROC", "16")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _gmm_gpu
from pallas_kernels import grouped_matmul as gm

TOL = {jnp.bfloat16: 1e-2, (jnp.float32, "pallas_gpu"): 2e-5, (jnp.float32, "pallas_tpu"): 1e-5}


def _tol(dtype, impl):
    return TOL[dtype] if dtype == jnp.bfloat16 else TOL[(dtype, impl)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values in the kernel output"
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _group_sizes(rng, M, G, *, empty=(), tail=0):
    """Uneven (Dirichlet) sizes summing to M - tail, with the given groups empty."""
    w = rng.dirichlet(np.ones(G))
    w[list(empty)] = 0
    sizes = np.floor(w / w.sum() * (M - tail)).astype(np.int32)
    sizes[np.argmax(sizes)] += M - tail - sizes.sum()
    return jnp.asarray(sizes)


def _epilogue_paths(gs, M, cfg):
    """Which of the GPU kernel's two epilogue paths the warpgroups of this case take."""
    G = gs.shape[0]
    paths = set()
    for g, _, lo, hi in np.asarray(_gmm_gpu.row_tiles(gs, M, cfg.cta_m)).T:
        for wg in range(2):
            base = wg * cfg.tile_m if cfg.wg_dim == "m" else 0
            r_lo, r_hi = np.clip(lo - base, 0, cfg.tile_m), np.clip(hi - base, 0, cfg.tile_m)
            if r_hi > r_lo or (g == G and hi > lo):
                paths.add("whole" if (r_lo, r_hi) == (0, cfg.tile_m) and g < G else "rows")
    return paths


def _operands(seed, M, K, N, G, dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(k2, (G, K, N), jnp.float32) * K ** -0.5).astype(dtype)
    ct = jax.random.normal(k3, (M, N), jnp.float32)
    return lhs, rhs, ct


def test_row_tiles_cover_every_row_once():
    """The GPU kernel's tile schedule: each row is owned by exactly one tile of its group."""
    rng = np.random.default_rng(0)
    for M, G, tile in [(304, 7, 64), (64, 3, 128), (1000, 16, 128), (40, 2, 128)]:
        sizes = _group_sizes(rng, M, G, empty=(1,), tail=M // 10)
        meta = np.asarray(jax.jit(_gmm_gpu.row_tiles, static_argnums=(1, 2))(sizes, M, tile))
        gid = np.asarray(gm.group_ids(sizes, M))
        owner = np.full(M, -1)
        for g, start, lo, hi in meta.T:
            rows = np.arange(start + lo, start + hi)
            assert 0 <= lo <= hi <= tile and start + hi <= max(M, tile)
            assert start % _gmm_gpu.ROW_ALIGN == 0, "TMA row offsets must be 8-aligned"
            assert np.all(owner[rows] == -1), "row owned twice"
            assert np.all(gid[rows] == g), "row in the wrong group's tile"
            owner[rows] = g
        assert np.all(owner >= 0), "row owned by no tile"


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("op", ["mm_kn", "mm_nk", "swiglu", "mm2"])
def test_kernel_variants_bf16(impl, op):
    """Every fused variant, on ragged shapes with empty groups and rows past the last group."""
    M, K, N, G = 200, 96, 160, 5
    # Empty groups 0 and 3, 13 rows past the last group; group 2 fills a whole 128-row tile.
    gs = jnp.array([0, 8, 150, 0, 29], jnp.int32)
    lhs, rhs, _ = _operands(1, M, K, N, G, jnp.bfloat16)
    lhs2, rhs2, _ = _operands(2, M, K, N, G, jnp.bfloat16)
    ref = gm.reference(lhs, rhs, gs, preferred_element_type=jnp.float32)
    options = gm.pallas_options(impl, interpret=True)
    if impl == "pallas_gpu":
        # The GPU kernel stores a warpgroup's output with whole swizzled-tile copies when all its
        # rows are in the tile's group, else row by row: this case must take both paths.
        assert _epilogue_paths(gs, M, gm._default_gmm_config(op.split("_")[0], K)) == {
            "whole", "rows"}

    def run(lhs_list, rhs_list, op_name, layout, n_out):
        return jax.jit(lambda a, b: gm.gmm(a, b, gs, op=op_name, rhs_layout=layout,
                                           out_dtypes=[jnp.float32] * n_out,
                                           options=options))(lhs_list, rhs_list)

    rhs_t, rhs2_t = jnp.swapaxes(rhs, 1, 2), jnp.swapaxes(rhs2, 1, 2)
    if op == "mm_kn":
        outs, refs = run([lhs], [rhs], "mm", "kn", 1), [ref]
    elif op == "mm_nk":
        outs, refs = run([lhs], [rhs_t], "mm", "nk", 1), [ref]
    elif op == "swiglu":
        up = gm.reference(lhs, rhs2, gs, preferred_element_type=jnp.float32)
        outs, refs = run([lhs], [rhs, rhs2], "swiglu", "kn", 3), [jax.nn.silu(ref) * up, ref, up]
    else:
        ref2 = gm.reference(lhs2, rhs2, gs, preferred_element_type=jnp.float32)
        outs, refs = run([lhs, lhs2], [rhs_t, rhs2_t], "mm2", "nk", 1), [ref + ref2]
    for out, r in zip(outs, refs, strict=True):
        # fp32 outputs of bf16 products: only summation order differs from the reference.
        assert _rel(out, r) < 1e-5
        tail = np.asarray(out)[int(gs.sum()):]
        assert np.all(tail == 0), "rows past the last group must be zero"


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grad_matches_reference_random_shapes(impl, dtype):
    """Forward, d_lhs and d_rhs through the custom_vjp vs jax.grad of the reference, on a
    random ragged shape (M, K, N not tile multiples) with random empty groups."""
    seed = {("pallas_gpu", jnp.bfloat16): 10, ("pallas_gpu", jnp.float32): 11,
            ("pallas_tpu", jnp.bfloat16): 12, ("pallas_tpu", jnp.float32): 13}[impl, dtype]
    rng = np.random.default_rng(seed)
    M, K, N = (int(rng.integers(lo, hi)) for lo, hi in ((60, 260), (16, 200), (16, 200)))
    G = int(rng.integers(2, 8))
    empty = rng.choice(G, size=max(1, G // 3), replace=False)
    gs = _group_sizes(rng, M, G, empty=empty)
    lhs, rhs, ct = _operands(seed, M, K, N, G, dtype)

    def loss(impl_name):
        def f(a, b):
            out = gm.grouped_matmul(a, b, gs, implementation=impl_name, interpret=True,
                                    preferred_element_type=jnp.float32)
            return jnp.sum(out * ct), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, out), (d_lhs, d_rhs) = loss(impl)(lhs, rhs)
    (_, ref), (r_lhs, r_rhs) = loss("reference")(lhs, rhs)
    tol = _tol(dtype, impl)
    assert d_lhs.dtype == lhs.dtype and d_rhs.dtype == rhs.dtype
    assert _rel(out, ref) < tol
    assert _rel(d_lhs, r_lhs) < tol
    assert _rel(d_rhs, r_rhs) < tol
    for g in empty:
        assert np.all(np.asarray(d_rhs[g]) == 0), "an empty group's weight gradient must be 0"


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_weight_grad_ignores_nan_padding(impl):
    """tgmm masks rows outside each group by select: NaN in padding rows must not leak."""
    M, K, N, G = 192, 128, 128, 3
    gs = _group_sizes(np.random.default_rng(3), M, G, empty=(1,), tail=37)
    lhs, _, ct = _operands(4, M, K, N, G, jnp.bfloat16)
    total = int(gs.sum())
    lhs_nan = lhs.at[total:].set(jnp.nan)
    ct_nan = ct.astype(jnp.bfloat16).at[total:].set(jnp.nan)
    options = gm.pallas_options(impl, interpret=True)
    d_rhs = jax.jit(lambda a, b: gm.tgmm(a, b, gs, out_dtype=jnp.float32, options=options))(
        lhs_nan, ct_nan)
    gid = np.asarray(gm.group_ids(gs, M))
    a, b = np.asarray(lhs, np.float32), np.asarray(ct.astype(jnp.bfloat16), np.float32)
    ref = np.stack([a[gid == g].T @ b[gid == g] for g in range(G)])
    # bf16 operands, fp32 accumulation and output: summation order only.
    assert _rel(d_rhs, ref) < 1e-5


def test_pallas_backend_selection():
    """'pallas' on a CPU backend needs interpret mode and then runs the GPU kernels."""
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret"):
            gm.pallas_options("pallas", interpret=False)
        assert gm.pallas_options("pallas", interpret=True).backend == "gpu"
    assert gm.pallas_options("pallas_tpu").backend == "tpu"
    with pytest.raises(ValueError):
        gm.grouped_matmul(jnp.zeros((8, 8)), jnp.zeros((1, 8, 8)), jnp.array([8]),
                          implementation="bogus")
