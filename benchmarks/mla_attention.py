"""MLA attention benchmark: training (causal flash attention) and absorbed decode vs baselines.

Run on the accelerator (one H200):  python -m benchmarks.mla_attention
  --budget-s S   stop starting new measurements after S seconds (what was skipped is printed)
  --no-check     skip the on-GPU correctness check against the plain-JAX reference
  --only NAME    "training" or "decode"
  --decode-shapes I,J   only these DECODE_SHAPES (indexes)
  --train-shapes I,J / --train-configs NAME,...   only these TRAIN_SHAPES / our configs
  --ours-only    training: only our configs (exploring tilings; no baselines in that run)
  --profile      also profile ours (training and decode): each Pallas kernel's device time vs the
                 ops around it
Prints, per shape, TFLOP/s of cuDNN (v padded to 192), tokamax (when importable), naive XLA (where
its [B, N, T, S] scores fit) and ours ("pallas": split dq and dk/dv backward kernels; "pallas
fused-bwd": the same forward, one fused backward kernel, timed forward+backward only), forward
and forward+backward; for decode, TFLOP/s and GB/s of cache read of the XLA absorbed form and
ours, with the mean SM clock during each timing (benchmarks/gpu_clocks.py; the card lowers it at
its power cap). Ends with one table, also
written to $OUT/mla_attention_table.txt when OUT is set (and the full log as it goes).

FLOPs (useful work, as BASELINES.md): training forward 2 B T^2 N (192 + 128) / 2 (causal half),
forward+backward 3.5x that; decode 2 B Tq N L (R + Hr) + 2 B Tq N L R. Times: median over groups of
back-to-back calls (each group at least 20 ms, so that launch and host-synchronization gaps are
hidden, as in a training loop) after a warm-up, block_until_ready; a decode
"call" is one of DECODE_CALLS calls (different queries, one cache) jitted together, so that the
figure is device time, ops around the kernel included, and not Python dispatch. At B=1 the
cache (4.7 MB at L=4096, 38 MB at 32768) stays in the 50 MB L2 between calls, so those GB/s are
L2-warm; at B=64 it does not fit.
Baselines get their inputs pre-packed (q/k concatenated to 192, k_rope broadcast to every head,
v padded), so packing is not timed against them; ours takes the split MLA inputs as the model
holds them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu_clocks import ClockSampler
from pallas_kernels import _mla_attention_mgpu, _mla_decode_mgpu
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import mla_decode

HN, HR, HV, R = 128, 64, 128, 512
TRAIN_SCALE = (HN + HR) ** -0.5
DECODE_SCALE = (R + HR) ** -0.5
TRAIN_SHAPES = [(2, 4096, 128), (8, 4096, 16), (2, 16384, 128)]  # (B, T, N)
DECODE_SHAPES = [(64, 4096, 128, 1), (64, 4096, 16, 1), (64, 4096, 128, 2),
                 (1, 4096, 128, 1), (1, 32768, 128, 1), (64, 32768, 128, 1),
                 (64, 32768, 16, 1), (1, 4096, 16, 1), (1, 32768, 16, 1)]  # (B, L, N, Tq)
CHECK_ATTENTION_SHAPES = [(2, 320, 4, False), (1, 1000, 3, True)]  # B T N segments
CHECK_DECODE_SHAPES = [(3, 1000, 128, 1, None), (2, 700, 16, 2, None),
                       (2, 4096, 128, 1, 3)]  # B L N Tq splits
# Decode calls per timed executable: one call is tens of microseconds of device work, about what
# Python dispatch of one jitted call costs here, so each timing runs this many calls (different
# queries, the same cache) in one executable, as a model's decode step runs the kernel.
DECODE_CALLS = 8
XLA_SCORE_BYTES_LIMIT = 20e9  # naive XLA materializes fp32 [B, N, T, S] scores (and more in bwd)
# The alternatives to "pallas" differ from it in the forward tiles only (timed forward only) or in
# the backward only (timed forward+backward only).
OURS_TRAIN_CONFIGS = {
    "pallas": _mla_attention_mgpu.Config(),
    "pallas kv64x3": _mla_attention_mgpu.Config(block_kv=64, max_concurrent_steps=3),
    "pallas fused-bwd": _mla_attention_mgpu.Config(backward="fused"),
}
FWD_ONLY = ("pallas kv64x3",)
BWD_ONLY = ("pallas fused-bwd",)
# Checked for correctness only: the fused backward's second dQ path (per-key-block slices summed
# by XLA; S / 64 copies of dQ, too large to time at the training shapes).
CHECK_ONLY_CONFIGS = {
    "pallas fused-bwd partial": _mla_attention_mgpu.Config(backward="fused",
                                                           dq_accumulation="partial"),
}
OURS_DECODE_CONFIGS = {  # "row-major" forces the row-major kernel where Tq * N <= 32
    "pallas": _mla_decode_mgpu.Config(),
    "pallas row-major": _mla_decode_mgpu.Config(few_rows_max=0),
    "pallas splits4": _mla_decode_mgpu.Config(num_splits=4),
    "pallas splits8": _mla_decode_mgpu.Config(num_splits=8),
}

_LOG: list[str] = []
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(msg, flush=True)
    _LOG.append(msg)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "mla_attention_log.txt"), "a") as f:
            f.write(msg + "\n")


def timeit(fn: Callable, *args, groups: int = 7, min_group_s: float = 2e-2,
           clocks: ClockSampler | None = None) -> float:
    """Median seconds per call over `groups` groups of back-to-back calls, after a warm-up;
    `clocks` samples the GPU's SM clock and power cap during the timed groups."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t
    per_group = max(1, int(min_group_s / max(once, 1e-6)))
    times = []
    with clocks or contextlib.nullcontext():
        for _ in range(groups):
            t = time.perf_counter()
            for _ in range(per_group):
                out = fn(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t) / per_group)
    return statistics.median(times)


