"""Summarize a `jax.profiler` trace of a train step by model part.

A GPU kernel in the trace names the HLO instruction it runs (its own name for XLA fusions, its
`hlo_op` argument for library and Pallas kernels); the compiled HLO's metadata gives that
instruction's `op_name`, which carries our `jax.named_scope` / Flax module path (e.g.
`.../moe_layers/moe/routed_experts/...`). Kernel time is summed per part by the first rule below
that matches. Kernels that XLA groups into CUDA-graph command buffers report the buffer, not
the instruction: profile with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` for a full
attribution (benchmarks.train_step does). Unattributed kernels are split by kernel class.

  python -m benchmarks.profile_summary --trace_dir=DIR --hlo=step.hlo.txt
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections import defaultdict

from absl import app, flags

PARTS = (
    ("optimizer", ("optimizer",)),
    ("attention core (MLA)", ("mla_attention", "mla_decode")),
    ("MoE dispatch / permutation", ("routed_experts/permute", "routed_experts/unpermute",
                                    "routed_experts/combine", "routed_experts/sort",
                                    "routed_experts/gather", "routed_experts/scatter",
                                    "routed_experts/dispatch")),
    ("MoE experts (grouped GEMM)", ("routed_experts",)),
    ("router", ("/router",)),
    ("shared experts", ("shared_experts", "/shared/")),
    ("attention projections", ("/attn/",)),
    ("dense FFN", ("/mlp/",)),
    ("norms", ("norm",)),
    ("embedding, head and loss", ("embed", "loss_head", "BTD,DV->BTV", "_take", "head")),
    ("bias update", ("bias_update",)),
)
OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> metadata op_name (also under the kernel-name spelling, where
    '.' becomes '_': instruction `loop_add_fusion.7` runs kernel `loop_add_fusion_7`)."""
    names = {}
    for m in OP_NAME.finditer(hlo_text):
        names[m[1]] = names[m[1].replace(".", "_")] = m[2]
    return names


def part_of(op_name: str) -> str:
    for part, keys in PARTS:
        if any(k in op_name for k in keys):
            return part
    return "other"


def load_events(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise ValueError(f"no *.trace.json.gz under {trace_dir!r} (profile with "
                         "create_perfetto_trace=True)")
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_kernels(events: list[dict]) -> list[dict]:
    """Complete events on GPU/TPU device processes (not host threads)."""
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
                   "process_name" and re.search(r"/device:(GPU|TPU)", str(e.get("args", {})))}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]


def kernel_op_name(event: dict, names: dict[str, str]) -> str | None:
    """The op_name of the HLO instruction a kernel event ran, if the trace says which."""
    candidates = [event.get("name", "")]
    args = event.get("args", {})
    candidates += [str(args[k]).split(":")[0] for k in ("hlo_op", "long_name") if k in args]
    return next((names[c] for c in candidates if c in names), None)


def kernel_class(name: str) -> str:
    if name.startswith("sm90_xmma_gemm_f32") or "f32f32_tf32" in name:
        return "unattributed: fp32 (TF32) library GEMM"
    if name.startswith(("nvjet", "sm90_xmma", "cutlass")) or "gemm" in name:
        return "unattributed: bf16 library GEMM"
    if "mosaic" in name:
        return "unattributed: Pallas kernel"
    if name.lower().startswith(("memcpy", "memset")):
        return "memcpy / memset"
    return "unattributed: XLA fusion"


COLLECTIVES = "collectives (NCCL; may overlap compute)"


def attribute(event: dict, names: dict[str, str]) -> tuple[str, str]:
    """(part, op_name or kernel name) of one kernel event."""
    kernel = event.get("name", "")
    if "nccl" in kernel.lower():
        return COLLECTIVES, kernel
    op_name = kernel_op_name(event, names)
    if op_name is None:
        return kernel_class(kernel), kernel
    return part_of(op_name), op_name


def summarize(trace_dir: str, hlo_text: str, top: int = 10):
    """(seconds of device kernel time per part, over everything in the trace; the `top`
    (seconds, part, op_name) that take longest, summed over launches)."""
    names = hlo_op_names(hlo_text)
    totals: dict[str, float] = defaultdict(float)
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    for event in device_kernels(load_events(trace_dir)):
        part, op = attribute(event, names)
        totals[part] += event.get("dur", 0) * 1e-6
        per_op[part, op] += event.get("dur", 0) * 1e-6
    ranked = sorted(((t, part, op) for (part, op), t in per_op.items()), reverse=True)
    return dict(totals), ranked[:top]


def format_table(totals: dict[str, float], steps: int) -> str:
    total = sum(totals.values()) or 1.0
    lines = [f"{'part':<30}{'ms/step':>10}{'share':>8}"]
    for part, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"{part:<30}{1e3 * seconds / steps:>10.1f}{seconds / total:>8.1%}")
    lines.append(f"{'device kernel time':<30}{1e3 * total / steps:>10.1f}")
    return "\n".join(lines)


def main(argv):
    del argv
    with open(flags.FLAGS.hlo) as f:
        totals, _ = summarize(flags.FLAGS.trace_dir, f.read())
    print(format_table(totals, flags.FLAGS.trace_steps))


if __name__ == "__main__":  # flags only when run as a program: importers keep their own
    flags.DEFINE_string("trace_dir", None, "jax.profiler trace directory")
    flags.DEFINE_string("hlo", None, "compiled HLO text of the profiled step")
    flags.DEFINE_integer("trace_steps", 1, "steps in the trace")
    flags.mark_flags_as_required(["trace_dir", "hlo"])
    app.run(main)
