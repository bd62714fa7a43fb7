"""Absorbed MLA decode attention over the shared latent cache.

Legend: B sequences, Tq new tokens per sequence (1, or 2 for MTP verification), N heads,
R latent rank (512), Hr rope dim (64), L cache capacity.

  mla_decode(q_latent[B,Tq,N,R], q_rope[B,Tq,N,Hr], kv_cache[B,L,R+Hr], lengths[B], *, scale)
      -> o_latent[B,Tq,N,R]

kv_cache[b, s] = [RMSNorm(c_kv) (R) ; rotated k_rope (Hr)] for cached token s. lengths[b] counts the
valid cache rows INCLUDING the Tq new tokens, which sit at rows lengths[b]-Tq .. lengths[b]-1.
New token j of sequence b sees rows s <= lengths[b] - Tq + j.
  score[j, s] = scale * (q_latent[j] . kv_cache[s, :R] + q_rope[j] . kv_cache[s, R:])
  o_latent[j] = softmax_s(score[j]) @ kv_cache[:, :R]
Softmax in fp32; output in q_latent.dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference(q_latent, q_rope, kv_cache, lengths, *, scale):
    """Plain-JAX absorbed decode (the XLA form)."""
    R = q_latent.shape[-1]
    Tq, L = q_latent.shape[1], kv_cache.shape[1]
    c_kv_blr = kv_cache[..., :R]
    k_rope_blh = kv_cache[..., R:]
    s_bnts = jnp.einsum("BTNR,BSR->BNTS", q_latent, c_kv_blr, preferred_element_type=jnp.float32)
    s_bnts += jnp.einsum("BTNH,BSH->BNTS", q_rope, k_rope_blh, preferred_element_type=jnp.float32)
    last_bt = lengths[:, None] - Tq + jnp.arange(Tq)[None, :]  # last visible row per new token
    mask_bts = jnp.arange(L)[None, None, :] <= last_bt[:, :, None]
    s_bnts = jnp.where(mask_bts[:, None], s_bnts * scale, -jnp.inf)
    p_bnts = jax.nn.softmax(s_bnts, axis=-1).astype(kv_cache.dtype)
    o = jnp.einsum("BNTS,BSR->BTNR", p_bnts, c_kv_blr, preferred_element_type=jnp.float32)
    return o.astype(q_latent.dtype)


IMPLEMENTATIONS = ("xla",)


def mla_decode(q_latent, q_rope, kv_cache, lengths, *, scale, implementation="xla"):
    """Dispatch to one implementation (see module docstring). "xla" is the plain-JAX reference."""
    if implementation == "xla":
        return reference(q_latent, q_rope, kv_cache, lengths, scale=scale)
    raise ValueError(
        f"mla_decode implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
