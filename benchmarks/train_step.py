"""Whole training step speed on one accelerator: step time, tokens/s, model TFLOP/s, MFU, peak
memory, and a per-part breakdown from a profile, for several settings side by side.

  python -m benchmarks.train_step --config=configs/small.py
  python -m benchmarks.train_step --config=configs/small.py --settings=xla,pallas --steps=5

  python -m benchmarks.train_step --config=configs/small.py --settings=pallas,ep2,pp2,ep4

MFU = tokens/s x FLOPs per token (dsv3_jax/model/flops.py: 6 x active matmul parameters + causal
attention) / the device's dense bf16 peak (989 TFLOP/s for an H100/H200); tokens/s, TFLOP/s and
MFU are per device. Each setting runs in its own process (on its first N GPUs), so peak memory
is its own and an out-of-memory setting does not stop the rest. Multi-device settings scale
weakly: the config's batch is per device, times N globally, with the same accumulation
microbatches, so every device does the single-device step's work. Synthetic tokens (one
document per row), sequence length from the config.
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

from dsv3_jax.model import flops
from dsv3_jax.train import loop as train_loop
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer

# name -> config overrides ("devices": how many GPUs). "xla": cuDNN attention (v padded) +
# jax.lax.ragged_dot; the rest use our Pallas kernels. "pallas" keeps the config's own
# remat policy (for configs/small.py the fastest measured); the others vary it.
_PALLAS = {"model.attention_impl": "pallas", "model.moe_impl": "pallas"}
SETTINGS = {
    "xla": {"model.attention_impl": "cudnn", "model.moe_impl": "xla"},
    # What `auto` takes (the kernels where their support predicates hold), and plain XLA
    # everywhere: the comparison that decides `auto` at small dims (configs/tiny.py).
    "auto": {"model.attention_impl": "auto", "model.moe_impl": "auto"},
    "xla_plain": {"model.attention_impl": "xla", "model.moe_impl": "xla"},
    "pallas": _PALLAS,
    "pallas_remat_full": {**_PALLAS, "model.remat": "full"},
    "pallas_save_dots": {**_PALLAS, "model.remat": "save_dots_no_batch"},
    "pallas_save_kernels": {**_PALLAS, "model.remat": "save_kernels"},
    "pallas_no_remat": {**_PALLAS, "model.remat": "none"},
    "pallas_mb2": {**_PALLAS, "microbatches": 2},
    "pallas_save_kernels_mb2": {**_PALLAS, "model.remat": "save_kernels", "microbatches": 2},
    # Weak scaling (issue 4): the same per-device work on 2 and 4 GPUs.
    "dp2": {**_PALLAS, "devices": 2, "mesh.data": 2},
    "ep2": {**_PALLAS, "devices": 2, "mesh.data": 1, "mesh.expert": 2},
    "ep4": {**_PALLAS, "devices": 4, "mesh.data": 1, "mesh.expert": 4},
    "pp2": {**_PALLAS, "devices": 2, "mesh.data": 1, "mesh.pipeline": 2,
            "mesh.pipeline_microbatches": 8},
    "pp2_circular": {**_PALLAS, "devices": 2, "mesh.data": 1, "mesh.pipeline": 2,
                     "mesh.pipeline_microbatches": 8, "mesh.pipeline_schedule": "circular",
                     "mesh.pipeline_repeats": 2},
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Training config.")
_SETTINGS = flags.DEFINE_list("settings", ["xla", "pallas_remat_full", "pallas"],
                              "Settings to compare.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps per setting (after 2 warm-up steps).")
_PROFILE = flags.DEFINE_list("profile", ["pallas"], "Settings to profile for a breakdown.")
_ONE = flags.DEFINE_string("one", None, "Internal: run one setting in this process.")
_TIMEOUT = flags.DEFINE_integer("timeout", 420, "Seconds per setting.")
_TOP = flags.DEFINE_integer("top", 30, "Longest operations listed per profiled setting.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the profiles (trace and compiled "
                                 "HLO, one folder per setting) here; default a temp folder.")


def apply(cfg, overrides: dict):
    cfg = cfg.copy_and_resolve_references()
    cfg.batch_size *= overrides.get("devices", 1)
    for key, value in overrides.items():
        if key == "devices":
            continue
        target = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


def synthetic_batch(hyper, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (hyper.batch_size, hyper.seq_len + 1), dtype=np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens))}


def measure(cfg, name: str, steps: int, profile_dir: str | None) -> dict:
    spec = RunSpec.from_config(cfg, devices=jax.device_count(), backend=jax.default_backend())
    model = spec.model
    parallel = train_loop.parallel_layout(spec.mesh)
    trainer = Trainer(model, spec.hyper, parallel)
    state = trainer.init_state(jax.random.key(0))
    batch = trainer.place_batch(synthetic_batch(spec.hyper, model.vocab_size))
    n = jax.device_count()
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
    tokens = spec.hyper.batch_size * spec.hyper.seq_len / n  # per device
    per_token = flops.train_flops_per_token(model, spec.hyper.seq_len)
    peak = flops.device_peak_flops() or float("nan")
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    pipe = parallel.pipeline if parallel else None
    impls = trainer.implementations
    result = {
        "setting": name, "devices": n, "mesh": dict(parallel.mesh.shape) if parallel else {},
        "bubble": pipe.bubble_fraction() if pipe else 0.0,
        "step_s": step_s, "step_spread_s": max(times) - min(times),
        "tokens_per_s": tokens / step_s, "model_tflops": tokens * per_token / step_s / 1e12,
        "mfu": tokens * per_token / step_s / peak,
        "peak_gb": max(st.get("peak_bytes_in_use", 0) for st in stats) / 1e9,
        "compile_s": compile_s, "loss": float(metrics["loss"]),
        "attention": impls.attention, "moe": impls.moe, "remat": model.remat,
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
        parts, top = profile_summary.summarize(profile_dir, hlo, top=_TOP.value)
        per_step = 1e3 / (2 * n)  # two steps on each of n devices
        result["breakdown_ms"] = {k: per_step * v for k, v in parts.items()}
        result["top_ms"] = [(round(per_step * t, 1), part, op[-90:]) for t, part, op in top]
    return result


def run_one(name: str, profile_dir: str | None, env: dict[str, str]) -> dict | None:
    """Time one setting in a fresh process; with a profile_dir, profile it in another one with
    CUDA-graph command buffers off, so every kernel names its HLO instruction."""
    result = _subprocess(name, None, env)
    if result and profile_dir:
        profiled = _subprocess(name, profile_dir, env)
        if profiled:
            result["breakdown_ms"] = profiled["breakdown_ms"]
            result["top_ms"] = profiled["top_ms"]
            result["profiled_step_s"] = profiled["step_s"]
    return result


def _subprocess(name: str, profile_dir: str | None, env: dict[str, str]) -> dict | None:
    """One setting in a child process with environment `env` (plus the profile and GPU
    selection); its RESULT line, or None if it failed or timed out."""
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    args = [sys.executable, "-m", "benchmarks.train_step", f"--config={config_file}",
            f"--one={name}", f"--steps={_STEPS.value}", f"--top={_TOP.value}"]
    args += [a for a in sys.argv[1:] if a.startswith("--config.")]
    env = dict(env, BENCH_PROFILE_DIR=profile_dir or "")
    devices = SETTINGS[name].get("devices", 1)
    if devices > jax.device_count():
        print(f"{name}: needs {devices} devices, this machine has {jax.device_count()}",
              flush=True)
        return None
    if jax.default_backend() == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
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
    unknown = [n for n in (*_SETTINGS.value, *_PROFILE.value) if n and n not in SETTINGS]
    if unknown:
        raise app.UsageError(f"--settings/--profile: unknown setting(s) {unknown}; known: "
                             f"{', '.join(SETTINGS)}")
    # This parent only counts devices: it must not take GPU memory from the measured children.
    child_env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}: {cfg.model.preset} batch "
          f"{cfg.batch_size} x {cfg.seq_len} tokens per device, {cfg.microbatches} "
          "microbatches", flush=True)
    results = []
    for name in _SETTINGS.value:
        profile_dir = None
        if name in _PROFILE.value:
            if _TRACE_DIR.value:
                profile_dir = os.path.join(_TRACE_DIR.value, name)
                os.makedirs(profile_dir, exist_ok=True)
            else:
                profile_dir = tempfile.mkdtemp(prefix=f"trace_{name}_")
        r = run_one(name, profile_dir, child_env)
        if r:
            results.append(r)
            print(json.dumps(r), flush=True)
    header = (f"{'setting':<14}{'GPUs':>5}{'attn':>8}{'moe':>8}{'remat':>20}{'step s':>9}"
              f"{'tok/s/GPU':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'bubble':>8}")
    lines = [header]
    for r in results:
        lines.append(f"{r['setting']:<14}{r['devices']:>5}{r['attention']:>8}{r['moe']:>8}"
                     f"{r['remat']:>20}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
                     f"{r['model_tflops']:>9.1f}{r['mfu']:>7.1%}{r['peak_gb']:>9.1f}"
                     f"{r['bubble']:>8.1%}")
    single = next((r for r in results if r["devices"] == 1 and r["setting"] == "pallas"), None)
    if single:
        lines.append("\nweak scaling (tokens/s per GPU over the 1-GPU `pallas` setting's):")
        for r in results:
            if r["devices"] > 1:
                eff = r["tokens_per_s"] / single["tokens_per_s"]
                lines.append(f"  {r['setting']:<14}{r['devices']} GPUs {dict(r['mesh'])}: "
                             f"{eff:.1%}" + (f" (pipeline bubble, schedule's theory: "
                                             f"{r['bubble']:.1%})" if r["bubble"] else ""))
    for r in results:
        if "breakdown_ms" in r:
            lines.append(f"\nbreakdown of {r['setting']} (ms per step and device, device "
                         "kernels):")
            total = sum(r["breakdown_ms"].values()) or 1.0
            for part, ms in sorted(r["breakdown_ms"].items(), key=lambda kv: -kv[1]):
                lines.append(f"  {part:<30}{ms:>9.1f}{ms / total:>8.1%}")
            lines.append("  longest operations (ms per step, part, op_name):")
            for ms, part, op in r.get("top_ms", []):
                lines.append(f"    {ms:>8.1f}  {part:<28} {op}")
    table = "\n".join(lines)
    print(table, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step_table.txt"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
