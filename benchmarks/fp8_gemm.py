"""FP8 GEMMs on the H200: our block-scaled FP8 grouped GEMM vs XLA's FP8 dot vs the bf16 kernel.

  python -m benchmarks.fp8_gemm [--shapes 0,1,2,3] [--iters 10] [--dry-run]
  python -m benchmarks.fp8_gemm --dense [--shapes 0,1,2,3,4] [--iters 10] [--dry-run]

For each (G, M, K, N), one process prints TFLOP/s (2*M*K*N useful FLOPs per call) of
  fp8 pallas      pallas_kernels._gmm_fp8_gpu.gmm_fp8: E4M3 operands, 1x128 row scales, 128x128
                  weight-block scales, fp32 promotion every 128 of K (DeepSeek-V3 section 3.3),
                  bf16 out; operands quantized beforehand (not timed)
  fp8 xla dot     jax.lax.dot_general on float8_e4m3fn [M, K] x [K, N] with fp32 out and one
                  scale per tensor applied after (what XLA/cuBLAS reach for a dense FP8 GEMM of
                  the same size: the FP8 ceiling, without block scales or groups)
  scaled_matmul   jax.nn.scaled_matmul with the same 1x128 / 128x128 scales, dense [M, K] x
                  group 0's [K, N] (cuDNN's block-scaled path on Blackwell; elsewhere whatever
                  XLA makes of its dequantize-and-dot definition)
  bf16 pallas     our bf16 grouped GEMM (grouped_matmul, implementation="pallas")
  bf16 xla        jax.lax.ragged_dot in bf16
and fp8 fwd+dgrad of `dsv3_jax.model.fp8.grouped_linear` (quantization included) beside the
bf16 kernel's forward+d_lhs. Every FP8 output is checked first: the kernel against the
quantize-dequantize emulation on the same operands (relative L2 < 4e-3: the same products, fp32
sums in another order, and the kernel's bf16 output rounding, about 1.7e-3; the emulation runs
its fp32 ragged_dot at HIGHEST precision), and against
the unquantized fp32 product (about 0.037 expected: E4M3 rounding of both operands).

--dense: the dense FP8 linears (fp8.linear: attention projections, dense FFN, shared experts) at
DeepSeek-V3's shapes (DENSE_SHAPES, M = 16384 tokens), TFLOP/s of
  fp8 pallas      pallas_kernels._gmm_fp8_gpu.matmul_fp8 (the grouped kernel, one group), bf16 out
  xla_fp8         fp8.chunked_fp8_matmul: XLA's E4M3 dot_general per 128-wide K chunk (batched),
                  fp32 partials scaled by the two scales and summed, bf16 out
  fp8 xla dot     one E4M3 dot_general over all of K, one scale per tensor (the FP8 ceiling)
  bf16 xla        jnp.dot in bf16, fp32 accumulation
(operands quantized beforehand, not timed) and of a whole FP8 linear's forward + both gradients
(6*M*K*N FLOPs, quantization included): fp8.linear with implementation "pallas_gpu", "xla_fp8",
"xla" (emulation) beside the bf16 dot's. Checked first on the device against fp8.scaled_matmul
on the same operands (its first 1024 rows: the reference forms [rows, K/128, N] partials):
relative L2 < 4e-3 for bf16 outputs (one bf16 rounding, fp32 sums in another order).
The faster of "fp8 pallas" and "xla_fp8" is what dsv3_jax.model.implementations.FP8_LINEAR_GPU
should name.
--dry-run: tiny shapes, the kernels interpreted on the CPU (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model import fp8
from pallas_kernels import _gmm_fp8_gpu as k8
from pallas_kernels import grouped_matmul as gm

# DeepSeek-V3's expert GEMMs (gate/up: K=7168 -> N=2048, down: 2048 -> 7168; 32 experts of 256
# per device at EP=8) and `small`'s (64 experts, D 2048, F 1024, 8 x 4096 token-rows).
SHAPES = [(32, 65536, 7168, 2048), (32, 65536, 2048, 7168), (64, 32768, 2048, 1024),
          (64, 32768, 1024, 2048)]
DRY_SHAPES = [(3, 256, 256, 256)]
# DeepSeek-V3's dense FP8 linears, M = 16384 tokens (M, K, N): q_a (7168 -> 1536), kv_a
# (7168 -> 576), q_b (1536 -> 128 x 192), wo (128 x 128 -> 7168), dense FFN up/gate
# (7168 -> 18432), dense FFN down (18432 -> 7168); the shared expert is 7168 -> 2048 -> 7168.
DENSE_SHAPES = [(16384, 7168, 1536), (16384, 7168, 576), (16384, 1536, 24576),
                (16384, 16384, 7168), (16384, 7168, 18432), (16384, 18432, 7168),
                (16384, 7168, 2048)]
DRY_DENSE_SHAPES = [(200, 384, 320)]
CHECK_ROWS = 1024


def median_time(fn, *args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def group_sizes(G: int, M: int, seed: int = 0) -> jnp.ndarray:
    """Uneven Dirichlet sizes summing to M, one group empty."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(G) * 4)
    w[0] = 0
    sizes = np.floor(w / w.sum() * M).astype(np.int32)
    sizes[np.argmax(sizes)] += M - sizes.sum()
    return jnp.asarray(sizes)


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def xla_fp8_rows(qa, sa, qb_gnk, sb, flops: float, timing: dict,
                 interpret: bool) -> dict[str, float | str]:
    """XLA's own FP8 paths on the same operands: a dense FP8 dot_general (one weight, the same
    FLOPs) and jax.nn.scaled_matmul with the recipe's scales, where this JAX has it."""
    row: dict[str, float | str] = {}
    N = qb_gnk.shape[1]
    qx_dense, qw_dense = qa, qb_gnk[0]  # [M, K], [N, K]: one weight, the same FLOPs dense
    scale_a, scale_b = jnp.float32(1.3), jnp.float32(0.7)

    @jax.jit
    def xla_fp8(a, b):
        y = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * (scale_a * scale_b)).astype(jnp.bfloat16)

    try:
        row["fp8 xla dot"] = flops / median_time(xla_fp8, qx_dense, qw_dense, **timing)
    except Exception as e:
        row["fp8 xla dot"] = f"n/a ({type(e).__name__})"

    scaled_matmul = getattr(jax.nn, "scaled_matmul", None)
    if scaled_matmul is not None and not interpret:
        try:
            a3, b3 = qx_dense[None], qb_gnk[:1]  # [1, M, K], [1, N, K]
            # The recipe's scales: 1x128 for the rows, group 0's 128x128 blocks per column.
            sa3 = sa[None]
            sb3 = jnp.repeat(sb[0].T, 128, axis=0)[:N][None]
            fn = jax.jit(lambda a, b, s, t: scaled_matmul(a, b, s, t,
                                                          preferred_element_type=jnp.bfloat16))
            row["scaled_matmul"] = flops / median_time(fn, a3, b3, sa3, sb3, **timing)
        except Exception as e:
            row["scaled_matmul"] = f"n/a ({type(e).__name__})"

    return row


