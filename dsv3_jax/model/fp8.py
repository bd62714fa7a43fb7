"""FP8 training with DeepSeek-V3's fine-grained recipe: the plain-JAX reference.

Legend: M rows (tokens, or token-rows sorted by expert), K contraction, N output columns,
E experts, C 128-wide chunks of a dimension.

What the recipe is, and where each detail comes from:
  * E4M3 (`float8_e4m3fn`, max 448) for the inputs of all three GEMMs of a linear layer: the
    forward (Fprop), the input gradient (Dgrad) and the weight gradient (Wgrad); no E5M2 for
    gradients ("mantissa over exponents"). Paper section 3.3.1 and Figure 6, section 3.3.2.
  * Scales computed online from the maximum absolute value of each tile: 1x128 tiles (one token,
    128 channels) for activations and output gradients, 128x128 blocks for weights. Paper
    section 3.3.2 and Figure 7 (a); the same layout as the released FP8 checkpoint
    (`weight_scale_inv`, 128x128) and DeepGEMM's `per_token_cast_to_fp8` /
    `per_block_cast_to_fp8`.
  * Accumulation promoted to fp32 every 128 elements of K: each chunk's partial product is
    multiplied by its two scales and added into fp32 (paper section 3.3.2, Figure 7 (b):
    N_C = 128; DeepGEMM's fp8 GEMMs do it on each 128-wide K block). `scaled_matmul` below is
    that arithmetic, written out.
  * The weight gradient contracts over tokens, so its operands are quantized along M instead:
    128x1 tiles (128 tokens, one channel) of the stored activation (dequantized, transposed,
    re-quantized, as paper section 3.5.2 describes the current workflow) and of the output
    gradient. For routed experts the 128-row tiles start at each expert's first row, so no tile
    mixes experts (DeepGEMM's k-grouped Wgrad contracts per group).
  * Outputs: Fprop and Dgrad in the caller's precision (bf16 for a bf16 model), Wgrad in fp32
    (Figure 6), cast to the weight's dtype only at the custom_vjp boundary. The forward keeps the
    FP8 activation and its scales for the backward (section 3.3.3: activations cached in FP8
    for the Wgrad), not the bf16 one.
  * Kept in higher precision (section 3.3.1): embedding, output head, MoE router, norms, the
    attention core (softmax(QK^T)V), master weights, weight gradients, optimizer state; the
    model applies `linear` / `grouped_linear` only to the attention projections, the dense
    FFN and the shared and routed experts.

Scales are NOT rounded to powers of two (`POW2_SCALES = False`): s = amax / 448 in fp32, as the
paper's general recipe (section 3.3.2), DeepGEMM on Hopper (fp32 scales) and the released
DeepSeek-V3 checkpoint (fp32 `weight_scale_inv`) have it. Power-of-two scales (s rounded up to
2^ceil(log2(amax / 448)), `pow2=True`; the paper uses them only for the activations it caches
and sends in FP8, section 3.3.3, DeepSeek's later UE8M0 checkpoints everywhere) make q * s exact
in bf16, but map the tile maximum into (224, 448] instead of onto 448, so the tile's largest
values, which dominate the GEMM's error, lose up to one bit. Measured (relative L2 error of a
[256, 1024] x [1024, 512] GEMM against float64, this module, CPU): N(0, 1) activations 0.0374
pow2 vs 0.0368 exact; Student-t (3 dof) 0.0374 vs 0.0346; 1 channel in 97 scaled by 30 (outlier
channels) 0.0373 vs 0.0287. They do not help, so they are off; `test_fp8.py` keeps the
comparison as a test.

Backends: by default the recipe runs as quantize-dequantize through XLA (emulation): the
operands are rounded exactly as they would be for FP8 tensor cores, dequantized to fp32 (q * s:
one fp32 rounding, 2^-24 relative) and multiplied with fp32 accumulation, so the result equals
`scaled_matmul`'s up to fp32 summation order. Two paths multiply the same E4M3 operands on FP8
hardware instead:
  * `linear(..., implementation="xla_fp8")`: XLA's own FP8 dot_general (E4M3 x E4M3 -> fp32)
    on each 128-wide K chunk, the chunks batched, their fp32 partials scaled and summed
    (`chunked_fp8_matmul`); all three GEMMs (the weight gradient on 128-token chunks).
  * `linear(..., implementation="pallas_gpu")` and `grouped_linear(..., "pallas_gpu")`: the
    forward and the input gradient on the Mosaic GPU FP8 kernel (`pallas_kernels._gmm_fp8_gpu`:
    `matmul_fp8` dense, `gmm_fp8` grouped), the weight gradient still emulated (grouped: on the
    bf16 transposed grouped kernel).
The model picks the dense linears' path with `implementations.fp8_linear` (the GPU choice,
`implementations.FP8_LINEAR_GPU`, where the resolved model runs GPU kernels), and the routed
experts' with moe_impl; benchmarks/fp8_gemm.py measures both paths. The first trace of an FP8
layer logs its path once.

Deviations from the paper: the linear after attention (wo) caches its input in E4M3 like every
other, not the paper's E5M6; SwiGLU's inputs are not cached in FP8 (the routed experts keep their
FP8 input rows, gate and up in fp32 as autodiff has them); the MTP projection (eh_proj) stays
bf16 (dsv3_jax/model/transformer.py, not switched).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import _gmm_fp8_gpu, residuals
from pallas_kernels import grouped_matmul as gmm_lib

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128  # tile length along the quantized dimension; weights use TILE x TILE blocks
POW2_SCALES = False

log = logging.getLogger("dsv3_jax.fp8")


_PATHS = {
    "xla": "quantize-dequantize emulation through XLA (operands rounded as for FP8 tensor "
           "cores, then multiplied in fp32)",
    "xla_fp8": "XLA's FP8 dot per 128-wide K chunk, scaled and summed in fp32",
    "pallas_gpu": "the Mosaic GPU FP8 kernel (forward and input gradient; weight gradient "
                  "emulated)",
}


@functools.cache
def log_path(layer: str, implementation: str) -> None:
    """Says once per process and layer kind how its FP8 GEMMs run."""
    log.info("model.fp8='blockwise': %s GEMMs in E4M3 run as %s", layer, _PATHS[implementation])


# ---------------------------------------------------------------------------------------------
# Quantization.


def scales_from_amax(amax: jax.Array, pow2: bool = POW2_SCALES) -> jax.Array:
    """fp32 scales s with amax / s <= 448 (up to one rounding, which the cast's clip absorbs):
    amax * fp32(1 / 448), rounded up to a power of two with `pow2`; 1 for an all-zero tile (its
    values quantize to 0 whatever the scale). A product, not amax / 448, because XLA turns a
    division by a constant into that product on some backends, which would make the scales
    backend-dependent in their last bit."""
    amax = amax.astype(jnp.float32)
    scale = jnp.where(amax > 0, amax * jnp.float32(1 / E4M3_MAX), 1.0)
    if pow2:
        mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [.5, 1)
        scale = jnp.ldexp(jnp.float32(1), exponent - (mantissa == 0.5).astype(exponent.dtype))
    return scale


def _to_e4m3(x_scaled: jax.Array) -> jax.Array:
    # The clip only catches amax / (amax / 448) rounding to just above 448 (which E4M3 without
    # infinities would turn into NaN); rounding is to nearest, ties to even.
    return jnp.clip(x_scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_tiles(x: jax.Array, axis: int = -1, tile: int = TILE, pow2: bool = POW2_SCALES
                   ) -> tuple[jax.Array, jax.Array]:
    """1 x `tile` tiles along `axis`: (q in E4M3, same shape as x; fp32 scales with `axis` of
    length cdiv(x.shape[axis], tile)). x ~ q * s; a partial last tile is the remaining values."""
    axis = axis % x.ndim
    x_last = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
    n = x_last.shape[-1]
    chunks = -(-n // tile)
    padded = jnp.pad(x_last, [(0, 0)] * (x.ndim - 1) + [(0, chunks * tile - n)])
    tiles = padded.reshape(*x_last.shape[:-1], chunks, tile)
    scale = scales_from_amax(jnp.max(jnp.abs(tiles), axis=-1), pow2)
    q = _to_e4m3(tiles / scale[..., None]).reshape(padded.shape)[..., :n]
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(scale, -1, axis)


def dequantize_tiles(q: jax.Array, scale: jax.Array, axis: int = -1, tile: int = TILE,
                     dtype=jnp.float32) -> jax.Array:
    """q * s for `quantize_tiles`' output, in `dtype` (exact in bf16 with power-of-two s)."""
    axis = axis % q.ndim
    s = jnp.repeat(scale, tile, axis=axis, total_repeat_length=scale.shape[axis] * tile)
    s = jax.lax.slice_in_dim(s, 0, q.shape[axis], axis=axis)
    return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_blocks(w: jax.Array, tile: int = TILE, pow2: bool = POW2_SCALES
                    ) -> tuple[jax.Array, jax.Array]:
    """tile x tile blocks over the last two axes of w [..., K, N]: (q [..., K, N] E4M3, fp32
    scales [..., cdiv(K, tile), cdiv(N, tile)]); leading axes (experts) are separate matrices."""
    *lead, K, N = w.shape
    kc, nc = -(-K // tile), -(-N // tile)
    padded = jnp.pad(w.astype(jnp.float32),
                     [(0, 0)] * len(lead) + [(0, kc * tile - K), (0, nc * tile - N)])
    blocks = padded.reshape(*lead, kc, tile, nc, tile)
    scale = scales_from_amax(jnp.max(jnp.abs(blocks), axis=(-3, -1)), pow2)
    q = _to_e4m3(blocks / scale[..., :, None, :, None]).reshape(padded.shape)
    return q[..., :K, :N], scale


def dequantize_blocks(q: jax.Array, scale: jax.Array, tile: int = TILE,
                      dtype=jnp.float32) -> jax.Array:
    """q * s for `quantize_blocks`' output, in `dtype`."""
    K, N = q.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale, tile, axis=-2), tile, axis=-1)[..., :K, :N]
    return (q.astype(jnp.float32) * s).astype(dtype)


