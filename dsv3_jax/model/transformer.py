"""The DeepSeek-V3 transformer: embedding, scanned dense and MoE stacks, final norm, head, MTP.

Legend: B batch, T tokens, D model dim, V vocab, L cache rows, C latent width (R + Hr).
Layers are stacked per kind (dense, MoE) and run with `nn.scan` under the config's remat policy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.attention import MLA
from dsv3_jax.model.layers import MLP, RMSNorm, einsum_f32, normal, weight
from dsv3_jax.model.moe import ROUTER_BIAS, ROUTER_STATS, MoE
from dsv3_jax.parallel import pipeline, sharding
from dsv3_jax.parallel.sharding import Parallel
from pallas_kernels.residuals import KERNEL_RESIDUALS

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # save_dots_no_batch, plus what our Pallas kernels keep for their backward (attention output
    # and log-sum-exp; the sorted expert rows and the SwiGLU gate, up and product), so no
    # forward kernel runs again in the backward pass.
    "save_kernels": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(KERNEL_RESIDUALS)),
}

# Weights that every use casts to the compute dtype first (the matmul weights; norms, the router
# and the embedding/head are used in fp32). The trainer casts them once per step with
# `cast_matmul_weights`, so the model's own casts become no-ops, instead of once per microbatch
# and again under remat; the gradients are the same values (a cast's gradient is the cast back).
MATMUL_WEIGHTS = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w_gate", "w_up",
                            "w_down", "eh_proj"})


def cast_matmul_weights(cfg: ModelConfig, params):
    """params with the MATMUL_WEIGHTS leaves in cfg.dtype (the rest unchanged)."""
    def cast(path, w):
        return w.astype(cfg.dtype) if path[-1].key in MATMUL_WEIGHTS else w

    return jax.tree_util.tree_map_with_path(cast, params)


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense SwiGLU or DeepSeekMoE feed-forward."""

    cfg: ModelConfig
    moe: bool
    decode: bool = False
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, h_btd, kv_cache_blc, starts_b, positions_bt, segment_ids_bt, valid_bt):
        c = self.cfg
        cache = None if kv_cache_blc is None else (kv_cache_blc, starts_b)
        attn_btd, new_kv_blc = MLA(c, self.decode, self.parallel, name="attn")(
            RMSNorm(c.norm_eps, name="attn_norm")(h_btd), positions_bt, segment_ids_bt, cache)
        attn_btd = checkpoint_name(attn_btd, "attention_out")
        h_btd = h_btd + attn_btd
        x_btd = RMSNorm(c.norm_eps, name="mlp_norm")(h_btd)
        if self.moe:
            h_btd = h_btd + MoE(c, self.parallel, name="moe")(x_btd, valid_bt)
        else:
            h_btd = h_btd + MLP(c, c.inter_dim, name="mlp")(x_btd)
        return h_btd, new_kv_blc


