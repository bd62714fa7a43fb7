"""The implementation names the kernel entry points take, defined once.

  "pallas_gpu"  the Mosaic GPU kernel, whatever the default backend
  "pallas_tpu"  the Mosaic TPU kernel, whatever the default backend
  "pallas"      for direct kernel users: the kernel of `jax.default_backend()` when traced (the
                TPU kernel on a TPU, the GPU kernel elsewhere; see `for_backend`)

With `interpret=True` either kernel runs on the CPU. dsv3_jax never passes a bare "pallas": it
resolves its config to "pallas_gpu" / "pallas_tpu" once, for the backend the model is built for
(dsv3_jax.model.implementations), so nothing reads the default backend while the model traces.
Each entry point's full list is below; the model's config takes the same names.
"""

from __future__ import annotations

PALLAS = "pallas"
PALLAS_GPU = "pallas_gpu"
PALLAS_TPU = "pallas_tpu"
PALLAS_IMPLEMENTATIONS = (PALLAS, PALLAS_GPU, PALLAS_TPU)

# What each entry point accepts.
GROUPED_MATMUL = ("reference", "xla", *PALLAS_IMPLEMENTATIONS)  # grouped_matmul.grouped_matmul
ROUTED_EXPERTS = ("dense", "xla", *PALLAS_IMPLEMENTATIONS)  # expert_dispatch.routed_experts
MLA_ATTENTION = ("xla", "cudnn", *PALLAS_IMPLEMENTATIONS)  # mla_attention.mla_attention
MLA_DECODE = ("xla", *PALLAS_IMPLEMENTATIONS)  # mla_decode.mla_decode

_KERNEL_OF_CHIP = {"gpu": PALLAS_GPU, "tpu": PALLAS_TPU}


def for_chip(chip: str) -> str:
    """The kernel implementation of `chip` ("gpu" | "tpu"): "pallas_gpu" | "pallas_tpu"."""
    return _KERNEL_OF_CHIP[chip]


def chip_of(implementation: str) -> str:
    """The chip ("gpu" | "tpu") a kernel implementation ("pallas_gpu" | "pallas_tpu") runs on."""
    return {kernel: chip for chip, kernel in _KERNEL_OF_CHIP.items()}[implementation]


def for_backend(backend: str) -> str:
    """What a bare "pallas" runs on `backend` (`jax.default_backend()`): "pallas_tpu" on "tpu",
    "pallas_gpu" on any other backend."""
    return PALLAS_TPU if backend == "tpu" else PALLAS_GPU