def bench_shape(shape, args, interpret: bool) -> dict[str, float | str]:
    G, M, K, N = shape
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k2, (G, K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    gs = group_sizes(G, M)
    flops = 2.0 * M * K * N
    row: dict[str, float | str] = {}

    quantize = jax.jit(lambda x, w: (*fp8.quantize_tiles(x, axis=1), *fp8.quantize_blocks(w)))
    qa, sa, qb, sb = quantize(x, w)
    qb_gnk = jnp.swapaxes(qb, 1, 2)
    sa_cm = sa.T
    ours = jax.jit(functools.partial(k8.gmm_fp8, out_dtype=jnp.bfloat16, interpret=interpret))

    # Correctness first, on the benchmark's own operands.
    out = ours(qa, sa_cm, qb_gnk, sb, gs)
    emulated = jax.jit(lambda: jax.lax.ragged_dot(
        fp8.dequantize_tiles(qa, sa, axis=1), fp8.dequantize_blocks(qb, sb), gs,
        precision=jax.lax.Precision.HIGHEST))()
    exact = jax.jit(lambda: jax.lax.ragged_dot(
        x.astype(jnp.float32), w.astype(jnp.float32), gs,
        precision=jax.lax.Precision.HIGHEST))()
    err_emul, err_exact = rel_err(out, emulated), rel_err(out, exact)
    print(f"  check: fp8 kernel vs emulation {err_emul:.2e} (< 4e-3), vs fp32 {err_exact:.4f} "
          f"(~0.037 expected)", flush=True)
    if not err_emul < 4e-3:
        row["check"] = f"FAILED {err_emul:.2e}"
    del emulated, exact

    timing = dict(warmup=1 if interpret else 2, iters=1 if interpret else args.iters)
    row["fp8 pallas"] = flops / median_time(ours, qa, sa_cm, qb_gnk, sb, gs, **timing)

    row.update(xla_fp8_rows(qa, sa, qb_gnk, sb, flops, timing, interpret))

    bf16 = jax.jit(functools.partial(gm.grouped_matmul, implementation="pallas",
                                     interpret=interpret))
    row["bf16 pallas"] = flops / median_time(bf16, x, w, gs, **timing)
    if not interpret:
        xla = jax.jit(functools.partial(gm.grouped_matmul, implementation="xla"))
        row["bf16 xla"] = flops / median_time(xla, x, w, gs, **timing)

    # fwd + dgrad (4 * M*K*N FLOPs), quantization of x, w and dy included; wgrad left out
    # (it is emulated in XLA for now).
    ct = jnp.ones((M, N), jnp.bfloat16)

    def fwd_dgrad(impl):
        def f(x, w):
            if impl == "bf16":
                y, vjp = jax.vjp(lambda a: gm.grouped_matmul(
                    a, w, gs, implementation="pallas", interpret=interpret), x)
            else:
                y, vjp = jax.vjp(lambda a: fp8.grouped_linear(
                    a, w, gs, jnp.bfloat16, implementation="pallas_gpu", interpret=interpret), x)
            return y, vjp(ct)
        return jax.jit(f)

    row["fp8 fwd+dgrad"] = 2 * flops / median_time(fwd_dgrad("fp8"), x, w, **timing)
    row["bf16 fwd+dgrad"] = 2 * flops / median_time(fwd_dgrad("bf16"), x, w, **timing)
    return row


def bench_dense(shape, args, interpret: bool) -> dict[str, float | str]:
    M, K, N = shape
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k2, (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    flops = 2.0 * M * K * N
    qa, sa, qw, sw = jax.jit(lambda x, w: (*fp8.quantize_tiles(x, axis=1),
                                           *fp8.quantize_blocks(w)))(x, w)
    sb = fp8.block_scales_along_n(sw, N)
    qb_nk, sa_cm = qw.T, sa.T
    pallas = jax.jit(functools.partial(k8.matmul_fp8, out_dtype=jnp.bfloat16,
                                       interpret=interpret))
    xla_fp8 = jax.jit(functools.partial(fp8.chunked_fp8_matmul, out_dtype=jnp.bfloat16))
    row: dict[str, float | str] = {}

    rows = min(M, CHECK_ROWS)
    ref = jax.jit(fp8.scaled_matmul)(qa[:rows], sa[:rows], qw, sb)
    outs = {"fp8 pallas": pallas(qa, sa_cm, qb_nk, sw)[:rows],
            "xla_fp8": xla_fp8(qa, sa, qw, sb)[:rows]}
    for name, out in outs.items():
        err = rel_err(out, ref)
        print(f"  check: {name} vs scaled_matmul {err:.2e} (< 4e-3)", flush=True)
        if not err < 4e-3:
            row[f"check {name}"] = f"FAILED {err:.2e}"
    del ref, outs

    timing = dict(warmup=1 if interpret else 2, iters=1 if interpret else args.iters)
    row["fp8 pallas"] = flops / median_time(pallas, qa, sa_cm, qb_nk, sw, **timing)
    row["xla_fp8"] = flops / median_time(xla_fp8, qa, sa, qw, sb, **timing)

    @jax.jit
    def fp8_dot(a, b):  # one scale per tensor: the FP8 GEMM without block scales
        y = jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * jnp.float32(0.9)).astype(jnp.bfloat16)

    try:
        row["fp8 xla dot"] = flops / median_time(fp8_dot, qa, qw, **timing)
    except Exception as e:
        row["fp8 xla dot"] = f"n/a ({type(e).__name__})"
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
                   .astype(jnp.bfloat16))
    row["bf16 xla"] = flops / median_time(bf16, x, w, **timing)

    ct = jnp.ones((M, N), jnp.bfloat16)

    def train(impl):  # forward + input and weight gradients
        def f(x, w):
            if impl == "bf16":
                y, vjp = jax.vjp(lambda a, b: bf16(a, b), x, w)
            else:
                y, vjp = jax.vjp(lambda a, b: fp8.linear(
                    a, b, implementation=impl, interpret=interpret), x, w)
            return y, vjp(ct)
        return jax.jit(f)

    for impl in ("pallas_gpu", "xla_fp8", "xla", "bf16"):
        row[f"{impl} fwd+bwd"] = 3 * flops / median_time(train(impl), x, w, **timing)
    return row