def group_row_tiles(group_sizes: jax.Array, num_rows: int, tile: int = TILE
                    ) -> tuple[jax.Array, int]:
    """For rows sorted by group: the tile of each row ([M] int32) when each group's rows are cut
    into `tile`-row tiles from the group's first row, and the number of tiles (static bound
    cdiv(M, tile) + G + 1; rows past sum(group_sizes) form tiles of their own)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    sizes_x = jnp.concatenate([sizes, (num_rows - ends[-1])[None]])  # the tail as a last group
    starts_x = jnp.cumsum(sizes_x) - sizes_x
    first_tile_x = jnp.cumsum(-(-sizes_x // tile)) - (-(-sizes_x // tile))
    row = jnp.arange(num_rows, dtype=jnp.int32)
    g = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)
    tile_m = first_tile_x[g] + (row - starts_x[g]) // tile
    return tile_m, -(-num_rows // tile) + group_sizes.shape[0] + 1


def quantize_group_rows(x_mk: jax.Array, group_sizes: jax.Array, tile: int = TILE,
                        pow2: bool = POW2_SCALES) -> tuple[jax.Array, jax.Array, jax.Array]:
    """128x1 tiles along the rows of each group (the Wgrad operands of the routed experts):
    (q [M, K] E4M3, fp32 scales [tiles, K], the tile of each row [M])."""
    tile_m, n_tiles = group_row_tiles(group_sizes, x_mk.shape[0], tile)
    x32 = x_mk.astype(jnp.float32)
    amax = jax.ops.segment_max(jnp.abs(x32), tile_m, num_segments=n_tiles,
                               indices_are_sorted=True)
    scale = scales_from_amax(jnp.maximum(amax, 0.0), pow2)  # empty tiles: -inf -> 0 -> 1
    return _to_e4m3(x32 / scale[tile_m]), scale, tile_m


# ---------------------------------------------------------------------------------------------
# The GEMM with 128-wide promotion, written out (the reference of the FP8 kernels).


def scaled_matmul(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, *,
                  tile: int = TILE, out_dtype=jnp.float32) -> jax.Array:
    """sum over K chunks c of (qa[:, c] @ qb[c, :]) * sa[:, c, None] * sb[None, c, :], in fp32.

    qa [M, K], qb [K, N] in E4M3; sa [M, C] one scale per row and K chunk; sb [C, N] one per K
    chunk and column (a weight's 128x128 block scales repeated along N). Each chunk's partial
    product is exact in fp32 up to its own summation (E4M3 x E4M3 products have 8 significant
    bits), as on the tensor cores with promotion every 128 (DeepGEMM), which accumulate a chunk
    in fewer bits; the chunks are added in fp32.
    """
    M, K = qa.shape
    C = -(-K // tile)
    pad = C * tile - K
    a_mck = jnp.pad(qa.astype(jnp.float32), [(0, 0), (0, pad)]).reshape(M, C, tile)
    b_ckn = jnp.pad(qb.astype(jnp.float32), [(0, pad), (0, 0)]).reshape(C, tile, -1)
    partial_mcn = jnp.einsum("MCk,CkN->MCN", a_mck, b_ckn,
                             precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("MCN,MC,CN->MN", partial_mcn, sa.astype(jnp.float32),
                     sb.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(out_dtype)


def block_scales_along_n(sb_cn: jax.Array, n: int, tile: int = TILE) -> jax.Array:
    """128x128 block scales [C, cdiv(N, 128)] repeated to one per column: [C, N]."""
    return jnp.repeat(sb_cn, tile, axis=-1)[..., :n]


# ---------------------------------------------------------------------------------------------
# The FP8 linear layer (custom_vjp: all three GEMMs on E4M3 inputs).


def _compute_dtype():
    # q * s is exact in bf16 only with power-of-two scales; otherwise the GEMM runs in fp32.
    return jnp.bfloat16 if POW2_SCALES else jnp.float32


def _dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# What `linear` runs: "xla" the quantize-dequantize emulation; "xla_fp8" XLA's own FP8 dot on
# each 128-wide K chunk (`chunked_fp8_matmul`: on the GPU, cuBLAS's FP8 GEMM), all three GEMMs;
# "pallas_gpu" the Mosaic GPU FP8 kernel (`_gmm_fp8_gpu.matmul_fp8`) for the forward and the
# input gradient, the weight gradient emulated (as `grouped_linear`'s).
LINEAR_IMPLEMENTATIONS = ("xla", "xla_fp8", "pallas_gpu")
# `chunked_fp8_matmul` forms at most this many bytes of fp32 chunk partials at once.
XLA_FP8_PARTIAL_BYTES = 1 << 30


def chunked_fp8_matmul(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, *,
                       tile: int = TILE, out_dtype=jnp.float32,
                       partial_bytes: int = XLA_FP8_PARTIAL_BYTES) -> jax.Array:
    """`scaled_matmul` (same arguments) with each K chunk's product an E4M3 x E4M3 dot_general
    with fp32 output (XLA's FP8 GEMM): the chunks batched ([c, M, 128] x [c, 128, N] -> fp32
    [c, M, N] partials), scaled by their two scales and summed; as many chunks at a time as fit
    `partial_bytes` (a scan over the groups of chunks when not all fit). The same products as
    `scaled_matmul`, fp32 sums in another order."""
    M, K = qa.shape
    N = qb.shape[1]
    C = -(-K // tile)
    per_step = max(1, min(C, partial_bytes // (4 * M * N)))
    steps = -(-C // per_step)
    pad_c = steps * per_step - C  # whole zero chunks (scale 0) so the groups are even
    pad_k = (C + pad_c) * tile - K
    a = jnp.pad(qa, [(0, 0), (0, pad_k)]).reshape(M, steps, per_step, tile)
    a = a.transpose(1, 2, 0, 3)  # [steps, per_step, M, tile]
    b = jnp.pad(qb, [(0, pad_k), (0, 0)]).reshape(steps, per_step, tile, N)
    s_a = jnp.pad(sa.astype(jnp.float32), [(0, 0), (0, pad_c)]).T.reshape(steps, per_step, M)
    s_b = jnp.pad(sb.astype(jnp.float32), [(0, pad_c), (0, 0)]).reshape(steps, per_step, N)

    def group(acc, xs):
        a_cmk, b_ckn, sa_cm, sb_cn = xs
        part_cmn = jax.lax.dot_general(a_cmk, b_ckn, (((2,), (1,)), ((0,), (0,))),
                                       preferred_element_type=jnp.float32)
        return acc + jnp.sum(part_cmn * sa_cm[:, :, None] * sb_cn[:, None, :], axis=0), None

    zeros = jnp.zeros((M, N), jnp.float32)
    if steps == 1:
        out, _ = group(zeros, (a[0], b[0], s_a[0], s_b[0]))
    else:
        out, _ = jax.lax.scan(group, zeros, (a, b, s_a, s_b))
    return out.astype(out_dtype)


def linear(x: jax.Array, w_kn: jax.Array, out_dtype=None, *, implementation: str = "xla",
           interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in out_dtype (default x.dtype), with E4M3 operands in
    the forward and in both gradients (see the module docstring); fp32 accumulation.

    implementation (LINEAR_IMPLEMENTATIONS): "xla" quantize-dequantize emulation; "xla_fp8"
    XLA's FP8 dot per 128-wide K chunk, all three GEMMs; "pallas_gpu" the forward and the input
    gradient on the Mosaic GPU FP8 kernel (`interpret=True` runs it on the CPU), the weight
    gradient emulated. All form the same quantized products as `scaled_matmul`."""
    if implementation not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"fp8.linear implementation {implementation!r} is not one of "
                         f"{LINEAR_IMPLEMENTATIONS}")
    log_path("linear", implementation)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x_mk = x.reshape(-1, x.shape[-1])
    y_mn = _linear(x_mk, w_kn, out_dtype, jnp.dtype(x.dtype), jnp.dtype(w_kn.dtype),
                   implementation, interpret)
    return y_mn.reshape(*x.shape[:-1], w_kn.shape[-1])


