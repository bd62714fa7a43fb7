"""The public functions: init, forward, the latent cache (prefill/decode) and parameter counts.

Variables are a dict of two collections: "params" (float32, trained) and "router_bias" (the
per-expert selection bias of every MoE layer: no gradient, no optimizer state, no weight decay).

Each function resolves the config's implementations for the default backend when called
(`implementations.resolved`; "auto" and "pallas" become what runs, an explicit kernel that cannot
run is refused), and the model is traced from that resolved config. A caller that resolved its
config already (the trainer, generation) passes it through unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import implementations
from dsv3_jax.model.layers import positions_from_segments
from dsv3_jax.model.moe import ROUTER_STATS
from dsv3_jax.model.transformer import MTPModule, Transformer, head_logits
from dsv3_jax.parallel.sharding import Parallel

Variables = dict[str, Any]


@flax.struct.dataclass
class ModelOutput:
    """logits [B,T,V] fp32 (or None with return_hidden); mtp_logits: one [B,T,V] per MTP depth k,
    where position i predicts token i+k+1 (positions i >= T-k are not meaningful); hidden /
    mtp_hidden: the states the head reads; router_stats: per MoE layer `expert_counts` and
    `mean_affinity` [.., B, E], at the same tree paths as the biases in variables["router_bias"].
    """

    logits: jax.Array | None
    mtp_logits: tuple[jax.Array, ...] | None
    hidden: jax.Array
    mtp_hidden: tuple[jax.Array, ...]
    router_stats: dict


@flax.struct.dataclass
class Cache:
    """Latent KV cache: per stack [layers, B, L, R+Hr] and the filled length of each sequence."""

    kv: dict[str, jax.Array]
    lengths: jax.Array  # [B] int32


def check_tokens(tokens, cfg: ModelConfig) -> None:
    """Refuse token ids outside [0, vocab_size) when the values are known (not under jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ValueError(
            f"token id {int(bad)} is outside the vocabulary [0, {cfg.vocab_size}) of this model")


def _for_backend(config: ModelConfig) -> ModelConfig:
    """`config` with its implementations resolved for the default backend; a config already
    resolved (by a trainer or generator built for another backend, as `launch.compile` builds
    one for a TPU target on a CPU host) passes through as it is."""
    if implementations.is_resolved(config):
        return config
    return implementations.resolved(config, jax.default_backend())


def init(config: ModelConfig, rng: jax.Array) -> Variables:
    """Random initial variables (params: N(0, init_std^2) matrices, unit norms; zero bias)."""
    return _init(_for_backend(config), rng)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = _model(config).init(rng, tokens, jnp.zeros_like(tokens), None,
                                jnp.ones(tokens.shape, bool))
    boxed.pop(ROUTER_STATS, None)
    return nn.meta.unbox(boxed)


def abstract_variables(config: ModelConfig) -> Variables:
    """Shapes and dtypes of every variable, with their logical-axis metadata; allocates nothing."""
    config = _for_backend(config)

    def boxed_init(rng, tokens, valid):
        out = _model(config).init(rng, tokens, tokens, None, valid)
        out.pop(ROUTER_STATS, None)
        return out

    return jax.eval_shape(boxed_init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32),
                          jax.ShapeDtypeStruct((1, 8), jnp.bool_))


def logical_axes(config: ModelConfig) -> Variables:
    """The logical axis names of every variable (a PartitionSpec of names per leaf)."""
    return nn.get_partition_spec(abstract_variables(config))


