"""DeepSeekMoE: group-limited sigmoid routing with a selection bias, routed + shared experts.

Legend: B batch, T tokens, D model dim, E routed experts, G groups, K top-k, F expert hidden.
Routing (SPEC.md section 4, official Gate.forward):
  s = sigmoid(x W_g) in fp32; selection uses s + b; a group scores the sum of its top-2
  biased scores; experts outside the top `n_limited_groups` groups are set to -inf (not 0);
  idx = top-K; weights come from the UNBIASED s, normalized over the K and times route_scale.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import fp8 as fp8_lib
from dsv3_jax.model import implementations
from dsv3_jax.model.layers import MLP, normal, weight
from dsv3_jax.parallel import expert_parallel
from dsv3_jax.parallel.sharding import Parallel
from pallas_kernels import expert_dispatch

ROUTER_BIAS = "router_bias"  # variable collection: never trained, no optimizer state
ROUTER_STATS = "router_stats"  # collection written by `sow`: per-layer counts and affinities


def route(scores_te: jax.Array, bias_e: jax.Array, cfg: ModelConfig):
    """Select experts. scores_te: unbiased sigmoid affinities [T, E] (fp32).

    Returns (expert_idx [T, K] int32, expert_weights [T, K] fp32).
    """
    T, E = scores_te.shape
    G = cfg.n_expert_groups
    select_te = scores_te + bias_e.astype(jnp.float32)
    if G > 1:
        select_tgx = select_te.reshape(T, G, E // G)
        group_score_tg = jax.lax.top_k(select_tgx, 2)[0].sum(axis=-1)
        _, kept_group_tk = jax.lax.top_k(group_score_tg, cfg.n_limited_groups)
        kept_tg = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], kept_group_tk].set(True)
        select_te = jnp.where(kept_tg[:, :, None], select_tgx, -jnp.inf).reshape(T, E)
    _, expert_idx_tk = jax.lax.top_k(select_te, cfg.n_activated_experts)
    weights_tk = jnp.take_along_axis(scores_te, expert_idx_tk, axis=-1)
    weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True) * cfg.route_scale
    return expert_idx_tk.astype(jnp.int32), weights_tk


class MoE(nn.Module):
    """Shared experts plus dropless routed experts.

    Sows into `router_stats` (same module path as the bias in `router_bias`):
      expert_counts [B, E]: tokens of each sequence routed to each expert (padding excluded);
      mean_affinity [B, E]: per sequence, mean over its tokens of s_i / sum_j s_j (the P_i of
      the sequence-wise balance loss, SPEC.md section 5).
    """

    cfg: ModelConfig
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> jax.Array:
        c = self.cfg
        B, T, D = x_btd.shape
        E, F = c.n_routed_experts, c.moe_inter_dim
        init = normal(c)
        router_de = weight(self, "router", (D, E), ("embed", None), init)
        bias = self.variable(
            ROUTER_BIAS, "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            self.make_rng("params") if self.is_initializing() else None, (E,), jnp.float32)
        w_gate = weight(self, "w_gate", (E, D, F), ("experts", "embed", "expert_mlp"), init)
        w_up = weight(self, "w_up", (E, D, F), ("experts", "embed", "expert_mlp"), init)
        w_down = weight(self, "w_down", (E, F, D), ("experts", "expert_mlp", "embed"), init)

        x_td = x_btd.reshape(B * T, D)
        with jax.named_scope("router"):
            logits_te = jnp.dot(x_td.astype(jnp.float32), router_de,
                                precision=jax.lax.Precision.HIGHEST)
            scores_te = jax.nn.sigmoid(logits_te)
            expert_idx_tk, weights_tk = route(scores_te, nn.meta.unbox(bias.value), c)
        self.record_stats(scores_te.reshape(B, T, E), expert_idx_tk.reshape(B, T, -1), valid_bt)

        dt = x_btd.dtype
        experts = (x_td, expert_idx_tk, weights_tk, w_gate.astype(dt), w_up.astype(dt),
                   w_down.astype(dt))
        impl = implementations.chosen(c, "moe_impl")
        with jax.named_scope("routed_experts"):
            if c.fp8 != "none":
                routed_td = self.routed_fp8(impl, *experts)
            elif self.parallel is None:
                routed_td = expert_dispatch.routed_experts(*experts, implementation=impl)
            else:
                routed_td = expert_parallel.routed_experts(
                    *experts, parallel=self.parallel, implementation=impl)
        out_btd = routed_td.reshape(B, T, D)
        if c.n_shared_experts:
            with jax.named_scope("shared_experts"):
                out_btd += MLP(c, c.n_shared_experts * F, name="shared")(x_btd)
        return out_btd

    def routed_fp8(self, impl: str, x_td, expert_idx_tk, weights_tk, w_gate, w_up, w_down):
        """The routed experts with FP8 grouped GEMMs (fp8_lib.experts_swiglu) between the same
        permute and combine as `impl`'s ("dense", the reference, sorts as "xla" does); with
        "pallas_gpu" the GEMMs run on the FP8 kernel, otherwise emulated."""
        if self.parallel is not None:
            raise ValueError(
                "model.fp8='blockwise' runs the routed experts on one device only: "
                "dsv3_jax.parallel.expert_parallel has no FP8 path yet; use model.fp8='none' "
                "on a mesh")
        rows = "xla" if impl == "dense" else impl
        x_sorted_md, group_sizes_e, order_m = expert_dispatch.permute(
            x_td, expert_idx_tk, w_gate.shape[0], implementation=rows)
        gemms = "pallas_gpu" if impl == "pallas_gpu" else "xla"
        y_sorted_md = fp8_lib.experts_swiglu(x_sorted_md, group_sizes_e, w_gate, w_up, w_down,
                                             implementation=gemms)
        return expert_dispatch.unpermute_combine(y_sorted_md, order_m, weights_tk, x_td.dtype,
                                                 implementation=rows)

    def record_stats(self, scores_bte, expert_idx_btk, valid_bt):
        E = scores_bte.shape[-1]
        valid_bt = valid_bt.astype(jnp.float32)
        picked_bte = jax.nn.one_hot(expert_idx_btk, E, dtype=jnp.float32).sum(axis=2)
        counts_be = jnp.einsum("BTE,BT->BE", picked_bte, valid_bt)
        normalized_bte = scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True)
        n_valid_b = jnp.maximum(valid_bt.sum(axis=1), 1.0)
        affinity_be = jnp.einsum("BTE,BT->BE", normalized_bte, valid_bt) / n_valid_b[:, None]

        def overwrite(_, new):
            return new

        self.sow(ROUTER_STATS, "expert_counts", counts_be, init_fn=lambda: 0,
                 reduce_fn=overwrite)
        self.sow(ROUTER_STATS, "mean_affinity", affinity_be, init_fn=lambda: 0,
                 reduce_fn=overwrite)