@dataclasses.dataclass
class Row:
    section: str
    shape: str
    impl: str
    cols: dict[str, str]


ROWS: list[Row] = []
# where, kernel us, other us, span us, bytes read (decode) or None
PROFILE_ROWS: list[tuple[str, float, float, float, int | None]] = []


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------------
# Correctness on the GPU (small shapes)
# ----------------------------------------------------------------------------------------------
def check_correctness() -> bool:
    """Ours vs the plain-JAX reference on upcast (fp32) inputs; bf16 operands -> rel err < 2e-2."""
    ok = True
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for B, T, N, segmented in CHECK_ATTENTION_SHAPES:
        ks = jax.random.split(jax.random.key(T + N), 6)
        shapes = [(B, T, N, HN), (B, T, N, HR), (B, T, N, HN), (B, T, HR), (B, T, N, HV)]
        args = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(ks[:5], shapes, strict=True)]
        do = jax.random.normal(ks[5], (B, T, N, HV), jnp.bfloat16)
        seg = None
        if segmented:
            cuts = np.sort(np.random.default_rng(T).integers(0, T, size=(B, 4)), axis=1)
            seg = jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1),
                              jnp.int32)
        scale = (HN + HR) ** -0.5

        def loss(impl, config, *a, seg=seg, do=do, scale=scale):
            o = mla_attention(*a, seg, scale=scale, implementation=impl, config=config)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

        grad_ref = jax.jit(jax.grad(lambda *a: loss("xla", None, *a), argnums=range(5),
                                    has_aux=True))
        g_ref, o_ref = grad_ref(*map(f32, args))
        impls = [(name, "pallas", c)
                 for name, c in (OURS_TRAIN_CONFIGS | CHECK_ONLY_CONFIGS).items()]
        for name, impl, config in [*impls, ("cudnn", "cudnn", None)]:
            try:
                grad = jax.jit(jax.grad(lambda *a, i=impl, c=config: loss(i, c, *a),
                                        argnums=range(5), has_aux=True))
                g, o = grad(*args)
                errs = {"o": _rel_err(o, o_ref)}
                errs.update({n: _rel_err(a, b) for n, a, b in
                             zip(["dq_nope", "dq_rope", "dk_nope", "dk_rope", "dv"], g, g_ref,
                                 strict=True)})
                good = all(np.isfinite(e) and e < 2e-2 for e in errs.values())
                ok &= good
                log(f"check attention {name} B{B} T{T} N{N} segments={segmented}: "
                    f"{'PASS' if good else 'FAIL'} "
                    + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
            except Exception as e:  # report and keep going: later checks and benchmarks run
                ok = False
                log(f"check attention {name} B{B} T{T} N{N} segments={segmented}: "
                    f"ERROR {e!r}"[:2000])
    for B, L, N, Tq, splits in CHECK_DECODE_SHAPES:
        ks = jax.random.split(jax.random.key(L + N), 3)
        ql = jax.random.normal(ks[0], (B, Tq, N, R), jnp.bfloat16)
        qr = jax.random.normal(ks[1], (B, Tq, N, HR), jnp.bfloat16)
        kv = jax.random.normal(ks[2], (B, L, R + HR), jnp.bfloat16)
        lengths = jnp.asarray(np.random.default_rng(L).integers(Tq, L + 1, size=B), jnp.int32)
        lengths = lengths.at[0].set(L)
        config = _mla_decode_mgpu.Config(num_splits=splits)
        try:
            o = jax.jit(lambda *a, c=config: mla_decode(*a, scale=0.07, implementation="pallas",
                                                        config=c))(ql, qr, kv, lengths)
            o_ref = jax.jit(lambda *a: mla_decode(*a, scale=0.07))(f32(ql), f32(qr), f32(kv),
                                                                  lengths)
            err = _rel_err(o, o_ref)
            good = np.isfinite(err) and err < 2e-2
            ok &= good
            log(f"check decode B{B} L{L} N{N} Tq{Tq} splits={splits}: "
                f"{'PASS' if good else 'FAIL'} o={err:.1e}")
        except Exception as e:
            ok = False
            log(f"check decode B{B} L{L} N{N} Tq{Tq}: ERROR {e!r}"[:2000])
    return ok


# ----------------------------------------------------------------------------------------------
# Training attention
# ----------------------------------------------------------------------------------------------
_TOKAMAX: list = []


def _tokamax():
    if _TOKAMAX:
        return _TOKAMAX[0]
    _TOKAMAX.append(None)
    try:
        # tokamax imports xprof only for its own benchmarking helpers; stub it.
        for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
        import tokamax
        _TOKAMAX[0] = tokamax
        return tokamax
    except Exception as e:
        log(f"tokamax not importable: {e!r}"[:300])
        return None


def _training_baselines(shape: str, split_inputs: tuple, tokamax) -> list[tuple]:
    """cuDNN, tokamax (when importable) and naive XLA candidates for one training shape; the
    first two get their inputs pre-packed (q/k concatenated to 192, k_rope broadcast, v padded)."""
    qn, qr, kn, kr, v = split_inputs
    B, T, N, _ = qn.shape
    q192 = jnp.concatenate([qn, qr], -1)
    k192 = jnp.concatenate([kn, jnp.broadcast_to(kr[:, :, None], (B, T, N, HR))], -1)
    v192 = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, HN + HR - HV)))
    baselines: list[tuple[str, Callable, tuple]] = [
        ("cudnn", lambda q, k, vv: jax.nn.dot_product_attention(
            q, k, vv, scale=TRAIN_SCALE, is_causal=True, implementation="cudnn")[..., :HV],
         (q192, k192, v192))]
    if tokamax is not None:
        baselines.append(("tokamax mosaic", lambda q, k, vv: tokamax.dot_product_attention(
            q, k, vv, scale=TRAIN_SCALE, is_causal=True, implementation="mosaic"),
            (q192, k192, v)))
    if B * N * T * T * 4 <= XLA_SCORE_BYTES_LIMIT:
        baselines.append(("xla", lambda *a: mla_attention(*a, None, scale=TRAIN_SCALE,
                                                          implementation="xla"), split_inputs))
    else:
        ROWS.append(Row("train", shape, "xla", {"fwd": "skip (mem)", "fwd+bwd": "skip (mem)"}))
    return baselines


