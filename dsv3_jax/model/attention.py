"""Multi-head Latent Attention (paper 2.1.1; SPEC.md section 2), expanded and absorbed forms.

Legend: B batch, T new tokens, S keys / cache rows, D model dim, N heads, Q q latent rank,
R kv latent rank (512), Hn nope head dim (128), Hr rope head dim (64), Hv value head dim (128).
Weight layout (official names): wq_a [D, Q]; wq_b [Q, N, Hn+Hr] (per head [nope | rope]);
wkv_a [D, R+Hr] (W_DKV then W_KR); wkv_b [R, N, Hn+Hv] (per head [W_UK | W_UV]); wo [N, Hv, D].

The latent cache holds, per token, RMSNorm(c_kv) (R values) then the rotated k_rope (Hr values).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import implementations
from dsv3_jax.model.layers import RMSNorm, apply_rope, normal, projection, rope_angles, weight
from dsv3_jax.parallel import sharding
from dsv3_jax.parallel.sharding import Parallel
from pallas_kernels import mla_attention, mla_decode
from pallas_kernels.implementations import PALLAS_IMPLEMENTATIONS


class MLA(nn.Module):
    """MLA. `__call__` runs the expanded form over the new tokens; with a cache it also writes
    their latents; `decode=True` runs the absorbed form over the whole cache instead."""

    cfg: ModelConfig
    decode: bool = False
    parallel: Parallel | None = None  # on a mesh the Pallas kernels run per batch shard

    def setup(self):
        c, init = self.cfg, normal(self.cfg)
        D, N, Hqk = c.dim, c.n_heads, c.qk_head_dim
        R, Hr = c.kv_lora_rank, c.qk_rope_head_dim
        if c.q_lora_rank:
            self.wq_a = weight(self, "wq_a", (D, c.q_lora_rank), ("embed", "q_lora"), init)
            self.q_norm = RMSNorm(c.norm_eps)
            self.wq_b = weight(self, "wq_b", (c.q_lora_rank, N, Hqk),
                               ("q_lora", "heads", "head_dim"), init)
        else:
            self.wq = weight(self, "wq", (D, N, Hqk), ("embed", "heads", "head_dim"), init)
        self.wkv_a = weight(self, "wkv_a", (D, R + Hr), ("embed", "kv_lora"), init)
        self.kv_norm = RMSNorm(c.norm_eps)
        self.wkv_b = weight(self, "wkv_b", (R, N, c.qk_nope_head_dim + c.v_head_dim),
                            ("kv_lora", "heads", "head_dim"), init)
        self.wo = weight(self, "wo", (N, c.v_head_dim, D), ("heads", "head_dim", "embed"), init)

    def project(self, spec, x, w):
        """layers.projection with the model's FP8 mode and dense FP8 path
        (implementations.fp8_linear)."""
        return projection(spec, x, w, self.cfg.fp8, implementations.fp8_linear(self.cfg))

    def queries(self, x_btd, cos, sin):
        """q_nope [B,T,N,Hn], rotated q_rope [B,T,N,Hr]."""
        c = self.cfg
        if c.q_lora_rank:
            cq_btq = self.project("BTD,DQ->BTQ", x_btd, self.wq_a)
            q_btnh = self.project("BTQ,QNH->BTNH", self.q_norm(cq_btq), self.wq_b)
        else:
            q_btnh = self.project("BTD,DNH->BTNH", x_btd, self.wq)
        q_nope, q_rope = jnp.split(q_btnh, [c.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_rope, cos[:, :, None], sin[:, :, None])

    def latents(self, x_btd, cos, sin):
        """[B, T, R+Hr]: RMSNorm(c_kv) and the rotated shared rope key (what the cache holds)."""
        R = self.cfg.kv_lora_rank
        kv_btc = self.project("BTD,DC->BTC", x_btd, self.wkv_a)
        c_kv_btr = self.kv_norm(kv_btc[..., :R])
        k_rope_bth = apply_rope(kv_btc[..., R:], cos, sin)
        return jnp.concatenate([c_kv_btr, k_rope_bth], axis=-1)

    def __call__(self, x_btd, positions_bt, segment_ids_bt=None, cache=None):
        """x [B,T,D] -> ([B,T,D], new cache or None).

        cache: None (training), or (kv_cache [B,L,R+Hr], starts [B]): the new tokens' latents are
        written at rows starts[b] .. starts[b]+T-1. Without `decode` the attention is the expanded
        form over the new tokens only (prefill of an empty cache); with `decode` it is the absorbed
        form over cache rows < starts[b] + T.
        """
        c = self.cfg
        cos, sin = rope_angles(c, positions_bt)
        q_nope, q_rope = self.queries(x_btd, cos, sin)
        latent_btc = self.latents(x_btd, cos, sin)

        new_cache = None
        if cache is not None:
            kv_cache, starts_b = cache
            kv_cache = jax.vmap(
                lambda row, new, s: jax.lax.dynamic_update_slice(row, new.astype(row.dtype),
                                                                 (s, 0))
            )(kv_cache, latent_btc, starts_b)
            new_cache = kv_cache

        if self.decode:
            o_btnh = self.absorbed(q_nope, q_rope, new_cache, starts_b + x_btd.shape[1])
        else:
            o_btnh = self.expanded(q_nope, q_rope, latent_btc, segment_ids_bt)
        out_btd = self.project("BTNH,NHD->BTD", o_btnh, self.wo)
        return out_btd, new_cache

    def expanded(self, q_nope, q_rope, latent_btc, segment_ids_bt):
        """Training/prefill form: per-head keys and values from the latent."""
        c = self.cfg
        R = c.kv_lora_rank
        kv_btnh = self.project("BTR,RNH->BTNH", latent_btc[..., :R], self.wkv_b)
        k_nope, v = jnp.split(kv_btnh, [c.qk_nope_head_dim], axis=-1)
        impl = implementations.chosen(c, "attention_impl")

        def attend(*args):
            return mla_attention.mla_attention(*args, scale=c.softmax_scale, implementation=impl)

        with jax.named_scope("mla_attention"):
            return self.per_shard(impl, attend, q_nope, q_rope, k_nope, latent_btc[..., R:], v,
                                  segment_ids_bt)

    def absorbed(self, q_nope, q_rope, kv_cache_blc, lengths_b):
        """Decode form: W_UK folded into the query, W_UV applied after attending the latent."""
        c, dt = self.cfg, q_nope.dtype
        wkv_b = self.wkv_b.astype(dt)
        w_uk_rnh, w_uv_rnh = wkv_b[..., :c.qk_nope_head_dim], wkv_b[..., c.qk_nope_head_dim:]
        q_latent_btnr = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk_rnh)
        impl = implementations.chosen(c, "decode_impl")

        def attend(*args):
            return mla_decode.mla_decode(*args, scale=c.softmax_scale, implementation=impl)

        with jax.named_scope("mla_decode"):
            o_latent_btnr = self.per_shard(impl, attend, q_latent_btnr, q_rope,
                                           kv_cache_blc.astype(dt), lengths_b)
        return jnp.einsum("BTNR,RNH->BTNH", o_latent_btnr, w_uv_rnh)

    def per_shard(self, impl: str, attend, *args):
        """attend(*args), on a mesh per batch shard when it is a Pallas kernel."""
        if self.parallel is None or impl not in PALLAS_IMPLEMENTATIONS:
            return attend(*args)
        return sharding.per_row_shard(attend, self.parallel, *args)
