"""The routed-expert block of DeepSeekMoE: dropless dispatch of token-rows to SwiGLU experts.

Legend: T tokens, D model dim, K experts per token (top-k), E experts, F expert hidden dim,
M = T*K token-rows.

  routed_experts(x[T, D], expert_idx[T, K], expert_weights[T, K], w_gate[E, D, F], w_up[E, D, F],
                 w_down[E, F, D]) -> y[T, D]
  y[t] = sum_k expert_weights[t, k] * SwiGLU_e(x[t]),  e = expert_idx[t, k],
  SwiGLU_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e].

No token is ever dropped. The pieces (`permute`, `experts_swiglu`, `unpermute_combine`) are public
so that expert parallelism can put an all-to-all between them.

Numerics (all implementations): matmuls accumulate in fp32; the SwiGLU product is cast to the
compute dtype (x.dtype) before the down projection; the weighted combine is done in fp32 and cast
to x.dtype at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gmm_lib


def permute(x_td, expert_idx_tk, num_experts):
    """Sort token-rows by expert.

    Returns (x_sorted[M, D], group_sizes[E] int32, order[M] int32) where row m of x_sorted is
    token order[m] // K, and rows are grouped by expert in ascending expert order.
    """
    T, K = expert_idx_tk.shape
    flat_m = expert_idx_tk.reshape(T * K)
    order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
    group_sizes_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    x_sorted_md = jnp.take(x_td, order_m // K, axis=0)
    return x_sorted_md, group_sizes_e, order_m


def experts_swiglu(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, *,
                   implementation="xla"):
    """SwiGLU of each expert on its rows: [M, D] -> [M, D] (rows past sum(group_sizes) are 0)."""
    def gmm(lhs, rhs):
        return gmm_lib.grouped_matmul(
            lhs, rhs, group_sizes_e, implementation=implementation,
            preferred_element_type=jnp.float32)

    gate_mf = gmm(x_sorted_md, w_gate_edf)
    up_mf = gmm(x_sorted_md, w_up_edf)
    h_mf = (jax.nn.silu(gate_mf) * up_mf).astype(x_sorted_md.dtype)
    return gmm(h_mf, w_down_efd)  # fp32 [M, D]


def unpermute_combine(y_sorted_md, order_m, expert_weights_tk, out_dtype):
    """Undo `permute` and sum each token's K expert outputs with its routing weights."""
    T, K = expert_weights_tk.shape
    y_md = jnp.zeros_like(y_sorted_md).at[order_m].set(y_sorted_md)
    y_tkd = y_md.reshape(T, K, -1).astype(jnp.float32)
    return jnp.einsum("TKD,TK->TD", y_tkd, expert_weights_tk.astype(jnp.float32)).astype(out_dtype)


def dense_reference(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd):
    """Every expert on every token, masked by the routing weights (O(E*T); tests only)."""
    E = w_gate_edf.shape[0]
    gate_etf = jnp.einsum("TD,EDF->ETF", x_td, w_gate_edf, preferred_element_type=jnp.float32)
    up_etf = jnp.einsum("TD,EDF->ETF", x_td, w_up_edf, preferred_element_type=jnp.float32)
    h_etf = (jax.nn.silu(gate_etf) * up_etf).astype(x_td.dtype)
    y_etd = jnp.einsum("ETF,EFD->ETD", h_etf, w_down_efd, preferred_element_type=jnp.float32)
    # Weight of expert e for token t: sum over the k slots that picked e (each expert at most once).
    onehot_tke = jax.nn.one_hot(expert_idx_tk, E, dtype=jnp.float32)
    weight_te = jnp.einsum("TKE,TK->TE", onehot_tke, expert_weights_tk.astype(jnp.float32))
    return jnp.einsum("ETD,TE->TD", y_etd, weight_te).astype(x_td.dtype)


def sorted_dispatch(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd, *,
                    gmm_implementation="xla"):
    """Sort by expert, grouped matmuls, un-sort and combine."""
    x_sorted_md, group_sizes_e, order_m = permute(x_td, expert_idx_tk, w_gate_edf.shape[0])
    y_sorted_md = experts_swiglu(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd,
                                 implementation=gmm_implementation)
    return unpermute_combine(y_sorted_md, order_m, expert_weights_tk, x_td.dtype)


IMPLEMENTATIONS = ("dense", "xla")


def routed_experts(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd, *,
                   implementation="xla"):
    """Dispatch to one implementation of the routed-expert block (see module docstring).

    "dense": every expert on every token (the reference); "xla": sorted dispatch with
    `jax.lax.ragged_dot`.
    """
    args = (x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd)
    if implementation == "dense":
        return dense_reference(*args)
    if implementation == "xla":
        return sorted_dispatch(*args, gmm_implementation="xla")
    raise ValueError(
        f"routed_experts implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