def bench_training(shapes, budget_s: float, profile: bool = False,
                   ours_only: bool = False) -> None:
    tokamax = None if ours_only else _tokamax()
    for B, T, N in shapes:
        shape = f"B{B} T{T} N{N}"
        flops = 2 * B * T * T * N * (HN + HR + HV) / 2
        ks = jax.random.split(jax.random.key(0), 5)
        qn = jax.random.normal(ks[0], (B, T, N, HN), jnp.bfloat16)
        qr = jax.random.normal(ks[1], (B, T, N, HR), jnp.bfloat16)
        kn = jax.random.normal(ks[2], (B, T, N, HN), jnp.bfloat16)
        kr = jax.random.normal(ks[3], (B, T, HR), jnp.bfloat16)
        v = jax.random.normal(ks[4], (B, T, N, HV), jnp.bfloat16)
        candidates: list[tuple[str, Callable, tuple]] = []
        for name, config in OURS_TRAIN_CONFIGS.items():
            candidates.append((name, lambda *a, c=config: mla_attention(
                *a, None, scale=TRAIN_SCALE, implementation="pallas", config=c),
                (qn, qr, kn, kr, v)))
        if not ours_only:
            candidates += _training_baselines(shape, (qn, qr, kn, kr, v), tokamax)
        for name, fn, args in candidates:
            cols = {}
            for what in ("fwd", "fwd+bwd"):
                if (what == "fwd+bwd" and name in FWD_ONLY) or (what == "fwd" and name in BWD_ONLY):
                    continue
                if time.perf_counter() - _T0 > budget_s:
                    cols[what] = "skip (time)"
                    continue
                try:
                    if what == "fwd":
                        f = jax.jit(fn)
                    else:
                        f = jax.jit(jax.grad(lambda *a, fn=fn: fn(*a).astype(jnp.float32).sum(),
                                             argnums=tuple(range(len(args)))))
                    clocks = ClockSampler()
                    t = timeit(f, *args, clocks=clocks)
                    rate = (flops if what == "fwd" else 3.5 * flops) / t / 1e12
                    cols[what] = f"{rate:.0f}"
                    log(f"[train {shape}] {name} {what}: {t * 1e3:.3f} ms, {rate:.0f} TFLOP/s  "
                        f"{clocks.summary()}")
                    if profile and name in OURS_TRAIN_CONFIGS:
                        per_kernel, span = device_breakdown(f, *args)
                        log_breakdown(f"train {shape} {name} {what}", per_kernel, span)
                except Exception as e:
                    cols[what] = "error"
                    log(f"[train {shape}] {name} {what}: ERROR {e!r}"[:1500])
            ROWS.append(Row("train", shape, name, cols))
        del qn, qr, kn, kr, v, candidates


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------
def device_breakdown(fn, *args, calls: int = 5) -> tuple[dict[str, float], float]:
    """Profile `calls` back-to-back calls of fn: ({kernel name: device us per call}, device span
    per call in us, first kernel start to last kernel end, so launch gaps included)."""
    from benchmarks import profile_summary
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        events = profile_summary.device_kernels(profile_summary.load_events(trace_dir))
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for e in events:
        per_kernel[e.get("name", "?")] += e.get("dur", 0) / calls
    span = (max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events)
            if events else 0.0)
    return dict(per_kernel), span / calls


