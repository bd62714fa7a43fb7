"""TPU slices to compile for without a TPU: a slice name -> libtpu's compile-only devices.

  target = tpu_targets.target("v5p-1024")        # or "v5p:8x8x8", "v6e-256", num_slices=2
  target.devices                                 # 512 compile-only devices, all hosts
  target.hbm_bytes                               # per device (one chip)

libtpu (the `tpu` extra) builds the devices of a named topology on any host
(`jax.experimental.topologies.get_topology_desc`): XLA:TPU and Mosaic TPU compile for them as for
a real slice, every host's devices included, with no `jax.distributed` and no TPU attached.

Names: libtpu's own, `GEN:SHAPE` (`v5p:2x2x1`, `v4:2x2x2`: chips per torus axis; `v6e:4x4`,
`v5e:2x4`: 2-D), or Cloud TPU's slice names: `v5p-N` and `v4-N` count TensorCores (two per chip,
so `v5p-1024` is 512 chips, 8x8x8), `v6e-N` and `v5litepod-N` count chips. One JAX device is one
chip (v5p fuses its two cores, megacore); libtpu gives v4's two cores as two devices.
"""

from __future__ import annotations

import dataclasses
import math
import re

from pallas_kernels import tpu_compile

GB = 1e9
# HBM per chip by libtpu generation name: Cloud TPU's system architecture pages (v4 32 GiB, v5e
# 16, v6e 32); v5p as libtpu 0.0.48.1 states it ("available HBM (95.73G)" in its out-of-memory
# error; the pages say 95).
HBM_GIB = {"v4": 32, "v5p": 95.73, "v5e": 16, "v6e": 32}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # what a Cloud slice name counts
DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
CLOUD_PREFIX = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
# Cloud TPU's shapes where the most balanced power-of-two torus is not the one sold.
CLOUD_SHAPES = {("v5p", 4): (2, 2, 1), ("v4", 4): (2, 2, 1), ("v6e", 2): (1, 2),
                ("v5e", 2): (1, 2)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice (or `num_slices` slices joined by the data-center network) to compile for."""

    name: str  # as the user wrote it
    generation: str  # v4, v5p, v5e, v6e
    shape: tuple[int, ...]  # chips per torus axis of one slice
    num_slices: int = 1
    backend = "tpu"

    @property
    def topology(self) -> str:
        """libtpu's name of one slice."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def devices(self) -> list:
        return tpu_compile.target_devices(self.topology, self.num_slices)

    @property
    def device_count(self) -> int:
        """JAX devices of the slice(s): one per chip, except v4, whose two cores libtpu gives as
        two devices."""
        return len(self.devices)

    @property
    def hbm_bytes(self) -> float:
        """HBM of one JAX device."""
        return HBM_GIB[self.generation] * 2**30 * self.chips / self.device_count

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (f"{self.name}: {self.topology}{slices}, {self.chips} chips of "
                f"{HBM_GIB[self.generation]} GiB HBM, {self.device_count} devices")


def target(name: str, num_slices: int = 1) -> Target:
    """The Target of a slice name (module docstring); ValueError naming what would be right."""
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"--num_slices={num_slices!r} must be a positive integer")
    known = ", ".join(sorted(DIMS))
    if m := re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name):
        gen, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
        if gen not in DIMS:
            raise ValueError(f"--topology={name!r}: unknown TPU generation {gen!r} (one of "
                             f"{known})")
        if len(shape) != DIMS[gen] or min(shape) < 1:
            example = "x".join(["2"] * DIMS[gen])
            raise ValueError(f"--topology={name!r}: a {gen} slice has {DIMS[gen]} torus axes "
                             f"of at least one chip, e.g. {gen}:{example}")
        return Target(name, gen, shape, num_slices)
    if m := re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name):
        prefix, count = m.group(1), int(m.group(2))
        if prefix not in CLOUD_PREFIX:
            raise ValueError(f"--topology={name!r}: unknown slice family {prefix!r} (one of "
                             f"{', '.join(sorted(CLOUD_PREFIX))})")
        gen = CLOUD_PREFIX[prefix]
        per_chip = CORES_PER_CHIP[gen]
        chips = count // per_chip
        if count % per_chip or chips < 1 or chips & (chips - 1):
            unit = "TensorCores (two per chip)" if per_chip == 2 else "chips"
            raise ValueError(f"--topology={name!r}: {prefix}-N counts {unit}: N must be "
                             f"{per_chip} x a power of two, e.g. {prefix}-{8 * per_chip}")
        return Target(name, gen, cloud_shape(gen, chips), num_slices)
    raise ValueError(f"--topology={name!r} is not a TPU slice: write libtpu's GEN:SHAPE "
                     "(v5p:2x2x1, v6e:4x4) or a Cloud TPU name (v5p-1024, v6e-256)")


def cloud_shape(generation: str, chips: int) -> tuple[int, ...]:
    """The torus Cloud TPU sells for `chips` (a power of two): the most balanced shape,
    ascending (v5p 512 chips: 8x8x8; 1024: 8x8x16; v6e 256: 16x16)."""
    if (generation, chips) in CLOUD_SHAPES:
        return CLOUD_SHAPES[(generation, chips)]
    shape = [1] * DIMS[generation]
    for _ in range(chips.bit_length() - 1):
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape))