def _dense_gemm(q, s, qw_kn, sw, out_dtype, implementation, interpret, transpose_w=False):
    """rows (q [M, K'] in 1x128 tiles along K', scales s [M, C]) @ the weight (blocks qw [K, N],
    sw [K/128, N/128]), read transposed ([N, K]: K' = N) with transpose_w: [M, N] (or [M, K])
    in out_dtype."""
    if implementation == "pallas_gpu":
        # The kernel reads its weight K'-major: [N, K] for the forward, [K, N] as stored for the
        # transposed product.
        qb = qw_kn if transpose_w else qw_kn.T
        sb = sw.T if transpose_w else sw
        return _gmm_fp8_gpu.matmul_fp8(q, s.T, qb, sb, out_dtype=out_dtype, interpret=interpret)
    if transpose_w:
        qw_kn, sw = qw_kn.T, sw.T
    if implementation == "xla_fp8":
        return chunked_fp8_matmul(q, s, qw_kn, block_scales_along_n(sw, qw_kn.shape[1]),
                                  out_dtype=out_dtype)
    dt = _compute_dtype()
    return _dot(dequantize_tiles(q, s, axis=1, dtype=dt), dequantize_blocks(qw_kn, sw, dtype=dt),
                "MK,KN->MN").astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _linear(x_mk, w_kn, out_dtype, x_dtype, w_dtype, implementation, interpret):
    return _linear_fwd(x_mk, w_kn, out_dtype, x_dtype, w_dtype, implementation, interpret)[0]