def log_breakdown(where: str, per_kernel: dict[str, float], span_us: float,
                  nbytes: int | None = None):
    """One line per profiled candidate: the Pallas kernels' own times (and GB/s of `nbytes`,
    the cache read by a decode call), the other kernels, the span."""
    ours = {k: v for k, v in per_kernel.items() if "mosaic" in k.lower()}
    rest = sorted(((v, k) for k, v in per_kernel.items() if k not in ours), reverse=True)
    kernel_us = sum(ours.values())
    busy = sum(per_kernel.values())
    parts = ""
    if kernel_us:
        rate = f" ({nbytes / kernel_us / 1e3:.0f} GB/s)" if nbytes else ""
        each = ", ".join(f"{k[:48]} {v:.1f}" for k, v in sorted(ours.items()))
        parts = f"Pallas kernels {kernel_us:.1f} us{rate} [{each}], "
    log(f"[profile {where}] {parts}other kernels {busy - kernel_us:.1f} us ("
        + ", ".join(f"{k[:40]} {v:.1f}" for v, k in rest[:4])
        + f"), device busy {busy:.1f} us, span {span_us:.1f} us per call")
    PROFILE_ROWS.append((where, kernel_us, busy - kernel_us, span_us, nbytes))


def _xla_anchor_decode(q, kv):
    """bench_anchors/xla_mla_decode.py's absorbed decode: q[B, Tq * N, R + Hr], kv[B, L, R + Hr]."""
    s = jnp.einsum("bhr,blr->bhl", q, kv, preferred_element_type=jnp.float32) * DECODE_SCALE
    p = jax.nn.softmax(s, axis=-1).astype(kv.dtype)
    return jnp.einsum("bhl,blr->bhr", p, kv[..., :R])


