"""Grouped (ragged) matmul over expert-sorted rows.

Legend: M rows (token-rows sorted by group), K contraction, N output, G groups.

  grouped_matmul(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> out[M, N]
  out[r] = lhs[r] @ rhs[g(r)], where rows [start_g, start_g + group_sizes[g]) belong to group g.
  Rows past sum(group_sizes) are zero in the output.

Implementations (pallas_kernels.implementations): "reference" (masked dense, tests only),
"xla" (`jax.lax.ragged_dot`), and our kernels, with a `jax.custom_vjp`: "pallas_gpu" (Mosaic
GPU, `_gmm_gpu`) and "pallas_tpu" (Mosaic TPU, `_gmm_tpu`); a bare "pallas" takes the default
backend's, and `interpret=True` runs either on the CPU. Backward: d_lhs = the same kernel
against the weights read transposed (d_lhs[M, K] = dout[M, N] @ rhs[g]^T) and d_rhs[G, K, N] =
the transposed kernel `tgmm` (per group, lhs^T @ dout).

Numerics: accumulation in fp32; the output is cast to `preferred_element_type` (default
lhs.dtype). The GPU kernels multiply 16-bit operands; fp32 operands are split into a bf16 high
and low part and the three significant products summed (bf16x3, about 2^-17 relative error).
The backward casts the cotangent to the operands' dtype before its matmuls (as mixed-precision
training does); d_lhs and d_rhs come out in lhs.dtype and rhs.dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _gmm_gpu, _gmm_tpu, implementations
from pallas_kernels.implementations import PALLAS, PALLAS_GPU, PALLAS_IMPLEMENTATIONS, PALLAS_TPU

IMPLEMENTATIONS = implementations.GROUPED_MATMUL


def group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[M] int32: the group of each row; G (one past the last group) for rows past the end."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """Plain-JAX grouped matmul: one masked dense matmul per group (O(G*M*K*N); tests only)."""
    out_dtype = preferred_element_type or lhs.dtype
    gid_m = group_ids(group_sizes, lhs.shape[0])
    onehot_mg = (gid_m[:, None] == jnp.arange(rhs.shape[0])[None, :]).astype(lhs.dtype)
    out_mn = jnp.einsum(
        "MK,MG,GKN->MN", lhs, onehot_mg, rhs, preferred_element_type=jnp.float32
    )
    return out_mn.astype(out_dtype)


def xla(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """`jax.lax.ragged_dot` (XLA's grouped matmul)."""
    out_dtype = preferred_element_type or lhs.dtype
    out = jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Pallas kernels: backend choice, tiling, dtype handling (no autodiff at this level).


@dataclasses.dataclass(frozen=True)
class GpuTuning:
    """Tiling of each GPU kernel variant; None picks a default from the shapes."""

    mm: _gmm_gpu.GmmConfig | None = None       # forward and d_lhs products
    swiglu: _gmm_gpu.GmmConfig | None = None   # fused gate/up projection + SwiGLU
    mm2: _gmm_gpu.GmmConfig | None = None      # fused d_x of the gate/up projections
    tgmm: _gmm_gpu.TgmmConfig | None = None    # weight gradients


@dataclasses.dataclass(frozen=True)
class PallasOptions:
    """Static options of the Pallas path: backend ("gpu" | "tpu"), interpret mode, tiling."""

    backend: str
    interpret: bool = False
    gpu: GpuTuning = dataclasses.field(default_factory=GpuTuning)
    tpu: _gmm_tpu.TpuConfig = dataclasses.field(default_factory=_gmm_tpu.TpuConfig)


def pallas_options(implementation: str = PALLAS, interpret: bool = False,
                   gpu_tuning: GpuTuning | None = None,
                   tpu_config: _gmm_tpu.TpuConfig | None = None) -> PallasOptions:
    """The options of "pallas_gpu" / "pallas_tpu"; a bare "pallas" takes the kernel of the
    default backend, read here (on a CPU backend it needs interpret=True and then runs the
    Mosaic GPU kernels)."""
    if implementation == PALLAS:
        platform = jax.default_backend()
        if platform not in ("gpu", "cuda", "tpu") and not interpret:
            raise ValueError(f"implementation='pallas' has no kernel for backend {platform!r} "
                             "(pass interpret=True to run the GPU kernels interpreted)")
        implementation = implementations.for_backend(platform)
    if implementation not in (PALLAS_GPU, PALLAS_TPU):
        raise ValueError(f"not a pallas implementation: {implementation!r}")
    return PallasOptions(backend=implementations.chip_of(implementation), interpret=interpret,
                         gpu=gpu_tuning or GpuTuning(),
                         tpu=tpu_config or _gmm_tpu.TpuConfig())


def _default_gmm_config(op: str, k: int) -> _gmm_gpu.GmmConfig:
    """CTA tile 128 x 256, from benchmarks/expert_dispatch.py's sweeps on one H200
    (benchmarks/RESULTS.md), each filling the 227 KiB of shared memory with pipeline stages and
    the epilogue's staging tiles (see `_gmm_gpu.gmm_smem_bytes`). For a short contraction
    (k <= 4096: the epilogue is a larger share of each tile) two 128 x 128 warpgroup tiles side
    by side along N measured faster, for a long one two 64 x 256 tiles stacked along M."""
    if op == "swiglu":  # two accumulators (gate, up) per warpgroup: 64 x 128 each
        return _gmm_gpu.GmmConfig(tile_m=64, tile_n=128, wg_dim="m", max_concurrent_steps=3,
                                  epi_slots=1)
    if op == "mm2":  # four operand tiles per step: half the K step keeps 4 stages
        return _gmm_gpu.GmmConfig(tile_m=64, tile_n=256, tile_k=32, wg_dim="m",
                                  max_concurrent_steps=4, epi_slots=1)
    if k <= 4096:
        return _gmm_gpu.GmmConfig(tile_m=128, tile_n=128, wg_dim="n", max_concurrent_steps=3,
                                  epi_slots=1)
    return _gmm_gpu.GmmConfig(tile_m=64, tile_n=256, wg_dim="m", max_concurrent_steps=3)


def _split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(x.dtype)).astype(jnp.bfloat16)