def block_stack(cfg: ModelConfig, length: int, moe: bool, decode: bool, name: str,
                parallel: Parallel | None = None) -> nn.Module:
    """`length` blocks with stacked weights (leading logical axis named after the stack, e.g.
    "moe_layers", which the pipeline splits into stages), run by `nn.scan`."""
    block = Block
    if cfg.remat != "none":
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, ROUTER_BIAS: 0, ROUTER_STATS: 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: name},
    )(cfg, moe=moe, decode=decode, parallel=parallel, name=name)


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (paper 2.2; SPEC.md section 6).

    h' = eh_proj [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)] (embedding FIRST, as the released
    weights), then one MLA + MoE block; returns (h^k for the next depth, head_norm(h^k) for the
    shared output head).
    """

    cfg: ModelConfig
    decode: bool = False
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, h_prev_btd, emb_next_btd, positions_bt, segment_ids_bt, valid_bt,
                 kv_cache_blc=None, starts_b=None):
        """-> (h^k [B,T,D], head_norm(h^k) [B,T,D], updated latent cache or None); the cache
        works as in `Block` (generation keeps one per depth)."""
        c = self.cfg
        e_btd = RMSNorm(c.norm_eps, name="enorm")(emb_next_btd)
        h_btd = RMSNorm(c.norm_eps, name="hnorm")(h_prev_btd)
        eh_proj = weight(self, "eh_proj", (2 * c.dim, c.dim), ("mtp_concat", "embed"), normal(c))
        x_btc = jnp.concatenate([e_btd, h_btd], axis=-1)
        x_btd = jnp.einsum("BTC,CD->BTD", x_btc, eh_proj.astype(x_btc.dtype))
        h_btd, new_kv_blc = Block(c, moe=True, decode=self.decode, parallel=self.parallel,
                                  name="block")(
            x_btd, kv_cache_blc, starts_b, positions_bt, segment_ids_bt, valid_bt)
        return h_btd, RMSNorm(c.norm_eps, name="head_norm")(h_btd), new_kv_blc


def shift_left(x_bt_, k: int):
    """x[:, i] <- x[:, i + k], zeros past the end."""
    return jnp.pad(x_bt_[:, k:], [(0, 0), (0, k)] + [(0, 0)] * (x_bt_.ndim - 2))


class Transformer(nn.Module):
    """tokens [B, T] -> final-normed hidden states [B, T, D] and MTP hidden states.

    Returns (h_final, mtp_hidden, new_cache): mtp_hidden is a tuple with one [B, T, D] per depth
    (already through that depth's head_norm); the head is applied by `head_logits`.
    The MTP input h^0 is the main model's FINAL-NORMED state, as vLLM and SGLang feed the
    released MTP weights (the paper leaves it open; DeepSeek-V3 issue #839).
    """

    cfg: ModelConfig
    decode: bool = False
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, segment_ids_bt, valid_bt, cache=None,
                 starts_b=None):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        embed_vd = weight(self, "embed", (c.vocab_size, c.dim), ("vocab", "embed"), normal(c))
        # The head is used by `head_logits`; declared here so `init` creates it.
        weight(self, "head", (c.dim, c.vocab_size), ("embed", "vocab"), normal(c))
        emb_btd = sharding.constrain_rows(
            self.parallel, jnp.take(embed_vd, tokens_bt, axis=0).astype(dt))

        h_btd, new_cache = emb_btd, {}
        for name, length, moe in (("dense_layers", c.n_dense_layers, False),
                                  ("moe_layers", c.n_moe_layers, True)):
            if length == 0:
                continue
            if moe and self.pipelined(cache):
                h_btd = sharding.constrain_rows(self.parallel, self.pipelined_moe_stack(
                    h_btd, positions_bt, segment_ids_bt, valid_bt))
                continue
            kv_cache = None if cache is None else cache[name]
            stack = block_stack(c, length, moe, self.decode, name, self.parallel)
            h_btd, new_cache[name] = stack(
                h_btd, kv_cache, starts_b, positions_bt, segment_ids_bt, valid_bt)
            h_btd = sharding.constrain_rows(self.parallel, h_btd)
        h_final_btd = RMSNorm(c.norm_eps, name="final_norm")(h_btd)

        mtp_hidden = []
        if not self.decode and c.mtp_depth:
            h_prev_btd = h_final_btd
            T = tokens_bt.shape[1]
            for k in range(1, c.mtp_depth + 1):
                # Position i reads t_{i+k}; positions i >= T-k have no such token (masked).
                mtp_valid_bt = valid_bt & (jnp.arange(T) < T - k)[None, :]
                h_prev_btd, normed_btd, _ = MTPModule(c, parallel=self.parallel,
                                                      name=f"mtp_{k - 1}")(
                    h_prev_btd, shift_left(emb_btd, k), positions_bt, segment_ids_bt,
                    mtp_valid_bt)
                mtp_hidden.append(normed_btd)
        return h_final_btd, tuple(mtp_hidden), (new_cache if cache is not None else None)


    def pipelined(self, cache) -> bool:
        """Training-form passes over a mesh with pipeline stages run the MoE stack pipelined
        (initialization creates the same stacked weights through the plain scan)."""
        p = self.parallel
        return (p is not None and p.pipeline is not None and p.pipeline.stages > 1
                and cache is None and not self.decode and not self.is_initializing())

    def pipelined_moe_stack(self, h_btd, positions_bt, segment_ids_bt, valid_bt):
        c = self.cfg
        block = Block(c, moe=True, parallel=self.parallel.inside_stages())

        def layer_fn(w, h, aux):
            (h, _), state = block.apply(
                {"params": w["params"], ROUTER_BIAS: w["bias"]}, h, None, None,
                aux["positions"], aux.get("segment_ids"), aux["valid"], mutable=[ROUTER_STATS])
            return h, state[ROUTER_STATS]

        if c.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[c.remat],
                                      prevent_cse=False)
        weights = {"params": self.variables["params"]["moe_layers"],
                   "bias": self.variables[ROUTER_BIAS]["moe_layers"]}
        aux = {"positions": positions_bt, "valid": valid_bt}
        if segment_ids_bt is not None:
            aux["segment_ids"] = segment_ids_bt
        h_btd, stats = pipeline.run(layer_fn, weights, h_btd, aux, self.parallel.pipeline)
        self.sow(ROUTER_STATS, "moe_layers", stats, init_fn=dict,
                 reduce_fn=lambda _, new: new)
        return h_btd


def head_logits(params, h_btd: jax.Array) -> jax.Array:
    """Output head (shared by the main model and every MTP depth): [B,T,D] -> fp32 [B,T,V]."""
    return einsum_f32("BTD,DV->BTV", h_btd, params["head"].astype(h_btd.dtype))