def bench_decode(shapes, budget_s: float, profile: bool = False) -> None:
    tokamax = _tokamax()
    for B, L, N, Tq in shapes:
        shape = f"B{B} L{L} N{N} Tq{Tq}"
        ks = jax.random.split(jax.random.key(1), 2 * DECODE_CALLS + 1)
        # Different queries per call, so that XLA cannot merge the calls of one timed executable.
        qls = [jax.random.normal(k, (B, Tq, N, R), jnp.bfloat16) for k in ks[:DECODE_CALLS]]
        qrs = [jax.random.normal(k, (B, Tq, N, HR), jnp.bfloat16)
               for k in ks[DECODE_CALLS:2 * DECODE_CALLS]]
        kv = jax.random.normal(ks[-1], (B, L, R + HR), jnp.bfloat16)
        lengths = jnp.full((B,), L, jnp.int32)
        flops = 2 * B * Tq * N * L * (R + HR) + 2 * B * Tq * N * L * R
        calls = [(ql, qr, kv, lengths) for ql, qr in zip(qls, qrs, strict=True)]
        candidates: list[tuple[str, Callable, list[tuple]]] = [
            ("xla", lambda *a: mla_decode(*a, scale=DECODE_SCALE, implementation="xla"), calls)]
        # BASELINES.md's XLA figure (bench_anchors/xla_mla_decode.py): q pre-concatenated to
        # R + Hr, one einsum for the scores, no length mask (every row visible).
        candidates.append(("xla (BASELINES form)", _xla_anchor_decode,
                           [(jnp.concatenate([ql, qr], -1).reshape(B, Tq * N, R + HR), kv)
                            for ql, qr in zip(qls, qrs, strict=True)]))
        for name, config in OURS_DECODE_CONFIGS.items():
            if config.few_rows_max == 0 and Tq * N > _mla_decode_mgpu.Config().few_rows_max:
                continue  # same kernel as "pallas"
            candidates.append((name, lambda *a, c=config: mla_decode(
                *a, scale=DECODE_SCALE, implementation="pallas", config=c), calls))
        if tokamax is not None:
            # tokamax has no GPU MLA decode; try its attention in the GQA form (one kv head).
            k_gqa, v_gqa = kv[:, :, None, :], kv[:, :, None, :R]
            candidates.append(("tokamax mosaic (gqa)", lambda q, k, vv:
                               tokamax.dot_product_attention(q, k, vv, scale=DECODE_SCALE,
                                                             implementation="mosaic"),
                               [(jnp.concatenate([ql, qr], -1), k_gqa, v_gqa)
                                for ql, qr in zip(qls, qrs, strict=True)]))
        for name, fn, fn_calls in candidates:
            if time.perf_counter() - _T0 > budget_s:
                ROWS.append(Row("decode", shape, name, {"TFLOP/s": "skip (time)", "GB/s": ""}))
                continue
            try:
                step = jax.jit(lambda cs, fn=fn: [fn(*a) for a in cs])
                clocks = ClockSampler()
                t = timeit(step, fn_calls, clocks=clocks) / len(fn_calls)
                tf, gb = flops / t / 1e12, kv.nbytes / t / 1e9
                log(f"[decode {shape}] {name}: {t * 1e6:.1f} us, {tf:.0f} TFLOP/s, {gb:.0f} GB/s"
                    f"  {clocks.summary()}")
                ROWS.append(Row("decode", shape, name, {
                    "us": f"{t * 1e6:.1f}", "TFLOP/s": f"{tf:.0f}", "GB/s": f"{gb:.0f}",
                    "MHz": "" if clocks.sm_mhz is None else f"{clocks.sm_mhz:.0f}"}))
                if profile and name in ("xla", "pallas"):
                    per_kernel, span = device_breakdown(step, fn_calls)
                    log_breakdown(f"decode {shape} {name}",
                                  {k: v / len(fn_calls) for k, v in per_kernel.items()},
                                  span / len(fn_calls), kv.nbytes)
            except Exception as e:
                log(f"[decode {shape}] {name}: ERROR {e!r}"[:1500])
                ROWS.append(Row("decode", shape, name, {"TFLOP/s": "error", "GB/s": ""}))
        del qls, qrs, kv, calls