def _linear_fwd(x_mk, w_kn, out_dtype, x_dtype, w_dtype, implementation, interpret):
    del x_dtype, w_dtype
    qx, sx = quantize_tiles(x_mk, axis=1)  # 1x128: per token, 128 channels of K
    qw, sw = quantize_blocks(w_kn)
    y = _dense_gemm(qx, sx, qw, sw, out_dtype, implementation, interpret)
    # The FP8 activation is what the backward keeps (named: "save_kernels" saves it under remat).
    qx, sx = residuals.saveable(qx, sx)
    return y, (qx, sx, qw, sw)


def _linear_bwd(out_dtype, x_dtype, w_dtype, implementation, interpret, res, dy_mn):
    qx, sx, qw, sw = res
    # Dgrad: dy in 1x128 tiles along N (its contraction), the weight's blocks read transposed.
    qdy, sdy = quantize_tiles(dy_mn, axis=1)
    dx = _dense_gemm(qdy, sdy, qw, sw, x_dtype, implementation, interpret, transpose_w=True)
    # Wgrad: both operands re-quantized in 128x1 tiles along M (the contraction).
    x_deq = dequantize_tiles(qx, sx, axis=1)
    qxt, sxt = quantize_tiles(x_deq, axis=0)
    qdyt, sdyt = quantize_tiles(dy_mn, axis=0)
    if implementation == "xla_fp8":  # [K, M] @ [M, N]: 128-token chunks of the contraction
        dw = chunked_fp8_matmul(qxt.T, sxt.T, qdyt, sdyt)
    else:
        dt = _compute_dtype()
        dw = _dot(dequantize_tiles(qxt, sxt, axis=0, dtype=dt),
                  dequantize_tiles(qdyt, sdyt, axis=0, dtype=dt), "MK,MN->KN")
    return dx, dw.astype(w_dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


# ---------------------------------------------------------------------------------------------
# The FP8 grouped linear of the routed experts.


def grouped_linear(x_mk: jax.Array, w_ekn: jax.Array, group_sizes: jax.Array,
                   out_dtype=jnp.float32, *, implementation: str = "xla",
                   interpret: bool = False) -> jax.Array:
    """Rows sorted by expert [M, K] @ w[e] [K, N] -> [M, N] (rows past sum(group_sizes): 0),
    with E4M3 operands in all three GEMMs: rows in 1x128 tiles, each expert's weight in 128x128
    blocks, and for the weight gradient 128-row tiles inside each expert's rows.

    implementation "xla": quantize-dequantize emulation (`jax.lax.ragged_dot`); "pallas_gpu":
    the forward and the input gradient on the FP8 tensor cores (`pallas_kernels._gmm_fp8_gpu`,
    `interpret=True` runs it on the CPU), the weight gradient still emulated (its quantized
    operands multiplied by the bf16 transposed grouped kernel, as bf16x3).
    """
    if implementation not in ("xla", "pallas_gpu"):
        raise ValueError(f"grouped_linear implementation {implementation!r} is not one of "
                         "('xla', 'pallas_gpu')")
    log_path("grouped_linear", implementation)
    return _grouped(x_mk, w_ekn, group_sizes.astype(jnp.int32), jnp.dtype(out_dtype),
                    jnp.dtype(x_mk.dtype), jnp.dtype(w_ekn.dtype), implementation, interpret)


def _ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def _grouped_gemm(q, s, qw_ekn, sw_ekn, group_sizes, out_dtype, implementation, interpret,
                  transpose_w=False):
    """rows (q [M, K'] in 1x128 tiles along K', scales s [M, C]) @ the expert weights (blocks
    qw [E, K, N], sw [E, K/128, N/128]), read transposed ([E, N, K]: K' = N) with
    transpose_w: [M, N] (or [M, K]) in out_dtype."""
    if implementation == "pallas_gpu":
        # The kernel reads its weight K'-major: [E, N, K] for the forward, [E, K, N] as stored
        # for the transposed product.
        qb = qw_ekn if transpose_w else jnp.swapaxes(qw_ekn, 1, 2)
        sb = jnp.swapaxes(sw_ekn, 1, 2) if transpose_w else sw_ekn
        return _gmm_fp8_gpu.gmm_fp8(q, s.T, qb, sb, group_sizes, out_dtype=out_dtype,
                                    interpret=interpret)
    dt = _compute_dtype()
    w = dequantize_blocks(qw_ekn, sw_ekn, dtype=dt)
    if transpose_w:
        w = jnp.swapaxes(w, 1, 2)
    return _ragged(dequantize_tiles(q, s, axis=1, dtype=dt), w, group_sizes).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _grouped(x_mk, w_ekn, group_sizes, out_dtype, x_dtype, w_dtype, implementation, interpret):
    return _grouped_fwd(x_mk, w_ekn, group_sizes, out_dtype, x_dtype, w_dtype, implementation,
                        interpret)[0]


def _grouped_fwd(x_mk, w_ekn, group_sizes, out_dtype, x_dtype, w_dtype, implementation,
                 interpret):
    del x_dtype, w_dtype
    qx, sx = quantize_tiles(x_mk, axis=1)
    qw, sw = quantize_blocks(w_ekn)
    y = _grouped_gemm(qx, sx, qw, sw, group_sizes, out_dtype, implementation, interpret)
    qx, sx = residuals.saveable(qx, sx)
    return y, (qx, sx, qw, sw, group_sizes)


def _grouped_bwd(out_dtype, x_dtype, w_dtype, implementation, interpret, res, dy_mn):
    qx, sx, qw, sw, group_sizes = res
    qdy, sdy = quantize_tiles(dy_mn, axis=1)
    dx = _grouped_gemm(qdy, sdy, qw, sw, group_sizes, x_dtype, implementation, interpret,
                       transpose_w=True)
    qxt, sxt, tile_m = quantize_group_rows(dequantize_tiles(qx, sx, axis=1), group_sizes)
    qdyt, sdyt, _ = quantize_group_rows(dy_mn, group_sizes)
    xt = qxt.astype(jnp.float32) * sxt[tile_m]
    dyt = qdyt.astype(jnp.float32) * sdyt[tile_m]
    # Per expert, x[rows of e]^T @ dy[rows of e] (fp32): on the GPU the bf16 transposed grouped
    # kernel (fp32 operands as bf16x3, 2^-17 relative: XLA's ragged_dot transpose would
    # materialize an [M, E, K] array); elsewhere the transpose of XLA's ragged product.
    if implementation == "pallas_gpu":
        dw = gmm_lib.tgmm(xt, dyt, group_sizes, out_dtype=jnp.float32,
                          options=gmm_lib.pallas_options("pallas_gpu", interpret))
    else:
        _, vjp = jax.vjp(lambda w: _ragged(xt, w, group_sizes),
                         jnp.zeros(qw.shape, jnp.float32))
        (dw,) = vjp(dyt)
    return dx, dw.astype(w_dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def experts_swiglu(x_sorted_md: jax.Array, group_sizes_e: jax.Array, w_gate_edf: jax.Array,
                   w_up_edf: jax.Array, w_down_efd: jax.Array, *, implementation: str = "xla",
                   interpret: bool = False) -> jax.Array:
    """The routed experts' SwiGLU on sorted rows with the three grouped GEMMs in FP8: [M, D] ->
    fp32 [M, D]; the same contract as pallas_kernels.expert_dispatch.experts_swiglu.
    `implementation` as `grouped_linear`'s."""
    gmm = functools.partial(grouped_linear, group_sizes=group_sizes_e,
                            implementation=implementation, interpret=interpret)
    gate_mf = gmm(x_sorted_md, w_gate_edf)
    up_mf = gmm(x_sorted_md, w_up_edf)
    h_mf = (jax.nn.silu(gate_mf) * up_mf).astype(x_sorted_md.dtype)
    return gmm(h_mf, w_down_efd)
