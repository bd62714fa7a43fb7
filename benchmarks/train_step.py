"""Whole training step speed on one accelerator: step time, tokens/s, model TFLOP/s, MFU, peak
memory, and a per-part breakdown from a profile, for several settings side by side.

  python -m benchmarks.train_step --config=configs/small.py
  python -m benchmarks.train_step --config=configs/small.py --settings=xla,pallas --steps=5

MFU = tokens/s x FLOPs per token (dsv3_jax/flops.py: 6 x active matmul parameters + causal
attention) / the device's dense bf16 peak (989 TFLOP/s for an H100/H200). Each setting runs in
its own process, so peak memory is its own and an out-of-memory setting does not stop the rest.
Synthetic tokens (one document per row), batch and sequence length from the config.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dsv3_jax import flops, train_loop
from dsv3_jax.trainer import Trainer

# name -> model/config overrides. "xla": cuDNN attention (v padded) + jax.lax.ragged_dot.
SETTINGS = {
    "xla": {"model.attention_impl": "cudnn", "model.moe_impl": "xla"},
    "pallas": {"model.attention_impl": "pallas", "model.moe_impl": "pallas"},
    "pallas_save_dots": {"model.attention_impl": "pallas", "model.moe_impl": "pallas",
                         "model.remat": "save_dots_no_batch"},
    "pallas_no_remat": {"model.attention_impl": "pallas", "model.moe_impl": "pallas",
                        "model.remat": "none"},
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Training config.")
_SETTINGS = flags.DEFINE_list("settings", ["xla", "pallas", "pallas_save_dots",
                                           "pallas_no_remat"], "Settings to compare.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps per setting (after 2 warm-up steps).")
_PROFILE = flags.DEFINE_bool("profile", True, "Profile the fastest setting for a breakdown.")
_ONE = flags.DEFINE_string("one", None, "Internal: run one setting in this process.")
_TIMEOUT = flags.DEFINE_integer("timeout", 420, "Seconds per setting.")


def apply(cfg, overrides: dict):
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


def synthetic_batch(cfg, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens))}


def measure(cfg, name: str, steps: int, profile_dir: str | None) -> dict:
    model = train_loop.model_config(cfg)
    train_loop.validate(cfg, model)
    trainer = Trainer(model, train_loop.hyper(cfg))
    state = trainer.init_state(jax.random.key(0))
    batch = synthetic_batch(cfg, model.vocab_size)
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = cfg.batch_size * cfg.seq_len
    per_token = flops.train_flops_per_token(model, cfg.seq_len)
    peak = flops.device_peak_flops() or float("nan")
    stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "setting": name, "step_s": step_s, "step_spread_s": max(times) - min(times),
        "tokens_per_s": tokens / step_s, "model_tflops": tokens * per_token / step_s / 1e12,
        "mfu": tokens * per_token / step_s / peak, "peak_gb": stats.get("peak_bytes_in_use", 0)
        / 1e9, "compile_s": compile_s, "loss": float(metrics["loss"]),
        "attention": model.implementations(jax.default_backend())[0],
        "moe": model.implementations(jax.default_backend())[1], "remat": model.remat,
    }
    if profile_dir:
        from benchmarks import profile_summary

        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
        for _ in range(2):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()
        hlo = compiled.as_text()
        with gzip.open(os.path.join(profile_dir, "step.hlo.txt.gz"), "wt") as f:
            f.write(hlo)
        parts = profile_summary.summarize(profile_dir, hlo)
        result["breakdown_ms"] = {k: 1e3 * v / 2 for k, v in parts.items()}
    return result


def run_one(name: str, profile_dir: str | None) -> dict | None:
    """Time one setting in a fresh process; with a profile_dir, profile it in another one with
    CUDA-graph command buffers off, so every kernel names its HLO instruction."""
    result = _subprocess(name, None)
    if result and profile_dir:
        profiled = _subprocess(name, profile_dir)
        if profiled:
            result["breakdown_ms"] = profiled["breakdown_ms"]
            result["profiled_step_s"] = profiled["step_s"]
    return result


def _subprocess(name: str, profile_dir: str | None) -> dict | None:
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    args = [sys.executable, "-m", "benchmarks.train_step", f"--config={config_file}",
            f"--one={name}", f"--steps={_STEPS.value}"]
    args += [a for a in sys.argv[1:] if a.startswith("--config.")]
    env = dict(os.environ, BENCH_PROFILE_DIR=profile_dir or "")
    if profile_dir:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT.value,
                             env=env)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {_TIMEOUT.value}s", flush=True)
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        print(f"{name}: failed\n{out.stderr[-2500:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main(argv):
    del argv
    if _ONE.value:
        cfg = apply(_CONFIG.value, SETTINGS[_ONE.value])
        profile_dir = os.environ.get("BENCH_PROFILE_DIR") or None
        print("RESULT " + json.dumps(measure(cfg, _ONE.value, _STEPS.value, profile_dir)),
              flush=True)
        return
    cfg = _CONFIG.value
    print(f"{jax.devices()[0].device_kind}: {cfg.model.preset} batch {cfg.batch_size} x "
          f"{cfg.seq_len} tokens, {cfg.microbatches} microbatches", flush=True)
    results = []
    for name in _SETTINGS.value:
        profile_dir = tempfile.mkdtemp(prefix=f"trace_{name}_") if _PROFILE.value else None
        r = run_one(name, profile_dir)
        if r:
            results.append(r)
            print(json.dumps(r), flush=True)
    header = (f"{'setting':<20}{'attn':>8}{'moe':>8}{'remat':>20}{'step s':>9}{'tok/s':>10}"
              f"{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}")
    lines = [header]
    for r in results:
        lines.append(f"{r['setting']:<20}{r['attention']:>8}{r['moe']:>8}{r['remat']:>20}"
                     f"{r['step_s']:>9.3f}{r['tokens_per_s']:>10.0f}{r['model_tflops']:>9.1f}"
                     f"{r['mfu']:>7.1%}{r['peak_gb']:>9.1f}")
    for r in results:
        if "breakdown_ms" in r:
            lines.append(f"\nbreakdown of {r['setting']} (ms per step, device kernels):")
            total = sum(r["breakdown_ms"].values()) or 1.0
            for part, ms in sorted(r["breakdown_ms"].items(), key=lambda kv: -kv[1]):
                lines.append(f"  {part:<30}{ms:>9.1f}{ms / total:>8.1%}")
    table = "\n".join(lines)
    print(table, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step_table.txt"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
