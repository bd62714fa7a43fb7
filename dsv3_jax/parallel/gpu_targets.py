"""GPU clusters to compile for from one GPU: XLA's mock GPU topology (`jax_mock_gpu_topology`).

  target = gpu_targets.target("gpu:2x8")      # 2 hosts x 8 GPUs of this host's kind, one slice
  target.devices                              # 16 devices; this process owns one of them

JAX's GPU client can pretend this process is one of S x H hosts with D GPUs each ("S x H x D",
mocked NCCL): it compiles SPMD programs for every device as a real cluster would, from one
GPU (the kernels are those of the local GPU's architecture). It must be set before the GPU
backend starts, so `target` refuses once JAX has started one, and it needs a GPU host: there is
no compile-only GPU topology without a GPU in JAX 0.11.2 (`jax.experimental.topologies` builds
TPU ones only; a CUDA topology needs the CUDA plugin and a target config of the GPU).

Names: `gpu:HxD` (H hosts of D GPUs; `gpu:1x8` is one 8-GPU host) or `gpu:SxHxD`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
from jax._src import xla_bridge  # the mock topology flag is not on jax.config


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    shape: tuple[int, int, int]  # slices, hosts per slice, GPUs per host
    backend: str = "gpu"

    @property
    def devices(self) -> list:
        return _devices(self.shape)

    @property
    def device_count(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> float:
        """Memory of one GPU: the local GPU's, as its allocator reports it."""
        local = next(d for d in self.devices if d.process_index == jax.process_index())
        return float(local.memory_stats()["bytes_limit"])

    def describe(self) -> str:
        s, h, d = self.shape
        kind = self.devices[0].device_kind
        return (f"{self.name}: {s * h} host(s) x {d} {kind} (mock GPU topology, this process is "
                f"one of them), {self.device_count} devices")


def target(name: str) -> Target:
    m = re.fullmatch(r"gpu:(\d+)x(\d+)(?:x(\d+))?", name)
    if not m:
        raise ValueError(f"--topology={name!r}: a GPU cluster is gpu:HOSTSxGPUS (gpu:1x8, "
                         "gpu:16x8) or gpu:SLICESxHOSTSxGPUS")
    parts = [int(g) for g in m.groups() if g is not None]
    shape = tuple(parts) if len(parts) == 3 else (1, *parts)
    if min(shape) < 1:
        raise ValueError(f"--topology={name!r}: every count must be at least 1")
    return Target(name, shape)


@functools.cache
def _devices(shape: tuple[int, int, int]) -> list:
    wanted = "x".join(map(str, shape))
    current = xla_bridge.MOCK_GPU_TOPOLOGY.value
    if current != wanted:
        if xla_bridge.backends_are_initialized():
            raise ValueError(f"a mock GPU topology ({wanted}) must be set before JAX starts its "
                             "GPU backend: run it in a fresh process")
        jax.config.update("jax_mock_gpu_topology", wanted)
    try:
        devices = jax.devices()
    except RuntimeError as e:
        if "mock_gpu_topology" not in str(e):
            raise
        raise ValueError(f"--topology=gpu:{wanted}: XLA mocks hosts with as many GPUs as this "
                         f"host has ({e}); a host with one GPU can mock gpu:Hx1 (H hosts of one "
                         "GPU), a host with 8 GPUs gpu:Hx8") from None
    if devices[0].platform != "gpu":
        raise ValueError(f"--topology=gpu:{wanted} needs a GPU host (JAX found "
                         f"{devices[0].platform}): JAX 0.11.2 compiles for GPUs only from one")
    return devices
