"""Optimizer and schedules: AdamW with masked weight decay, global-norm clipping, and piecewise
schedules (the paper's warmup / constant / cosine / constants learning rate, and token-count
schedules for the MTP weight and the bias update rate)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

PHASE_KINDS = ("linear", "constant", "cosine")


def check_schedule(start: float, phases: Sequence[Sequence]) -> None:
    """Refuse a learning-rate schedule that cannot be meant: a malformed phase, a negative or
    non-finite value anywhere, or a peak of 0 (the weights would never move). Starting or ending
    at 0 (a warmup from 0, a decay to 0) is fine."""
    start, ends = float(start), []
    for i, phase in enumerate(phases):
        if len(phase) != 3 or phase[0] not in PHASE_KINDS:
            raise ValueError(
                f"schedule phase {i} is {tuple(phase)!r}; each phase is (kind, steps, end_value) "
                f"with kind one of {PHASE_KINDS}")
        if int(phase[1]) < 0:
            raise ValueError(f"schedule phase {i} has {phase[1]} steps; steps must be >= 0")
        ends.append(float(phase[2]))
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"schedule starts at {start} (start_lr); a learning rate must be a "
                         f"finite value >= 0")
    for i, end in enumerate(ends):
        if not (math.isfinite(end) and end >= 0):
            raise ValueError(f"schedule phase {i} {tuple(phases[i])!r} ends at {end}; a learning "
                             f"rate must be a finite value >= 0")
    if max([start, *ends]) == 0:
        raise ValueError(f"schedule never rises above 0 (start {start}, phase ends {ends}), so "
                         f"the weights would never move; give a phase a positive end_value")


def piecewise_schedule(start: float, phases: Sequence[Sequence]) -> optax.Schedule:
    """A learning rate made of phases (kind, steps, end_value), starting from `start`.

    kind "linear" ramps linearly to end_value over `steps`; "cosine" follows half a cosine to
    end_value; "constant" holds end_value. The last value holds after the final phase.
    Example (paper 4.2, in steps): [("linear", 2000, 2.2e-4), ("constant", n1, 2.2e-4),
    ("cosine", n2, 2.2e-5), ("constant", n3, 2.2e-5), ("constant", n4, 7.3e-6)].
    """
    check_schedule(start, phases)
    schedules, boundaries, value, step = [], [], float(start), 0
    for phase in phases:
        kind, steps, end = phase[0], int(phase[1]), float(phase[2])
        if kind == "linear":
            schedules.append(optax.linear_schedule(value, end, max(steps, 1)))
        elif kind == "cosine":
            alpha = end / value if value else 0.0
            schedules.append(optax.cosine_decay_schedule(value, max(steps, 1), alpha))
        else:
            schedules.append(optax.constant_schedule(end))
        value = end
        step += steps
        boundaries.append(step)
    schedules.append(optax.constant_schedule(value))
    return optax.join_schedules(schedules, boundaries)


def token_schedule(points: Sequence[Sequence[float]]):
    """Piecewise-constant value of the tokens seen: points ((from_tokens, value), ...)."""
    starts = jnp.asarray([float(p[0]) for p in points], jnp.float32)
    values = jnp.asarray([float(p[1]) for p in points], jnp.float32)
    if len(points) == 0 or float(points[0][0]) != 0.0:
        raise ValueError(f"token schedule {points!r} must start with a point at 0 tokens")

    def value_at(tokens_seen):
        index = jnp.searchsorted(starts, jnp.asarray(tokens_seen, jnp.float32), side="right") - 1
        return values[index]

    return value_at


def decay_mask(params) -> dict:
    """True for weights that take weight decay: every matrix, not the norm scales (the router
    bias is not in params at all)."""
    def keep(path, _):
        return not any(getattr(k, "key", None) == "scale" for k in path)

    return jax.tree_util.tree_map_with_path(keep, params)


MOMENTS_DTYPES = ("float32", "bfloat16")


def check_moments_dtype(moments_dtype: str) -> None:
    """Refuse a moments dtype AdamW cannot keep its mu and nu in."""
    if moments_dtype not in MOMENTS_DTYPES:
        raise ValueError(f"optimizer.moments_dtype={moments_dtype!r} is not one of "
                         f"{MOMENTS_DTYPES}")


def with_nu_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` (optax.scale_by_adam) with its second moment kept in `dtype`.

    optax 0.2.8's scale_by_adam takes `mu_dtype` but starts nu as zeros like the parameters
    (fp32); its update computes nu in fp32 and casts it back like the state's nu
    (`tree.cast_like`), so a nu started in `dtype` stays in `dtype`. Only the init changes."""
    def init_fn(params):
        state = inner.init(params)
        return state._replace(nu=jax.tree.map(lambda v: v.astype(dtype), state.nu))

    return optax.GradientTransformation(init_fn, inner.update)


def adamw(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
          weight_decay: float, clip_norm: float,
          moments_dtype: str = "float32") -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decay masked off the norms.

    moments_dtype "bfloat16" keeps AdamW's first and second moments in bf16 (DeepSeek-V3
    section 3.3.3, "Low-Precision Storage"); the update itself is computed in fp32 from them,
    and the state has the same structure as with "float32" (optax.adamw's chain,
    scale_by_adam's state)."""
    check_moments_dtype(moments_dtype)
    if moments_dtype == "float32":
        return optax.chain(
            optax.clip_by_global_norm(clip_norm),
            optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask),
        )
    dtype = jnp.dtype(moments_dtype)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.chain(  # optax.adamw's own chain, with nu in `dtype` too
            with_nu_dtype(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=dtype), dtype),
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.scale_by_learning_rate(learning_rate),
        ),
    )
