"""Our Mosaic TPU kernels compiled for real TPU chips on this (TPU-less) host, beside XLA's.

  python -m benchmarks.tpu_kernels [--topologies=v5p:1x1x1,v6e:1x1] [--shapes=deepseek_v3,moonlight]
                                   [--cases=gmm,attention,...] [--no-xla]

Compiles each case of pallas_kernels.tpu_compile.KERNEL_CASES (one device's share of DeepSeek-V3
and Moonlight) with implementation "pallas_tpu" and with "xla", for one chip of each topology
(libtpu's compile-only devices), and prints one row per (case, topology):

  VMEM KiB      scoped VMEM of each of our kernel calls (Mosaic's figure from the compiled HLO)
  GFLOP model   the matmul FLOPs of the math, from the shapes
  GFLOP, GB     cost_analysis() of the whole program; our kernels count through the
                pl.CostEstimate they pass (XLA counts a custom call as nothing otherwise), XLA's
                ragged_dot kernel counts natively
  temp MiB      memory_analysis() HBM scratch
  roof ms       max(GFLOP / peak bf16, GB / HBM bandwidth) of the chip (pltpu.get_tpu_info):
                an estimate, not a timing; nothing runs here
  compile s     lower + compile wall time on this host

A compiler refusal (Mosaic's, or XLA's out-of-HBM) is printed in place of the row.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dsv3_jax  # noqa: F401  (keeps libtpu from probing this host for chips)
from pallas_kernels import tpu_compile

HEADER = (f"{'kernel':<17} {'shape':<12} {'topology':<10} {'VMEM KiB per call':<34} "
          f"{'GFLOP model':>11} | {'ours GFLOP':>10} {'GB':>7} {'temp MiB':>8} {'roof ms':>7} "
          f"{'comp s':>6} | {'xla GFLOP':>9} {'GB':>7} {'temp MiB':>8} {'roof ms':>7}")


def _vmem_cell(report: tpu_compile.KernelReport) -> str:
    return ",".join(str(v // 1024) for v in report.pallas_vmem_bytes) or "-"


def _cost_cells(report: tpu_compile.KernelReport | None, chip: tpu_compile.Chip,
                width: int) -> str:
    if report is None:
        return ""
    if report.error:
        return f"REFUSED: {report.error[:120]}"
    roof_ms = 1e3 * chip.roofline_s(report.flops, report.bytes_accessed)
    return (f"{report.flops / 1e9:>{width}.0f} {report.bytes_accessed / 1e9:>7.2f} "
            f"{report.temp_bytes / 2**20:>8.0f} {roof_ms:>7.2f}")


def row(case: tpu_compile.Case, topology: str, ours: tpu_compile.KernelReport,
        xla: tpu_compile.KernelReport | None, chip: tpu_compile.Chip) -> str:
    """One table row: our kernel's figures, then XLA's for the same op."""
    lead = f"{case.name:<17} {case.shapes.name:<12} {topology:<10} "
    if ours.error:
        return lead + f"REFUSED: {ours.error}"
    return (lead + f"{_vmem_cell(ours):<34} {case.flops / 1e9:>11.0f} | "
            f"{_cost_cells(ours, chip, 10)} {ours.compile_s:>6.1f} | {_cost_cells(xla, chip, 9)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="v5p:1x1x1,v6e:1x1")
    parser.add_argument("--shapes", default=",".join(tpu_compile.SHAPES))
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA implementations")
    args = parser.parse_args(argv)
    wanted = [w for w in args.cases.split(",") if w]
    print(HEADER)
    for topology in args.topologies.split(","):
        chip = tpu_compile.chip_of(topology)
        for shape in args.shapes.split(","):
            for case in tpu_compile.KERNEL_CASES[shape]:
                if wanted and not any(w in case.name for w in wanted):
                    continue
                ours = case.compile(topology, tpu_compile.PALLAS_TPU)
                xla = None if args.no_xla else case.compile(topology, case.xla_implementation)
                print(row(case, topology, ours, xla, chip), flush=True)
        print(f"{topology}: {chip.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16, "
              f"{chip.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, "
              f"{chip.vmem_bytes // 2**20} MiB VMEM per TensorCore (pltpu.get_tpu_info)")


if __name__ == "__main__":
    main()