def forward(config: ModelConfig, variables: Variables, tokens, segment_ids=None, *,
            return_hidden: bool = False, parallel: Parallel | None = None) -> ModelOutput:
    """Training-form forward pass over whole sequences.

    tokens: [B, T] int32. segment_ids: optional [B, T] int32 for packed documents (no attention
    across segments; positions restart at each segment; 0 marks padding, excluded from the router
    statistics). With return_hidden the head is not applied (for chunked losses). With a
    `parallel` layout the routed experts run expert-parallel over its mesh.
    """
    check_tokens(tokens, config)
    if segment_ids is not None and np.shape(segment_ids) != np.shape(tokens):
        raise ValueError(
            f"segment_ids shape {np.shape(segment_ids)} differs from tokens {np.shape(tokens)}")
    return _forward(_for_backend(config), variables, tokens, segment_ids, return_hidden,
                    parallel)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _forward(config, variables, tokens, segment_ids, return_hidden, parallel):
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        valid = jnp.ones(tokens.shape, bool)
    else:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        positions = positions_from_segments(segment_ids)
        valid = segment_ids != 0
    (h, mtp_h, _), state = Transformer(config, parallel=parallel).apply(
        variables, tokens, positions, segment_ids, valid, mutable=[ROUTER_STATS])
    stats = state.get(ROUTER_STATS, {})
    if return_hidden:
        return ModelOutput(None, None, h, mtp_h, stats)
    params = variables["params"]
    return ModelOutput(head_logits(params, h), tuple(head_logits(params, m) for m in mtp_h),
                       h, mtp_h, stats)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty latent cache for `batch` sequences of up to `max_len` tokens (capacity rounded
    up to a multiple of 64 rows, the decode kernel's tile)."""
    rows = _cache_rows(config, batch, max_len)
    dtype = dtype or jnp.dtype(config.dtype)
    kv = {}
    for name, n in (("dense_layers", config.n_dense_layers), ("moe_layers", config.n_moe_layers)):
        if n:
            kv[name] = jnp.zeros((n, *rows), dtype)
    return Cache(kv, jnp.zeros((batch,), jnp.int32))


def _cache_rows(config: ModelConfig, batch: int, max_len: int) -> tuple[int, int, int]:
    """[batch, capacity, kv_lora_rank + qk_rope_head_dim] of one layer's latent cache: capacity
    is max_len rounded up to the decode kernel's 64-row tile; refuses max_len > max_seq_len."""
    if max_len > config.max_seq_len:
        raise ValueError(
            f"cache length {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
    return batch, -(-max_len // 64) * 64, config.kv_lora_rank + config.qk_rope_head_dim


def prefill(config: ModelConfig, variables: Variables, tokens, lengths, cache: Cache, *,
            return_hidden: bool = False, parallel: Parallel | None = None):
    """Run right-padded prompts [B, T] (true lengths [B]) through the expanded form into an EMPTY
    cache. Returns (logits [B, T, V] fp32, cache with lengths = lengths), and the final-normed
    hidden states [B, T, D] with return_hidden. With a `parallel` layout the rows are split over
    its batch axes and the routed experts run expert-parallel (a serving slice)."""
    check_tokens(tokens, config)
    logits, cache, hidden = _prefill(_for_backend(config), variables, tokens,
                                     jnp.asarray(lengths, jnp.int32), cache, parallel)
    return (logits, cache, hidden) if return_hidden else (logits, cache)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(config, variables, tokens, lengths, cache, parallel=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = positions < jnp.asarray(lengths)[:, None]
    (h, _, kv), _ = _model(config, parallel=parallel).apply(
        variables, tokens, positions, None, valid, cache.kv, jnp.zeros((B,), jnp.int32),
        mutable=[ROUTER_STATS])
    return head_logits(variables["params"], h), Cache(kv, lengths), h


def decode(config: ModelConfig, variables: Variables, tokens, cache: Cache, *,
           return_hidden: bool = False, parallel: Parallel | None = None):
    """Append tokens [B, Tq] after each sequence's cached ones and attend with the absorbed form
    over the latent cache. Returns (logits [B, Tq, V] fp32, updated cache), and the final-normed
    hidden states [B, Tq, D] with return_hidden. To roll back (rejected speculative tokens),
    lower `cache.lengths`: rows past it are ignored and later overwritten. `parallel` as for
    `prefill`."""
    check_tokens(tokens, config)
    logits, cache, hidden = _decode(_for_backend(config), variables, tokens, cache, parallel)
    return (logits, cache, hidden) if return_hidden else (logits, cache)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=3)
def _decode(config, variables, tokens, cache, parallel=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    Tq = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(Tq, dtype=jnp.int32)[None, :]
    valid = jnp.ones(tokens.shape, bool)
    (h, _, kv), _ = _model(config, decode=True, parallel=parallel).apply(
        variables, tokens, positions, None, valid, cache.kv, cache.lengths,
        mutable=[ROUTER_STATS])
    return head_logits(variables["params"], h), Cache(kv, cache.lengths + Tq), h


def init_mtp_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty latent cache for the MTP blocks (one per depth), for speculative decoding."""
    if not config.mtp_depth:
        raise ValueError("this model has no MTP module (mtp_depth=0)")
    rows = _cache_rows(config, batch, max_len)
    dtype = dtype or jnp.dtype(config.dtype)
    kv = {f"mtp_{k}": jnp.zeros(rows, dtype) for k in range(config.mtp_depth)}
    return Cache(kv, jnp.zeros((batch,), jnp.int32))


def mtp_step(config: ModelConfig, variables: Variables, h_prev, next_tokens, cache: Cache, *,
             prefill: bool, depth: int = 0):
    """One MTP depth over new positions with its latent cache (speculative decoding).

    h_prev: [B, T, D] the previous depth's states at these positions (depth 0: the main
    model's final-normed states); next_tokens: [B, T] the token one ahead of each position
    (t_{i+depth+1}). prefill=True runs the expanded form into an EMPTY cache (positions 0..T-1);
    otherwise the absorbed form appends after cache.lengths. Returns (logits [B, T, V] fp32
    predicting t_{i+depth+2}, h [B, T, D] for the next depth, updated cache).
    """
    check_tokens(next_tokens, config)
    return _mtp_step(_for_backend(config), variables, h_prev,
                     jnp.asarray(next_tokens, jnp.int32), cache, prefill, depth)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _mtp_step(config, variables, h_prev, next_tokens, cache, prefill, depth):
    name = f"mtp_{depth}"
    params = variables["params"]
    B, T = next_tokens.shape
    starts = jnp.zeros((B,), jnp.int32) if prefill else cache.lengths
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    emb = jnp.take(params["embed"], next_tokens, axis=0).astype(jnp.dtype(config.dtype))
    sub = {"params": params[name], "router_bias": variables["router_bias"][name]}
    (h, normed, kv), _ = MTPModule(config, decode=not prefill).apply(
        sub, h_prev, emb, positions, None, jnp.ones((B, T), bool), cache.kv[name], starts,
        mutable=[ROUTER_STATS])
    lengths = jnp.full((B,), T, jnp.int32) if prefill else cache.lengths + T
    return head_logits(params, normed), h, Cache({**cache.kv, name: kv}, lengths)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from shapes alone (no allocation).

    main: everything but MTP; mtp: the MTP modules as the released files store them (each with
    its own copy of the embedding and head, as layer `n_layers`); active: parameters a token
    uses in the main model (top-k routed experts + shared experts + everything dense).
    """
    abstract = nn.meta.unbox(abstract_variables(config))["params"]
    sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
             for k, v in abstract.items()}
    mtp = sum(v for k, v in sizes.items() if k.startswith("mtp_"))
    main = sum(sizes.values()) - mtp
    embed_and_head = 2 * config.vocab_size * config.dim
    per_expert = 3 * config.dim * config.moe_inter_dim
    inactive = config.n_moe_layers * (config.n_routed_experts - config.n_activated_experts)
    return {
        "main": main,
        "mtp": mtp + config.mtp_depth * embed_and_head,
        "total_released": main + mtp + config.mtp_depth * embed_and_head,
        "active": main - inactive * per_expert,
    }


def _model(config: ModelConfig, decode: bool = False,
           parallel: Parallel | None = None) -> Transformer:
    return Transformer(config, decode=decode, parallel=parallel)
