"""What the links between this host's devices carry: all-reduce, all-to-all and a ring
permute through XLA's collectives (NCCL on GPUs), the operations data, expert and pipeline
parallelism use. The figures to read weak-scaling results against.

  python -m benchmarks.interconnect --mib=256

Bus bandwidth (NCCL's convention, comparable across device counts): all-reduce moves
2 (n-1)/n of the buffer per device, all-to-all (n-1)/n, the ring permute all of it.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

_MIB = flags.DEFINE_integer("mib", 256, "Buffer per device, MiB (bf16).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats (after one warm-up).")


def collectives(n: int) -> dict:
    ring = [(i, (i + 1) % n) for i in range(n)]
    return {
        "all-reduce": (lambda x: jax.lax.psum(x, "d"), 2 * (n - 1) / n),
        "all-to-all": (lambda x: jax.lax.all_to_all(x, "d", 0, 0, tiled=True), (n - 1) / n),
        "ring permute": (lambda x: jax.lax.ppermute(x, "d", ring), 1.0),
    }


def main(argv):
    del argv
    n = jax.device_count()
    print(f"{n} x {jax.devices()[0].device_kind}, {_MIB.value} MiB per device")
    if n < 2:
        print("one device: nothing to measure")
        return
    mesh = jax.make_mesh((n,), ("d",))
    rows = _MIB.value * 2**20 // 2 // 1024
    x = jax.device_put(jnp.ones((n * rows, 1024), jnp.bfloat16),
                       NamedSharding(mesh, PartitionSpec("d")))
    nbytes = rows * 1024 * 2
    for name, (op, factor) in collectives(n).items():
        f = jax.jit(jax.shard_map(op, mesh=mesh, in_specs=PartitionSpec("d"),
                                  out_specs=PartitionSpec("d")))
        jax.block_until_ready(f(x))
        times = []
        for _ in range(_REPEATS.value):
            t = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(f"{name:<14}{1e3 * s:>9.2f} ms   bus {factor * nbytes / s / 1e9:>7.1f} GB/s "
              f"(min {1e3 * np.min(times):.2f} ms)", flush=True)


if __name__ == "__main__":
    app.run(main)
