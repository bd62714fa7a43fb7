"""MLA training attention: Pallas kernels (Mosaic GPU and Mosaic TPU, interpret mode) vs the
plain-JAX reference, forward and gradients through the custom_vjp; and the Mosaic GPU kernels
lowered for CUDA at the benchmark shapes (layouts, SMEM budget) without a GPU. The Mosaic GPU
interpret-mode cases run in one child process (tests/gpu_interpret.py).

Tolerances are relative Frobenius errors against the reference evaluated on fp32-upcast inputs:
  - bf16 operands (any Mosaic GPU run, whose wgmmas take bf16; TPU with bf16 inputs): the kernels
    round P, dS and the outputs to bf16, about 2^-8 relative each, so 2e-2.
  - fp32 inputs on TPU: fp32 throughout, only summation order differs, so 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mla_attention_mgpu, _mla_attention_tpu
from pallas_kernels.mla_attention import mla_attention, segment_bounds
from tests import gpu_interpret
from tests.kernel_trace import kernel_launches, named_value_sources, sub_jaxprs

GRAD_NAMES = ("dq_nope", "dq_rope", "dk_nope", "dk_rope", "dv")
# Smallest Mosaic GPU tiles (64 rows) so that short sequences span several blocks and CTAs.
GPU_SMALL = _mla_attention_mgpu.Config(block_q=64, block_kv=64, block_q_dq=64, block_kv_dq=64)
GPU_SMALL_FUSED = dataclasses.replace(GPU_SMALL, backward="fused")
TPU_SMALL = _mla_attention_tpu.Config(block_q=128, block_kv=128)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, B, T, N, Hn, Hr, Hv, dtype):
    ks = jax.random.split(jax.random.key(seed), 6)
    shapes = [(B, T, N, Hn), (B, T, N, Hr), (B, T, N, Hn), (B, T, Hr), (B, T, N, Hv), (B, T, N, Hv)]
    *args, do = [jax.random.normal(k, s, dtype) for k, s in zip(ks, shapes, strict=True)]
    return args, do


def _segments(T, lengths_per_batch):
    """Packed-document ids; a zero length leaves an id unused (an empty segment)."""
    rows = []
    for lengths in lengths_per_batch:
        assert sum(lengths) == T
        rows.append(np.repeat(np.arange(len(lengths)), lengths))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _loss(implementation, config, segment_ids, do, scale, *args):
    o = mla_attention(*args, segment_ids, scale=scale, implementation=implementation,
                      interpret=implementation != "xla", config=config)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o


def _check_against_reference(implementation, config, args, do, segment_ids, tol):
    scale = (args[0].shape[-1] + args[1].shape[-1]) ** -0.5
    grad = jax.grad(functools.partial(_loss, implementation, config, segment_ids, do, scale),
                    argnums=range(5), has_aux=True)
    grads, o = grad(*args)
    f32 = [x.astype(jnp.float32) for x in args]
    grad_ref = jax.jit(jax.grad(functools.partial(_loss, "xla", None, segment_ids, do, scale),
                                argnums=range(5), has_aux=True))
    grads_ref, o_ref = grad_ref(*f32)
    assert o.dtype == args[0].dtype and o.shape == o_ref.shape
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert _rel(o, o_ref) < tol, ("o", _rel(o, o_ref))
    for name, g, g_ref, x in zip(GRAD_NAMES, grads, grads_ref, args, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert _rel(g, g_ref) < tol, (name, _rel(g, g_ref))


def test_segment_bounds_match_brute_force():
    seg = jnp.asarray([[0, 0, 2, 2, 2, 5, 5, 9], [3, 1, 1, 3, 3, 0, 0, 0]], jnp.int32)
    first, last = segment_bounds(seg)
    s = np.asarray(seg)
    same = s[:, :, None] == s[:, None, :]
    pos = np.arange(s.shape[1])
    np.testing.assert_array_equal(first, np.where(same, pos, 99).min(-1))
    np.testing.assert_array_equal(last, np.where(same, pos, -1).max(-1))


# Mosaic GPU in interpret mode. T = 200 and 136 are not tile multiples (the wrapper pads);
# segment 1 is empty in the first packed case; tiny's dims (16/8/16) are padded to 64; the last
# two split-backward cases run DeepSeek-V3's real head dims (the largest the kernels' SMEM
# holds), with two backward pipeline slots and with the default (benchmarked) tiles. The fused
# cases run the fused backward's "partial" dQ accumulation (the interpreter's; "auto" picks it),
# causal with and without packed documents, at dims 64/64/64 and the real ones.
GPU_CASES = {
    "T200-dims64-packed-bf16": (200, 1, (64, 64, 64), [[70, 0, 90, 40]], jnp.bfloat16, GPU_SMALL),
    "T128-N2-f32": (128, 2, (64, 64, 128), None, jnp.float32, GPU_SMALL),
    # tiny's head dims, below the 64-column tile: zero-padded by the wrapper.
    "T128-tiny-dims-padded-packed": (128, 2, (16, 8, 16), [[50, 78]], jnp.bfloat16, GPU_SMALL),
    "T136-real-dims-2-stages": (136, 2, (128, 64, 128), None, jnp.bfloat16,
                                _mla_attention_mgpu.Config(bwd_concurrent_steps=2)),
    "T136-real-dims-packed-default-tiles": (136, 1, (128, 64, 128), [[9, 8, 67, 52]],
                                            jnp.bfloat16, _mla_attention_mgpu.Config()),
    "T256-N2-fused-bwd": (256, 2, (64, 64, 64), None, jnp.bfloat16, GPU_SMALL_FUSED),
    "T256-N2-real-dims-fused-bwd-packed": (256, 2, (128, 64, 128), [[70, 0, 90, 96]],
                                           jnp.bfloat16, GPU_SMALL_FUSED),
}


def _run_gpu_case(name):
    T, N, dims, segment_lengths, dtype, config = GPU_CASES[name]
    args, do = _inputs(T, 1, T, N, *dims, dtype)
    seg = None if segment_lengths is None else _segments(T, segment_lengths)
    _check_against_reference("pallas_gpu", config, args, do, seg, tol=2e-2)


@pytest.fixture(scope="module")
def gpu_interpret_results():
    return gpu_interpret.run_worker(__file__)


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_mosaic_gpu_matches_reference(name, gpu_interpret_results):
    result = gpu_interpret.case_result(gpu_interpret_results, name)
    assert result == "ok", result


@pytest.mark.parametrize(
    "B, T, dtype, segment_lengths, tol",
    [
        (1, 200, jnp.float32, [[50, 0, 100, 50]], 1e-4),
        (1, 256, jnp.bfloat16, None, 2e-2),
    ],
)
def test_mosaic_tpu_matches_reference(B, T, dtype, segment_lengths, tol):
    args, do = _inputs(T + 1, B, T, 1, 64, 32, 48, dtype)
    seg = None if segment_lengths is None else _segments(T, segment_lengths)
    _check_against_reference("pallas_tpu", TPU_SMALL, args, do, seg, tol=tol)


def _benchmark_args(segmented, B=2, T=4096, N=128):
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    return (S((B, T, N, 128), bf), S((B, T, N, 64), bf), S((B, T, N, 128), bf),
            S((B, T, 64), bf), S((B, T, N, 128), bf),
            S((B, T), jnp.int32) if segmented else None)


def _grad_fn(config, interpret=False):
    def loss(*a):
        o = mla_attention(*a, scale=0.1, implementation="pallas_gpu", config=config,
                          interpret=interpret)
        return o.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=range(5))


@pytest.mark.parametrize("backward", ["split", "fused"])
@pytest.mark.parametrize("segmented", [False, True])
def test_mosaic_gpu_lowers_for_cuda_at_benchmark_shape(segmented, backward):
    """Forward and backward kernels pass Mosaic GPU's layout inference and SMEM budget for
    B=2, T=4096, N=128, dims 128/64/128 with the default tiles (lowering needs no GPU); the
    fused backward with its TMA reduce-add dQ path ("auto" off the interpreter)."""
    config = _mla_attention_mgpu.Config(backward=backward)
    lowered = jax.jit(_grad_fn(config)).trace(*_benchmark_args(segmented)).lower(
        lowering_platforms=("cuda",))
    calls = [line for line in lowered.as_text().splitlines()
             if "custom_call @mosaic_gpu" in line]
    # forward, dq, dk/dv; or forward and the fused kernel, whose dQ buffers are updated in place.
    assert len(calls) == (3 if backward == "split" else 2)
    assert ("output_operand_aliases" in calls[-1]) == (backward == "fused")


def _store_ops(jaxpr, kernel: str | None = None) -> list:
    """reduction_op of each SMEM -> GMEM copy traced in the Mosaic GPU kernel named `kernel`."""
    ops = []
    for eqn in jaxpr.eqns:
        inside = kernel is None or (eqn.primitive.name == "mpmd_map"
                                    and eqn.params["name"] == kernel)
        if kernel is None and eqn.primitive.name == "copy_smem_to_gmem":
            ops.append(eqn.params["reduction_op"])
        for sub in sub_jaxprs(eqn):
            ops += _store_ops(sub, None if inside else kernel)
    return ops


def test_fused_backward_dq_paths_differ_only_in_the_store():
    """The two dQ accumulations: on the GPU ("reduce") each per-block dQ tile goes to the
    [B, T, N, H] fp32 refs by TMA reduce-add; interpreted ("partial") by plain copies into a key
    block's slice. Apart from the three output stores (dk_nope, dv, dk_rope), every store of the
    fused kernel is a dQ store, and only the GPU path's reduce. Their arithmetic is the same code
    (_add_dq's one branch): the interpret cases above check it against the reference, and the
    reduce path lowers at the benchmark shape (test above)."""
    config = _mla_attention_mgpu.Config(backward="fused")
    args = [jnp.zeros(a.shape, a.dtype) for a in _benchmark_args(True, B=1, T=256, N=2)]
    name = "mla_attention_bwd_fused"
    on_gpu = _store_ops(jax.make_jaxpr(_grad_fn(config))(*args).jaxpr, name)
    interpreted = _store_ops(jax.make_jaxpr(_grad_fn(config, interpret=True))(*args).jaxpr, name)
    assert len(on_gpu) == len(interpreted) > 3
    assert on_gpu.count(None) == 3 and set(on_gpu) == {None, "add"}
    assert set(interpreted) == {None}


def test_fused_backward_config_errors():
    with pytest.raises(ValueError, match="interpreter lacks"):
        _mla_attention_mgpu.dq_accumulation(
            _mla_attention_mgpu.Config(backward="fused", dq_accumulation="reduce"), True)
    with pytest.raises(ValueError, match="is not 'split' or 'fused'"):
        _mla_attention_mgpu.Config(backward="fuse")
    with pytest.raises(ValueError, match="dq_accumulation"):
        _mla_attention_mgpu.Config(dq_accumulation="atomic")


def test_fused_backward_smem_predicate_at_its_edge():
    """Two query-block slots fit the fused kernel at DeepSeek-V3's dims, three do not: the
    predicate refuses three, and Mosaic's own lowering agrees."""
    def config(stages):
        return _mla_attention_mgpu.Config(backward="fused", fused_concurrent_steps=stages)

    assert _mla_attention_mgpu.unsupported(128, 64, 128, config=config(2)) is None
    reason = _mla_attention_mgpu.unsupported(128, 64, 128, config=config(3))
    assert reason is not None and "fused backward" in reason
    args = _benchmark_args(True, B=1, T=256, N=2)
    with pytest.raises(ValueError, match="fused backward"):
        jax.jit(_grad_fn(config(3))).trace(*args)
    bf = jnp.bfloat16
    q_hi = jax.ShapeDtypeStruct((1, 256 // _mla_attention_mgpu.DKV_TILE), jnp.int32)
    lse = jax.ShapeDtypeStruct((1, 2, 256), jnp.float32)
    raw = functools.partial(_mla_attention_mgpu._backward_fused_call, scale=0.1,
                            config=config(3), has_segments=True, interpret=False)
    raw_args = (*args[:5], jax.ShapeDtypeStruct(args[4].shape, bf), lse, lse, args[5], q_hi)
    with pytest.raises(Exception, match="exceeds available shared memory"):
        jax.jit(raw).trace(*raw_args).lower(lowering_platforms=("cuda",))


def test_cudnn_needs_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the cuDNN path runs (benchmarks/mla_attention.py checks it)")
    args, _ = _inputs(0, 1, 8, 1, 64, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        mla_attention(*args, scale=0.1, implementation="cudnn")


def test_unknown_implementation_is_rejected():
    args, _ = _inputs(0, 1, 8, 1, 64, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        mla_attention(*args, scale=0.1, implementation="flash")


if __name__ == "__main__" and gpu_interpret.WORKER_FLAG in sys.argv:
    gpu_interpret.worker_main(GPU_CASES, _run_gpu_case)


def test_save_kernels_policy_runs_the_forward_kernel_once():
    """Attention followed by a matmul on its output (as in the model), under remat: with
    "save_kernels" the traced forward + backward launch the forward kernel once, as without
    remat; with "full" twice. Traced only, for an H200 (interpret mode cannot be remat'ed)."""
    from dsv3_jax.model.layers import einsum_f32
    from dsv3_jax.model.transformer import KERNEL_RESIDUALS, REMAT_POLICIES

    args, _ = _inputs(0, 1, 128, 2, 128, 64, 128, jnp.bfloat16)
    w = jnp.ones((2 * 128, 8), jnp.bfloat16)

    def layer(*args):  # the output projection as the model's attention applies it
        o = mla_attention(*args, None, scale=0.1, implementation="pallas_gpu")
        return jnp.sum(einsum_f32("BTF,FD->BTD", o.reshape(1, 128, -1), w))

    def launches(policy=None):
        fn = layer if policy is None else jax.checkpoint(layer, policy=REMAT_POLICIES[policy])
        return kernel_launches(fn, *args)

    plain = launches()
    assert launches("save_kernels") == plain
    assert launches("full") == plain + 1
    # The output and log-sum-exp leave through an optimization barrier (see
    # pallas_kernels/residuals.py: XLA would otherwise run the kernel twice in a layer scan).
    assert named_value_sources(layer, *args, name=KERNEL_RESIDUALS) == (
        ["optimization_barrier"] * 2)