def table() -> str:
    lines = []
    for section, cols in (("train", ("fwd", "fwd+bwd")),
                          ("decode", ("us", "TFLOP/s", "GB/s", "MHz"))):
        rows = [r for r in ROWS if r.section == section]
        if not rows:
            continue
        head = f"{'shape':<22}{'implementation':<24}" + "".join(f"{c:>14}" for c in cols)
        unit = "TFLOP/s" if section == "train" else ""
        lines += ["", f"== {section} {unit}".rstrip(), head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r.shape:<22}{r.impl:<24}"
                         + "".join(f"{r.cols.get(c, ''):>14}" for c in cols))
    if PROFILE_ROWS:
        head = (f"{'profile':<34}{'kernel us':>10}{'kernel GB/s':>12}{'other us':>10}"
                f"{'span us':>10}")
        lines += ["", "== device time per call (jax.profiler; span includes gaps)", head,
                  "-" * len(head)]
        for where, kernel, other, span, nbytes in PROFILE_ROWS:
            gbs = f"{nbytes / kernel / 1e3:.0f}" if kernel and nbytes else "-"
            lines.append(f"{where:<34}{kernel:>10.1f}{gbs:>12}{other:>10.1f}{span:>10.1f}")
    return "\n".join(lines)


def _indexes(parser, flag: str, text: str | None, n: int) -> list[int]:
    """Comma-separated indexes into a list of n shapes (all when text is None)."""
    if text is None:
        return list(range(n))
    try:
        indexes = [int(i) for i in text.split(",")]
    except ValueError:
        indexes = [-1]
    if any(not 0 <= i < n for i in indexes):
        parser.error(f"{flag}={text!r}: expected comma-separated indexes from 0 to {n - 1}")
    return indexes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=1e9)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--only", choices=("training", "decode"))
    parser.add_argument("--decode-shapes", default=None,
                        help="indexes into DECODE_SHAPES to run, comma-separated (default: all)")
    parser.add_argument("--train-shapes", default=None,
                        help="indexes into TRAIN_SHAPES to run, comma-separated (default: all)")
    parser.add_argument("--train-configs", default=None,
                        help=f"our training configs to time, comma-separated (default: all of "
                             f"{list(OURS_TRAIN_CONFIGS)})")
    parser.add_argument("--ours-only", action="store_true",
                        help="training: time only our configs (no cuDNN, tokamax, XLA)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile ours (and xla decode): device time of each Pallas "
                             "kernel vs the ops around it (run with XLA_FLAGS="
                             "--xla_gpu_enable_command_buffer= to see each kernel)")
    args = parser.parse_args()
    decode_shapes = [DECODE_SHAPES[i] for i in _indexes(parser, "--decode-shapes",
                                                        args.decode_shapes, len(DECODE_SHAPES))]
    if args.train_configs is not None:
        names = args.train_configs.split(",")
        unknown = [n for n in names if n not in OURS_TRAIN_CONFIGS]
        if unknown:
            parser.error(f"--train-configs: unknown {unknown}; known: {list(OURS_TRAIN_CONFIGS)}")
        for name in list(OURS_TRAIN_CONFIGS):
            if name not in names:
                del OURS_TRAIN_CONFIGS[name]
    log(f"devices: {jax.devices()}  jax {jax.__version__}")
    if not args.no_check:
        log(f"correctness check: {'ALL PASS' if check_correctness() else 'FAILURES (see above)'}")
    # The shapes with targets first, so that a time budget cuts the others.
    decode = functools.partial(bench_decode, profile=args.profile)
    training = functools.partial(bench_training, profile=args.profile,
                                 ours_only=args.ours_only)
    train_shapes = [TRAIN_SHAPES[i] for i in _indexes(parser, "--train-shapes", args.train_shapes,
                                                      len(TRAIN_SHAPES))]
    jobs = [("training", training, train_shapes[:1]), ("decode", decode, decode_shapes[:2]),
            ("training", training, train_shapes[1:]), ("decode", decode, decode_shapes[2:])]
    for name, fn, shapes in jobs:
        if args.only in (None, name):
            try:
                fn(shapes, args.budget_s)
            except Exception:
                log(f"{name} benchmark aborted:\n{traceback.format_exc()}"[:3000])
    text = table()
    log(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "mla_attention_table.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