def _is_16bit(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2


def gmm(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array, *,
        op: str, rhs_layout: str, out_dtypes: Sequence, options: PallasOptions
        ) -> tuple[jax.Array, ...]:
    """One grouped-matmul kernel call (no autodiff); see `_gmm_gpu` for op and rhs_layout.

    lhs: [M, K] arrays; rhs: [G, K, N] ("kn") or [G, N, K] ("nk") arrays. Returns [M, N] arrays.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    dtype = jnp.result_type(*lhs, *rhs)
    lhs = [a.astype(dtype) for a in lhs]
    rhs = [b.astype(dtype) for b in rhs]
    if options.backend == "tpu":
        return _gmm_tpu.gmm(lhs, rhs, group_sizes, op=op, rhs_layout=rhs_layout,
                            out_dtypes=out_dtypes, cfg=options.tpu, interpret=options.interpret)
    if not _is_16bit(dtype):
        return _gmm_split_f32(lhs, rhs, group_sizes, op=op, rhs_layout=rhs_layout,
                              out_dtypes=out_dtypes, options=options)
    cfg = getattr(options.gpu, op) or _default_gmm_config(op, lhs[0].shape[1])
    with _gmm_gpu.interpret_context(options.interpret):
        return _gmm_gpu.gmm(lhs, rhs, group_sizes, op=op, rhs_layout=rhs_layout,
                            out_dtypes=out_dtypes, cfg=cfg, interpret=options.interpret)


def _gmm_split_f32(lhs, rhs, group_sizes, *, op, rhs_layout, out_dtypes, options):
    """fp32 operands on the bf16 GPU kernel: a@b ~ hi@hi + hi@lo + lo@hi (bf16x3)."""
    def mm(a, b):
        (a_hi, a_lo), (b_hi, b_lo) = _split_bf16(a), _split_bf16(b)
        (x,) = gmm([a_hi, a_hi], [b_hi, b_lo], group_sizes, op="mm2", rhs_layout=rhs_layout,
                   out_dtypes=[jnp.float32], options=options)
        (y,) = gmm([a_lo], [b_hi], group_sizes, op="mm", rhs_layout=rhs_layout,
                   out_dtypes=[jnp.float32], options=options)
        return x + y

    if op == "mm":
        vals = [mm(lhs[0], rhs[0])]
    elif op == "mm2":
        vals = [mm(lhs[0], rhs[0]) + mm(lhs[1], rhs[1])]
    else:  # swiglu
        gate, up = mm(lhs[0], rhs[0]), mm(lhs[0], rhs[1])
        vals = [jax.nn.silu(gate) * up, gate, up]
    return tuple(v.astype(d) for v, d in zip(vals, out_dtypes, strict=True))


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, out_dtype,
         options: PallasOptions) -> jax.Array:
    """Per-group lhs^T @ dout: [M, K], [M, N] -> [G, K, N] (zeros for empty groups)."""
    group_sizes = group_sizes.astype(jnp.int32)
    dtype = jnp.result_type(lhs, dout)
    lhs, dout = lhs.astype(dtype), dout.astype(dtype)
    if options.backend == "tpu":
        return _gmm_tpu.tgmm(lhs, dout, group_sizes, out_dtype=out_dtype, cfg=options.tpu,
                             interpret=options.interpret)
    if not _is_16bit(dtype):
        (a_hi, a_lo), (b_hi, b_lo) = _split_bf16(lhs), _split_bf16(dout)
        parts = [tgmm(a, b, group_sizes, out_dtype=jnp.float32, options=options)
                 for a, b in ((a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))]
        return (parts[0] + parts[1] + parts[2]).astype(out_dtype)
    cfg = options.gpu.tgmm or _gmm_gpu.TgmmConfig()
    with _gmm_gpu.interpret_context(options.interpret):
        return _gmm_gpu.tgmm(lhs, dout, group_sizes, out_dtype=out_dtype, cfg=cfg,
                             interpret=options.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_gmm(lhs, rhs, group_sizes, out_dtype, options):
    (out,) = gmm([lhs], [rhs], group_sizes, op="mm", rhs_layout="kn", out_dtypes=[out_dtype],
                 options=options)
    return out


def _pallas_gmm_fwd(lhs, rhs, group_sizes, out_dtype, options):
    return _pallas_gmm(lhs, rhs, group_sizes, out_dtype, options), (lhs, rhs, group_sizes)


def _pallas_gmm_bwd(out_dtype, options, res, ct_mn):
    lhs, rhs, group_sizes = res
    ct_mn = ct_mn.astype(jnp.result_type(lhs, rhs))
    with jax.named_scope("gmm_dlhs"):
        # rhs [G, K, N] read as "nk": output columns K, contraction N.
        (d_lhs,) = gmm([ct_mn], [rhs], group_sizes, op="mm", rhs_layout="nk",
                       out_dtypes=[lhs.dtype], options=options)
    with jax.named_scope("gmm_drhs"):
        d_rhs = tgmm(lhs, ct_mn, group_sizes, out_dtype=rhs.dtype, options=options)
    return d_lhs, d_rhs, None


_pallas_gmm.defvjp(_pallas_gmm_fwd, _pallas_gmm_bwd)


def pallas(lhs, rhs, group_sizes, *, preferred_element_type=None, implementation=PALLAS,
           interpret=False, gpu_tuning=None):
    """Our kernels (see module docstring), differentiable w.r.t. lhs and rhs."""
    options = pallas_options(implementation, interpret, gpu_tuning)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    with jax.named_scope("grouped_matmul_pallas"):
        return _pallas_gmm(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype, options)


def grouped_matmul(lhs, rhs, group_sizes, *, implementation="xla", preferred_element_type=None,
                   interpret: bool = False, gpu_tuning: GpuTuning | None = None) -> jax.Array:
    """Dispatch to one implementation of the grouped matmul (see module docstring).

    lhs [M, K], rhs [G, K, N], group_sizes [G] int -> [M, N] in preferred_element_type
    (default lhs.dtype). `interpret` and `gpu_tuning` only apply to the pallas implementations.
    """
    if implementation in PALLAS_IMPLEMENTATIONS:
        return pallas(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                      implementation=implementation, interpret=interpret,
                      gpu_tuning=gpu_tuning)
    impls = {"reference": reference, "xla": xla}
    if implementation not in impls:
        raise ValueError(
            f"grouped_matmul implementation {implementation!r} is not one of "
            f"{list(IMPLEMENTATIONS)}"
        )
    return impls[implementation](
        lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
