"""Building blocks: weight declaration, RMSNorm, interleaved RoPE with YaRN, SwiGLU.

Einsum legend (used across dsv3_jax): B batch, T query length, S key length, D model dim,
N heads, H head dim, R kv latent rank, Q q latent rank, E experts, F FFN hidden, K top-k,
G expert groups, V vocab, C concatenated input (2D for the MTP projection).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, yarn_mscale
from dsv3_jax.model import fp8 as fp8_lib
from dsv3_jax.model import implementations


def weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: nn.initializers.Initializer) -> jax.Array:
    """Declare a float32 parameter with its logical axes (the sharding rules map the names)."""
    if len(shape) != len(axes):
        raise ValueError(f"{name}: shape {shape} and logical axes {axes} differ in rank")
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def normal(cfg: ModelConfig) -> nn.initializers.Initializer:
    """The paper's initializer: N(0, init_std^2) (std 0.006, SPEC.md section 7)."""
    return nn.initializers.normal(stddev=cfg.init_std)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x.dtype."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[Hr/2] float32 rotation frequencies, with YaRN when active (official code)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if not cfg.yarn_active:
        return freqs.astype(np.float32)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs.astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Scale on cos/sin (HF's YaRN attention_factor): 1 for DeepSeek-V3, where mscale == all_dim."""
    if not cfg.yarn_active:
        return 1.0
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor,
                                                                  cfg.mscale_all_dim)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of [..., Hr/2] for integer positions [...] (float32)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
    factor = rope_attention_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ADJACENT pairs (x0, x1), (x2, x3), ... as the official code's complex product.

    x: [..., Hr]; cos/sin broadcast against [..., Hr/2]. The output keeps the interleaved layout.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
    """[B, T] positions that restart at 0 at the first token of each segment."""
    T = segment_ids_bt.shape[1]
    index_bt = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_bt.shape)
    starts_bt = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], dtype=bool),
         segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    start_index_bt = jax.lax.cummax(jnp.where(starts_bt, index_bt, 0), axis=1)
    return index_bt - start_index_bt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum of x and w (both in the compute dtype) returning fp32 (fp32 accumulation), whose
    backward runs in the compute dtype: the fp32 cotangent is cast to x.dtype first. Without
    this, a bf16 model's gradient matmuls would run in fp32 (TF32 on GPUs, several times
    slower; measured as 37% of an H200 train step before this existed)."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, x, w):
    return einsum_f32(spec, x, w), (x, w)


def _einsum_f32_bwd(spec, residuals, ct):
    x, w = residuals
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
    return vjp(ct.astype(x.dtype))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def projection(spec: str, x: jax.Array, w: jax.Array, fp8: str = "none",
               fp8_impl: str = "xla") -> jax.Array:
    """einsum(spec, x, w) in x.dtype, where the contracted letters end x and begin w
    ('BTNH,NHD->BTD'). fp8="blockwise": the FP8 linear of `fp8_lib.linear` on w read as a
    [contracted, rest] matrix (128x128 blocks over that matrix, as the released FP8 weights),
    run by `fp8_impl` (implementations.fp8_linear)."""
    dt = x.dtype
    if fp8 == "none":
        return jnp.einsum(spec, x, w.astype(dt))
    lhs, rhs = spec.split("->")[0].split(",")
    n = len(set(lhs) & set(rhs))
    if lhs[-n:] != rhs[:n]:
        raise ValueError(f"projection {spec!r}: the contracted letters must end x and begin w")
    k = math.prod(w.shape[:n])
    x_mk = x.reshape(*x.shape[:-n], k)
    y = fp8_lib.linear(x_mk, w.reshape(k, -1).astype(dt), dt, implementation=fp8_impl)
    return y.reshape(*x.shape[:-n], *w.shape[n:])


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           fp8: str = "none", fp8_impl: str = "xla") -> jax.Array:
    """(silu(x W1) * x W3) W2 with fp32 accumulation; the product is cast to x.dtype first.
    fp8="blockwise": the three GEMMs are FP8 linears (`fp8_lib.linear`, run by `fp8_impl`)."""
    dt = x.dtype
    if fp8 == "none":
        gate = einsum_f32("...D,DF->...F", x, w_gate.astype(dt))
        up = einsum_f32("...D,DF->...F", x, w_up.astype(dt))
        h = (jax.nn.silu(gate) * up).astype(dt)
        return einsum_f32("...F,FD->...D", h, w_down.astype(dt)).astype(dt)
    linear = functools.partial(fp8_lib.linear, implementation=fp8_impl)
    gate = linear(x, w_gate.astype(dt), jnp.float32)
    up = linear(x, w_up.astype(dt), jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(dt)
    return linear(h, w_down.astype(dt), dt)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (the first `n_dense_layers` layers and the shared experts)."""

    cfg: ModelConfig
    hidden: int
    axes: tuple[str, str] = ("embed", "mlp")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F, init = self.cfg.dim, self.hidden, normal(self.cfg)
        w_gate = weight(self, "w_gate", (D, F), self.axes, init)
        w_up = weight(self, "w_up", (D, F), self.axes, init)
        w_down = weight(self, "w_down", (F, D), self.axes[::-1], init)
        return swiglu(x, w_gate, w_up, w_down, self.cfg.fp8,
                      implementations.fp8_linear(self.cfg))
