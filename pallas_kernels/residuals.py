"""Naming the values a kernel's custom_vjp forward keeps for its backward pass.

Under a remat policy that saves them (the model's "save_kernels"), a scanned layer stacks
these values into its saved outputs with a dynamic-update-slice. XLA's GPU dynamic-slice fusion
then rewrites "kernel -> dynamic-update-slice" so the kernel writes straight into the stack, and
when the kernel's results have other users too it keeps the original call as well: every
forward kernel ran twice (measured: the `small` step's gate/up kernel 2 x 3.5 ms per layer and
microbatch). An optimization barrier between the kernel and the saved copy stops that rewrite;
the stacking becomes a copy instead, much cheaper than a second kernel.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

KERNEL_RESIDUALS = "kernel_residuals"


def saveable(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays, named KERNEL_RESIDUALS, behind an optimization barrier (see above)."""
    return tuple(checkpoint_name(a, KERNEL_RESIDUALS)
                 for a in jax.lax.optimization_barrier(arrays))