def print_table(rows: dict, label: str, note: str) -> None:
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"\n| {label} | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for shape, r in rows.items():
        cells = [f"{r[c] / 1e12:.0f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                 for c in cols]
        print(f"| {', '.join(map(str, shape))} | " + " | ".join(cells) + " |")
    print(note)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None,
                   help="indices into SHAPES (default all), or DENSE_SHAPES with --dense")
    p.add_argument("--dense", action="store_true", help="the dense FP8 linears' shapes")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    table = DENSE_SHAPES if args.dense else SHAPES
    if args.dry_run:
        shapes = DRY_DENSE_SHAPES if args.dense else DRY_SHAPES
    elif args.shapes is None:
        shapes = table
    else:
        shapes = [table[int(i)] for i in args.shapes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    rows = {}
    for shape in shapes:
        print(("M={} K={} N={}" if args.dense else "G={} M={} K={} N={}").format(*shape),
              flush=True)
        bench = bench_dense if args.dense else bench_shape
        rows[shape] = bench(shape, args, interpret=args.dry_run)
        print("  " + ", ".join(f"{k}: {v / 1e12:.0f} TFLOP/s" if isinstance(v, float)
                               else f"{k}: {v}" for k, v in rows[shape].items()), flush=True)
    if args.dense:
        print_table(rows, "M, K, N", "(TFLOP/s; fwd+bwd counts 6*M*K*N)")
    else:
        print_table(rows, "G, M, K, N", "(TFLOP/s; fwd+dgrad counts 4*M*K*N)")


if __name__ == "__main__":
    main()
