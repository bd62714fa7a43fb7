"""Causal multi-head latent attention (training and prefill form).

Legend: B batch, T query length, S key length (T == S here), N heads, Hn nope head dim (128),
Hr rope head dim (64, ONE rope key shared by all heads), Hv value head dim (128).

  mla_attention(q_nope[B,T,N,Hn], q_rope[B,T,N,Hr], k_nope[B,S,N,Hn], k_rope[B,S,Hr],
                v[B,S,N,Hv], segment_ids[B,T] | None, *, scale) -> o[B,T,N,Hv]

  score[t, s] = scale * (q_nope[t] . k_nope[s] + q_rope[t] . k_rope[s]);
  key s is visible to query t iff s <= t and segment_ids[s] == segment_ids[t].
  Softmax in fp32; output in q_nope.dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility_mask(segment_ids_bt, T, S):
    """[B or 1, T, S] bool: causal and same-segment."""
    causal_ts = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    if segment_ids_bt is None:
        return causal_ts[None]
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_ts[None] & same_bts


def reference(q_nope, q_rope, k_nope, k_rope, v, segment_ids=None, *, scale):
    """Plain-JAX MLA attention: materializes the [B, N, T, S] scores."""
    T, S = q_nope.shape[1], k_nope.shape[1]
    s_bnts = jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=jnp.float32)
    s_bnts += jnp.einsum("BTNH,BSH->BNTS", q_rope, k_rope, preferred_element_type=jnp.float32)
    mask_bts = visibility_mask(segment_ids, T, S)
    s_bnts = jnp.where(mask_bts[:, None], s_bnts * scale, -jnp.inf)
    p_bnts = jax.nn.softmax(s_bnts, axis=-1).astype(v.dtype)
    o = jnp.einsum("BNTS,BSNH->BTNH", p_bnts, v, preferred_element_type=jnp.float32)
    return o.astype(q_nope.dtype)


IMPLEMENTATIONS = ("xla",)


def mla_attention(q_nope, q_rope, k_nope, k_rope, v, segment_ids=None, *, scale,
                  implementation="xla"):
    """Dispatch to one implementation (see module docstring). "xla" is the plain-JAX reference."""
    if implementation == "xla":
        return reference(q_nope, q_rope, k_nope, k_rope, v, segment_ids, scale=scale)
    raise ValueError(
        f"mla_attention implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
