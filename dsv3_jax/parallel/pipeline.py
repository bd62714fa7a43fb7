"""Pipeline parallelism for the MoE stack: stages over the mesh's `pipeline` axis.

Legend: P stages, V repeats (circular), L MoE layers in P*V chunks of at most Lc layers,
M microbatches of b sequences, T tokens, D model dim, E experts.

All stages run in one SPMD program: `jax.vmap(stage_fn, spmd_axis_name="pipeline")` over the
stage axis of the weights and of a state buffer [P, b, T, D], whose roll by one stage after each
iteration becomes a collective permute. Iteration t gives stage p the pass g = t - p of the
microbatch stream: microbatch g % M at repeat g // M; passes outside [0, M*V) are bubble.

  GPipe (V = 1): stage p holds layers [p*Lc, (p+1)*Lc); M + P - 1 iterations;
                 bubble (P-1)/(M+P-1).
  circular (V > 1): stage p holds layers of chunks p, P+p, 2P+p, ... (chunk c = layers
                 [c*Lc, (c+1)*Lc)); microbatches go round the ring V times; M*V + P - 1
                 iterations of 1/V the work; bubble (P-1)/(M*V+P-1). The MoE stack is stored
                 in layer order split contiguously over stages, so the circular layout is made
                 inside the step: (1 - 1/V) of the MoE weights move between stages per step (and
                 their gradients back). Worth it when activations, not weights, dominate.
Uneven stages: when P*V does not divide L, chunks hold floor(L/(P*V)) or one more layer (the
extra ones in the middle chunks, `chunk_sizes`); every chunk is padded to Lc with masked
no-op slots (the slot computes, its output and statistics are discarded), which costs nothing in
the lockstep schedule: an iteration takes as long as the fullest stage anyway.
The backward pass is JAX's reverse of this loop (GPipe order: all forwards, then all backwards).
Embedding, dense layers, head and MTP run outside the pipelined region, split over every
device (pipeline x data x expert) rather than placed on the first and last stages.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: int
    microbatches: int
    schedule: str = "gpipe"
    repeats: int = 1  # V, circular only

    @property
    def rounds(self) -> int:
        """V: passes of the stack through the stages (repeats for circular, 1 for GPipe)."""
        return self.repeats if self.schedule == "circular" else 1

    @property
    def virtual_stages(self) -> int:
        return self.stages * self.rounds

    @property
    def iterations(self) -> int:
        """Steps of the pipelined loop: M V + P - 1."""
        return self.microbatches * self.rounds + self.stages - 1

    def bubble_fraction(self) -> float:
        passes = self.microbatches * self.virtual_stages // self.stages
        return (self.stages - 1) / (passes + self.stages - 1)


def check(spec: PipelineSpec, n_layers: int, batch: int) -> None:
    """Clear errors for a pipeline that cannot run this stack."""
    if spec.schedule not in SCHEDULES:
        raise ValueError(f"mesh.pipeline_schedule={spec.schedule!r} is not one of {SCHEDULES}")
    if spec.schedule == "circular" and spec.repeats < 2:
        raise ValueError(f"mesh.pipeline_repeats={spec.repeats}: circular needs at least 2")
    if n_layers < spec.virtual_stages:
        raise ValueError(
            f"{n_layers} MoE layers cannot fill {spec.stages} stages x "
            f"{spec.virtual_stages // spec.stages} repeats (at least one layer each); use "
            f"mesh.pipeline <= {n_layers // (spec.virtual_stages // spec.stages)}")
    if batch % spec.microbatches:
        raise ValueError(f"{batch} sequences per step do not split into "
                         f"mesh.pipeline_microbatches={spec.microbatches}")
    if spec.schedule == "circular" and spec.microbatches < spec.stages:
        raise ValueError(f"circular pipelining needs mesh.pipeline_microbatches >= stages "
                         f"({spec.microbatches} < {spec.stages})")


def chunk_sizes(n_layers: int, chunks: int) -> tuple[int, ...]:
    """Layers per chunk (chunk c = v*P + p), in layer order: floor(L/chunks) each, and one more
    for the `L % chunks` middle chunks (the first and last stages' neighbours in the model, the
    embedding and the head, also run there in DeepSeek-V3's own placement)."""
    base, extra = divmod(n_layers, chunks)
    first = (chunks - extra) // 2
    return tuple(base + (first <= c < first + extra) for c in range(chunks))


def split_rows(x, m: int):
    """[B, ...] -> [M, B/M, ...] taking rows m, m+M, ...: each device keeps a share."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def merge_rows(x):
    """Inverse of split_rows: [M, b, ...] -> [M*b, ...]."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run(layer_fn: Callable, weights, h_btd, aux: dict, spec: PipelineSpec):
    """Run `layer_fn` over the stacked layers of `weights` (leading axis L) with pipelining.

    layer_fn(layer_weights, h [b,T,D], aux_b) -> (h, stats): one layer on one microbatch; aux is
    a dict of [B, ...] per-sequence inputs (positions, segments, valid) split like h. Returns
    (h [B,T,D], stats with leading [L, B, ...]) — the same as scanning the layers in order.
    """
    P, M = spec.stages, spec.microbatches
    V = spec.virtual_stages // P
    L = jax.tree.leaves(weights)[0].shape[0]
    slots = _Slots.of(L, P, V)
    stage_w = _stage_weights(weights, slots, P, V)
    valid_pvl = jnp.asarray(slots.valid)
    x_mbtd = split_rows(h_btd, M)
    aux_m = {k: split_rows(a, M) for k, a in aux.items()}
    b, T, D = x_mbtd.shape[1:]
    stage_fn = _stage_fn(layer_fn, slots.uneven)
    run_stages = jax.vmap(stage_fn, spmd_axis_name="pipeline")
    stats_shape = jax.eval_shape(
        lambda: stage_fn(jax.tree.map(lambda a: a[0], stage_w), valid_pvl[0], 0, x_mbtd[0],
                         {k: a[0] for k, a in aux_m.items()})[1])
    stages = jnp.arange(P)
    Lc = slots.Lc

    def iteration(carry, t):
        state, circ, out, stats = carry
        g = t - stages  # pass of each stage
        active = (g >= 0) & (g < M * V)
        m, v = jnp.clip(g, 0, M * V - 1) % M, jnp.clip(g, 0, M * V - 1) // M
        first_in = jnp.where(v[0] == 0, x_mbtd[m[0]], circ[m[0]])
        state = state.at[0].set(first_in)
        aux_p = {k: a[m] for k, a in aux_m.items()}  # [P, b, ...]: each stage's microbatch
        new, layer_stats = run_stages(stage_w, valid_pvl, v, state, aux_p)
        last, m_last, v_last = new[P - 1], m[P - 1], v[P - 1]
        circ = circ.at[m_last].set(jnp.where(active[P - 1], last, circ[m_last]))
        done = active[P - 1] & (v_last == V - 1)
        out = out.at[m_last].set(jnp.where(done, last, out[m_last]))
        # Stats of real passes only, into [V, P, Lc, M, b, ...] (layer chunk v*P + p).
        def put(acc, s):
            s = jnp.where(active.reshape((P,) + (1,) * (s.ndim - 1)), s, 0)
            return acc.at[v, stages, :, m].add(s)

        stats = jax.tree.map(put, stats, layer_stats)
        return (jnp.roll(new, 1, axis=0), circ, out, stats), None

    zeros_stats = jax.tree.map(
        lambda s: jnp.zeros((V, P, Lc, M, *s.shape[1:]), s.dtype), stats_shape)
    init = (jnp.zeros((P, b, T, D), h_btd.dtype), jnp.zeros_like(x_mbtd),
            jnp.zeros_like(x_mbtd), zeros_stats)
    n_iter = M * V + P - 1
    (_, _, out, stats), _ = jax.lax.scan(iteration, init, jnp.arange(n_iter))
    return merge_rows(out), jax.tree.map(functools.partial(_layer_order, slots, P, V, M), stats)


@dataclasses.dataclass(frozen=True)
class _Slots:
    """Where each layer runs: slot (p, v, j) of stage p, repeat v runs layer layer[p, v, j] of
    chunk c = v*P + p when valid[p, v, j] (j < sizes[c]); padded slots repeat the chunk's last
    layer and are masked off."""

    sizes: tuple[int, ...]     # layers of each chunk (`chunk_sizes`)
    layer: np.ndarray          # [P, V, Lc] int
    valid: np.ndarray          # [P, V, Lc] bool
    slot_of_layer: np.ndarray  # [L] int: the slot c*Lc + j of each layer, in layer order

    @classmethod
    def of(cls, L: int, P: int, V: int) -> _Slots:
        sizes = chunk_sizes(L, P * V)
        Lc = max(sizes)
        starts = np.cumsum((0, *sizes[:-1]))
        layer = np.array([[[starts[v * P + p] + min(j, sizes[v * P + p] - 1) for j in range(Lc)]
                           for v in range(V)] for p in range(P)])
        valid = np.array([[[j < sizes[v * P + p] for j in range(Lc)] for v in range(V)]
                          for p in range(P)])
        slot_of_layer = np.array([(c * Lc + j) for c in range(P * V) for j in range(sizes[c])])
        return cls(sizes, layer, valid, slot_of_layer)

    @property
    def Lc(self) -> int:
        return max(self.sizes)

    @property
    def uneven(self) -> bool:
        return not self.valid.all()


def _stage_weights(weights, slots: _Slots, P: int, V: int):
    """[L, ...] leaves -> [P, V, Lc, ...]: the layers of each stage's slots."""
    if slots.uneven:
        return jax.tree.map(lambda w: w[slots.layer], weights)
    # even chunks: a reshape, without a gather
    return jax.tree.map(lambda w: w.reshape(V, P, slots.Lc, *w.shape[1:]).swapaxes(0, 1), weights)


def _stage_fn(layer_fn: Callable, uneven: bool) -> Callable:
    """stage_fn(w_v [V, Lc, ...], valid_v [V, Lc], v, h [b,T,D], aux_b) -> (h, stats [Lc, ...]):
    one stage's Lc slots of repeat v on one microbatch (padded slots pass h through, stats 0)."""
    def stage_fn(w_v, valid_v, v, h, aux_b):
        w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, v, 0, keepdims=False), w_v)
        valid = jax.lax.dynamic_index_in_dim(valid_v, v, 0, keepdims=False)

        def body(carry, xs):
            layer_w, ok = xs
            new, stats = layer_fn(layer_w, carry, aux_b)
            if not uneven:
                return new, stats
            return jnp.where(ok, new, carry), jax.tree.map(lambda a: jnp.where(ok, a, 0), stats)

        return jax.lax.scan(body, h, (w, valid))

    return stage_fn


def _layer_order(slots: _Slots, P: int, V: int, M: int, s):
    """Stats of the slots [V, P, Lc, M, b, ...] -> [L, B, ...] in layer order, real slots only."""
    s = s.reshape(V * P * slots.Lc, M, *s.shape[4:])
    return jax.vmap(merge_rows)(s if not slots.uneven else s[slots.slot_of_layer])
