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

Implementations (pallas_kernels.implementations): "xla" (reference() below), "pallas_gpu" =
Mosaic GPU (_mla_decode_mgpu.py: a row-major kernel for Tq * N > 32 query rows, a transposed one
for fewer) and "pallas_tpu" = Mosaic TPU (_mla_decode_tpu.py); a bare "pallas" takes the default
backend's. Benchmark: benchmarks/mla_attention.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import implementations
from pallas_kernels.implementations import PALLAS, PALLAS_GPU, PALLAS_TPU


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


IMPLEMENTATIONS = implementations.MLA_DECODE


def pallas_unsupported(backend: str, R: int, Hr: int, N: int, Tq: int) -> str | None:
    """Why implementation="pallas" cannot decode with latent rank R, rope dim Hr, N heads and Tq
    new tokens on `backend` ("gpu" | "tpu"), as one sentence naming the dim and the constraint;
    None when it can."""
    if backend == "gpu":
        from pallas_kernels import _mla_decode_mgpu
        return _mla_decode_mgpu.unsupported(R, Hr, N, Tq)
    if backend == "tpu":
        from pallas_kernels import _mla_decode_tpu
        return _mla_decode_tpu.unsupported(R, Hr, N, Tq)
    return f"no MLA decode kernel for backend {backend!r} (Mosaic GPU and Mosaic TPU only)"


def mla_decode(q_latent: jax.Array, q_rope: jax.Array, kv_cache: jax.Array, lengths: jax.Array,
               *, scale: float, implementation: str = "xla", interpret: bool = False,
               config: Any = None) -> jax.Array:
    """Absorbed MLA decode, o_latent[B, Tq, N, R] (see module docstring). lengths[b] >= Tq.

    implementation:
      "xla": the plain-JAX reference.
      "pallas_gpu" / "pallas_tpu": flash-decoding kernel in Pallas, Mosaic GPU / Mosaic TPU
        ("pallas": the default backend's, read when traced: TPU on a TPU, GPU elsewhere). Reads
        each sequence's cache once per 64 query rows (GPU) and splits long caches over several
        programs whose partial results are merged by their log-sum-exp. On GPU fp32 inputs are
        rounded to bf16 for the matmuls, and a cache capacity L that is not a multiple of 8 is
        padded (a copy).
    interpret: run the Pallas kernel in interpret mode (CPU tests); `config` overrides its tiling
      (_mla_decode_mgpu.Config / _mla_decode_tpu.Config).
    """
    if implementation == "xla":
        return reference(q_latent, q_rope, kv_cache, lengths, scale=scale)
    if implementation == PALLAS:
        implementation = implementations.for_backend(jax.default_backend())
    if implementation == PALLAS_GPU:
        from pallas_kernels import _mla_decode_mgpu
        with jax.named_scope("mla_decode_mgpu"):
            return _mla_decode_mgpu.decode(q_latent, q_rope, kv_cache, lengths, scale=scale,
                                           config=config, interpret=interpret)
    if implementation == PALLAS_TPU:
        from pallas_kernels import _mla_decode_tpu
        with jax.named_scope("mla_decode_tpu"):
            return _mla_decode_tpu.decode(q_latent, q_rope, kv_cache, lengths, scale=scale,
                                          config=config, interpret=interpret)
    raise ValueError(
        f"mla_decode implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
