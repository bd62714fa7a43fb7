"""Our Mosaic TPU kernels compile for real TPU chips (v5p, v6e), not only in interpret mode.

libtpu's compile-only devices (pallas_kernels.tpu_compile) run Mosaic TPU's own checks (block
shapes, layouts, dtypes, VMEM) that the interpreted CPU tests never reach. Each case keeps the
DeepSeek-V3 dims that set the kernels' blocks (D 7168, F 2048, head dims 128/64/128, latent 512,
128 heads in decode) and shrinks only rows, sequence and batch, so the file stays quick.
"""

from __future__ import annotations

import pytest

from pallas_kernels import tpu_compile

TOPOLOGIES = ("v5p:1x1x1", "v6e:1x1")
SMALL = tpu_compile.SHAPES["deepseek_v3"].scaled(rows=4096, experts=8, heads=16, seq_len=1024,
                                                 decode_batch=8, cache_len=1024)
# (case, how many of our kernels its forward + backward compiles to)
CASES = {
    "gmm fwd+bwd": (tpu_compile.gmm_case(SMALL, backward=True), 3),  # gmm, gmm (d_lhs), tgmm
    "attention fwd+bwd": (tpu_compile.attention_case(SMALL, backward=True), 3),  # fwd, dq, dkv
    "decode": (tpu_compile.decode_case(SMALL.scaled(heads=128)), 1),
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_tpu(name, topology):
    case, n_kernels = CASES[name]
    report = case.compile(topology, tpu_compile.PALLAS_TPU)
    assert report.error is None, report.error
    # Mosaic kernels of ours (a pallas_call op name), not XLA's own tpu_custom_calls.
    assert len(report.pallas_vmem_bytes) == n_kernels, report.kernel_ops
    for vmem in report.pallas_vmem_bytes:
        assert 0 < vmem <= report.vmem_capacity, (report.kernel_ops, report.vmem_bytes)
    # The kernels' cost estimates reach XLA's cost analysis (at least the useful matmul FLOPs).
    assert report.flops >= case.flops


def test_vmem_of_reads_scoped_memory():
    hlo = ('  %k = bf16[8] custom-call(%a), custom_call_target="tpu_custom_call", '
           'metadata={op_name="jit(f)/pallas_call"}, backend_config={"custom_call_config":{}, '
           '"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"4096"},'
           '{"memory_space":"0","offset":"0","size":"64"}]}\n  %x = f32[] add(%a, %b)')
    assert tpu_compile.vmem_of(hlo) == [4096]
    assert tpu_compile.mosaic_calls(hlo) == [("jit(f)/pallas_call", 4096)]
