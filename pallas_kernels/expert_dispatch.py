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

Implementations: "dense" (every expert on every token; the reference), "xla" (sort, ragged_dot,
scatter), "pallas_gpu" / "pallas_tpu" (our Mosaic GPU / Mosaic TPU kernels, one
`jax.custom_vjp` over the whole block; a bare "pallas" takes the default backend's,
`interpret=True` runs on the CPU; names in pallas_kernels.implementations). The pallas forward is

  x_sorted[M, D]  = gather_rows(x, token of each sorted row)          (companion kernel)
  h, gate, up     = grouped SwiGLU: x_sorted @ w_gate, x_sorted @ w_up, silu(gate) * up fused
                    in one kernel's epilogue (gate and up kept in x.dtype for the backward)
  y_sorted[M, D]  = h @ w_down (fp32)
  y[T, D]         = combine_rows(y_sorted, slots of each token, weights)   (companion kernel:
                    a gather-reduce; no scatter, each token written once)

and the backward gathers dy once ([M, D], unweighted), computes g = dy_sorted @ w_down^T (fp32),
and from it the routing-weight gradient <g, h> (= <dy, expert output>), the SwiGLU gradients
(elementwise, XLA), d_x_sorted = d_gate @ w_gate^T + d_up @ w_up^T in one kernel, the three weight
gradients with the transposed kernel, and d_x with the combine kernel (unit weights). The only
[M, D] arrays are x_sorted, y_sorted, dy_sorted and d_x_sorted: the inputs and outputs of the
grouped matmuls. On TPU, and on GPU for rows the row kernels cannot hold
(`dispatch_gpu.rows_unsupported`: dims with no row view, or too many rows per token for one
CTA's shared memory), the gather and combine are their plain-JAX forms (XLA gather-reduce).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch_gpu, implementations, residuals
from pallas_kernels import grouped_matmul as gmm_lib
from pallas_kernels.implementations import PALLAS_IMPLEMENTATIONS

# ---------------------------------------------------------------------------------------------
# Routing tables and row movement.


def _route(expert_idx_tk: jax.Array, num_experts: int):
    """Sorted order of the T*K slots: (order[M], group_sizes[E], inv[M]); inv = order^-1."""
    T, K = expert_idx_tk.shape
    flat_m = expert_idx_tk.reshape(T * K)
    order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
    group_sizes_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    inv_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(T * K, dtype=jnp.int32))
    return order_m, group_sizes_e, inv_m


def _gpu_rows(options, D: int, K: int, dtype) -> bool:
    """The Mosaic GPU row kernels run these rows; otherwise XLA's gather forms do (any D)."""
    return (options.backend == "gpu"
            and dispatch_gpu.rows_unsupported(D, K, jnp.dtype(dtype).itemsize) is None)


def _gather(x_td, src_m, options):
    if _gpu_rows(options, x_td.shape[1], 1, x_td.dtype):
        return dispatch_gpu.gather_rows(x_td, src_m, interpret=options.interpret)
    return dispatch_gpu.gather_rows_reference(x_td, src_m)


def _combine(y_md, inv_tk, w_tk, out_dtype, options):
    if _gpu_rows(options, y_md.shape[1], inv_tk.shape[1], y_md.dtype):
        return dispatch_gpu.combine_rows(y_md, inv_tk, w_tk, out_dtype,
                                         interpret=options.interpret)
    return dispatch_gpu.combine_rows_reference(y_md, inv_tk, w_tk, out_dtype)


# ---------------------------------------------------------------------------------------------
# The public pieces.


def permute(x_td, expert_idx_tk, num_experts, *, implementation="xla", interpret=False):
    """Sort token-rows by expert.

    Returns (x_sorted[M, D], group_sizes[E] int32, order[M] int32) where row m of x_sorted is
    token order[m] // K, and rows are grouped by expert in ascending expert order.
    """
    T, K = expert_idx_tk.shape
    if implementation in PALLAS_IMPLEMENTATIONS:
        options = gmm_lib.pallas_options(implementation, interpret)
        order_m, group_sizes_e, inv_m = _route(expert_idx_tk, num_experts)
        with jax.named_scope("permute_pallas"):
            x_sorted_md = _gather_vjp(x_td, order_m // K, inv_m.reshape(T, K), options)
        return x_sorted_md, group_sizes_e, order_m
    flat_m = expert_idx_tk.reshape(T * K)
    order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
    group_sizes_e = jnp.bincount(flat_m, length=num_experts).astype(jnp.int32)
    x_sorted_md = jnp.take(x_td, order_m // K, axis=0)
    return x_sorted_md, group_sizes_e, order_m


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_vjp(x_td, token_m, inv_tk, options):
    return _gather(x_td, token_m, options)


def _gather_vjp_fwd(x_td, token_m, inv_tk, options):
    return _gather(x_td, token_m, options), inv_tk


def _gather_vjp_bwd(options, inv_tk, ct_md):
    # Each token's K rows summed back (fp32), the transpose of the gather.
    return _combine(ct_md, inv_tk, None, ct_md.dtype, options), None, None


_gather_vjp.defvjp(_gather_vjp_fwd, _gather_vjp_bwd)


def experts_swiglu(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, *,
                   implementation="xla", interpret=False):
    """SwiGLU of each expert on its rows: [M, D] -> [M, D] (rows past sum(group_sizes) are 0)."""
    if implementation in PALLAS_IMPLEMENTATIONS:
        options = gmm_lib.pallas_options(implementation, interpret)
        with jax.named_scope("experts_swiglu_pallas"):
            return _experts_vjp(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd,
                                options)

    def gmm(lhs, rhs):
        return gmm_lib.grouped_matmul(
            lhs, rhs, group_sizes_e, implementation=implementation,
            preferred_element_type=jnp.float32)

    gate_mf = gmm(x_sorted_md, w_gate_edf)
    up_mf = gmm(x_sorted_md, w_up_edf)
    h_mf = (jax.nn.silu(gate_mf) * up_mf).astype(x_sorted_md.dtype)
    return gmm(h_mf, w_down_efd)  # fp32 [M, D]


def _experts_fwd(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, options):
    """Fused gate/up + SwiGLU, then the down projection: (y_sorted fp32 [M, D], h, gate, up)."""
    dtype = x_sorted_md.dtype
    with jax.named_scope("experts_gate_up_swiglu"):
        h_mf, gate_mf, up_mf = gmm_lib.gmm(
            [x_sorted_md], [w_gate_edf, w_up_edf], group_sizes_e, op="swiglu",
            rhs_layout="kn", out_dtypes=[dtype] * 3, options=options)
    with jax.named_scope("experts_down"):
        (y_sorted_md,) = gmm_lib.gmm([h_mf], [w_down_efd], group_sizes_e, op="mm",
                                     rhs_layout="kn", out_dtypes=[jnp.float32], options=options)
    return y_sorted_md, h_mf, gate_mf, up_mf


def _experts_bwd(dy_sorted_md, w_m, x_sorted_md, h_mf, gate_mf, up_mf, group_sizes_e,
                 w_gate_edf, w_up_edf, w_down_efd, options):
    """Backward of the experts given the (unweighted if w_m is given) cotangent of y_sorted.

    With routing weights w_m [M], the cotangent of y_sorted is w_m * dy_sorted; the weight is
    applied on the [M, F] side instead, and d_w_m = <dy_sorted @ w_down^T, h> comes for free.
    Returns (d_x_sorted [M, D], d_w_m [M] fp32 or None, d_w_gate, d_w_up, d_w_down).
    """
    dtype = x_sorted_md.dtype
    gs = group_sizes_e
    with jax.named_scope("experts_down_dlhs"):
        # w_down [E, F, D] read as "nk": output columns F, contraction D.
        (g_mf,) = gmm_lib.gmm([dy_sorted_md], [w_down_efd], gs, op="mm", rhs_layout="nk",
                              out_dtypes=[jnp.float32], options=options)
    with jax.named_scope("swiglu_bwd"):
        h_f = h_mf.astype(jnp.float32)
        if w_m is None:
            dh_mf, d_w_m, h_w_mf = g_mf, None, h_mf
        else:
            d_w_m = (g_mf * h_f).sum(axis=-1)  # a reduction, not a batched dot
            dh_mf = g_mf * w_m[:, None]
            h_w_mf = (h_f * w_m[:, None]).astype(dtype)
        gate_f, up_f = gate_mf.astype(jnp.float32), up_mf.astype(jnp.float32)
        sig_f = jax.nn.sigmoid(gate_f)
        d_up_mf = (dh_mf * gate_f * sig_f).astype(dtype)
        d_gate_mf = (dh_mf * up_f * sig_f * (1.0 + gate_f * (1.0 - sig_f))).astype(dtype)
    with jax.named_scope("experts_down_drhs"):
        d_w_down = gmm_lib.tgmm(h_w_mf, dy_sorted_md, gs, out_dtype=w_down_efd.dtype,
                                options=options)
    with jax.named_scope("experts_gate_up_dlhs"):
        (d_x_sorted_md,) = gmm_lib.gmm([d_gate_mf, d_up_mf], [w_gate_edf, w_up_edf], gs,
                                       op="mm2", rhs_layout="nk", out_dtypes=[dtype],
                                       options=options)
    with jax.named_scope("experts_gate_up_drhs"):
        d_w_gate = gmm_lib.tgmm(x_sorted_md, d_gate_mf, gs, out_dtype=w_gate_edf.dtype,
                                options=options)
        d_w_up = gmm_lib.tgmm(x_sorted_md, d_up_mf, gs, out_dtype=w_up_edf.dtype,
                              options=options)
    return d_x_sorted_md, d_w_m, d_w_gate, d_w_up, d_w_down


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _experts_vjp(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, options):
    return _experts_fwd(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd,
                        options)[0]


def _experts_vjp_fwd(x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, options):
    y_sorted_md, h_mf, gate_mf, up_mf = _experts_fwd(
        x_sorted_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, options)
    res = (x_sorted_md, h_mf, gate_mf, up_mf, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd)
    return y_sorted_md, res


def _experts_vjp_bwd(options, res, ct_md):
    x_sorted_md, h_mf, gate_mf, up_mf, gs, w_gate, w_up, w_down = res
    d_x, _, d_wg, d_wu, d_wd = _experts_bwd(ct_md.astype(x_sorted_md.dtype), None, x_sorted_md,
                                            h_mf, gate_mf, up_mf, gs, w_gate, w_up, w_down,
                                            options)
    return d_x, None, d_wg, d_wu, d_wd


_experts_vjp.defvjp(_experts_vjp_fwd, _experts_vjp_bwd)


def unpermute_combine(y_sorted_md, order_m, expert_weights_tk, out_dtype, *,
                      implementation="xla", interpret=False):
    """Undo `permute` and sum each token's K expert outputs with its routing weights."""
    T, K = expert_weights_tk.shape
    if implementation in PALLAS_IMPLEMENTATIONS:
        options = gmm_lib.pallas_options(implementation, interpret)
        inv_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(T * K, dtype=order_m.dtype))
        with jax.named_scope("unpermute_combine_pallas"):
            return _combine_vjp(y_sorted_md, order_m, inv_m.reshape(T, K), expert_weights_tk,
                                jnp.dtype(out_dtype), options)
    y_md = jnp.zeros_like(y_sorted_md).at[order_m].set(y_sorted_md)
    y_tkd = y_md.reshape(T, K, -1).astype(jnp.float32)
    return jnp.einsum("TKD,TK->TD", y_tkd, expert_weights_tk.astype(jnp.float32)).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _combine_vjp(y_sorted_md, order_m, inv_tk, w_tk, out_dtype, options):
    return _combine(y_sorted_md, inv_tk, w_tk, out_dtype, options)


def _combine_vjp_fwd(y_sorted_md, order_m, inv_tk, w_tk, out_dtype, options):
    y_td = _combine(y_sorted_md, inv_tk, w_tk, out_dtype, options)
    return y_td, (y_sorted_md, order_m, inv_tk, w_tk)


def _combine_vjp_bwd(out_dtype, options, res, dy_td):
    y_sorted_md, order_m, inv_tk, w_tk = res
    T, K = w_tk.shape
    dy_f = dy_td.astype(jnp.float32)
    w_m = w_tk.reshape(T * K).astype(jnp.float32)[order_m]
    d_y_sorted = (jnp.take(dy_f, order_m // K, axis=0) * w_m[:, None]).astype(y_sorted_md.dtype)
    y_tkd = jnp.take(y_sorted_md, inv_tk, axis=0).astype(jnp.float32)
    d_w = (y_tkd * dy_f[:, None, :]).sum(axis=-1).astype(w_tk.dtype)
    return d_y_sorted, None, None, d_w


_combine_vjp.defvjp(_combine_vjp_fwd, _combine_vjp_bwd)


# ---------------------------------------------------------------------------------------------
# Whole block.


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _routed_pallas(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd,
                   options):
    return _routed_pallas_fwd(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf,
                              w_down_efd, options)[0]


def _routed_pallas_fwd(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd,
                       options):
    T, K = expert_idx_tk.shape
    order_m, group_sizes_e, inv_m = _route(expert_idx_tk, w_gate_edf.shape[0])
    token_m = order_m // K
    with jax.named_scope("permute"):
        x_sorted_md = _gather(x_td, token_m, options)
    y_sorted_md, h_mf, gate_mf, up_mf = _experts_fwd(x_sorted_md, group_sizes_e, w_gate_edf,
                                                     w_up_edf, w_down_efd, options)
    with jax.named_scope("unpermute_combine"):
        y_td = _combine(y_sorted_md, inv_m.reshape(T, K), expert_weights_tk, x_td.dtype, options)
    # Named so a remat policy may keep them (dsv3_jax.model.transformer's "save_kernels").
    x_sorted_md, h_mf, gate_mf, up_mf = residuals.saveable(x_sorted_md, h_mf, gate_mf, up_mf)
    res = (x_sorted_md, h_mf, gate_mf, up_mf, order_m, inv_m, group_sizes_e, expert_weights_tk,
           w_gate_edf, w_up_edf, w_down_efd)
    return y_td, res


def _routed_pallas_bwd(options, res, dy_td):
    (x_sorted_md, h_mf, gate_mf, up_mf, order_m, inv_m, gs, w_tk,
     w_gate, w_up, w_down) = res
    T, K = w_tk.shape
    with jax.named_scope("permute_dy"):
        dy_sorted_md = _gather(dy_td.astype(x_sorted_md.dtype), order_m // K, options)
    w_m = w_tk.reshape(T * K).astype(jnp.float32)[order_m]
    d_x_sorted, d_w_m, d_wg, d_wu, d_wd = _experts_bwd(
        dy_sorted_md, w_m, x_sorted_md, h_mf, gate_mf, up_mf, gs, w_gate, w_up, w_down, options)
    with jax.named_scope("unpermute_dx"):
        d_x = _combine(d_x_sorted, inv_m.reshape(T, K), None, x_sorted_md.dtype, options)
    d_w = d_w_m[inv_m].reshape(T, K).astype(w_tk.dtype)
    return d_x, None, d_w, d_wg, d_wu, d_wd


_routed_pallas.defvjp(_routed_pallas_fwd, _routed_pallas_bwd)


IMPLEMENTATIONS = implementations.ROUTED_EXPERTS


# The GPU grouped matmuls zero-pad K and N (dim, expert_dim) up to whole tiles of this width.
GPU_DIM_MULTIPLE = 64


def gpu_padding(dim: int, expert_dim: int) -> tuple[int, int]:
    """Zero columns the Mosaic GPU grouped matmuls add to dim and expert_dim."""
    m = GPU_DIM_MULTIPLE
    return -dim % m, -expert_dim % m


def pallas_unsupported(backend: str, dim: int, expert_dim: int, num_experts: int,
                       top_k: int) -> str | None:
    """Why implementation="pallas" cannot run this routed-expert block on `backend`; None when
    it can. Both backends run every shape: the grouped matmuls zero-pad K and N to whole tiles
    (64 on GPU, 128 on TPU), rows are tiled per group for any group sizes (1 expert or many),
    and on GPU the row gather and combine take XLA's forms where their kernels cannot
    (`dispatch_gpu.rows_unsupported`)."""
    del dim, expert_dim, num_experts, top_k  # every size runs (see above)
    if backend in ("gpu", "tpu"):
        return None
    return f"no grouped-matmul kernel for backend {backend!r} (Mosaic GPU and Mosaic TPU only)"


def routed_experts(x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd, *,
                   implementation="xla", interpret: bool = False,
                   gpu_tuning: gmm_lib.GpuTuning | None = None) -> jax.Array:
    """Dispatch to one implementation of the routed-expert block (see module docstring).

    "dense": every expert on every token (the reference); "xla": sorted dispatch with
    `jax.lax.ragged_dot`; "pallas_gpu" / "pallas_tpu": our fused kernels ("pallas": the default
    backend's), differentiable w.r.t. x, expert_weights and the three weights. x [T, D],
    expert_idx [T, K] int, expert_weights [T, K], w_gate/w_up [E, D, F], w_down [E, F, D]
    -> [T, D] in x.dtype.
    """
    args = (x_td, expert_idx_tk, expert_weights_tk, w_gate_edf, w_up_edf, w_down_efd)
    if implementation == "dense":
        return dense_reference(*args)
    if implementation == "xla":
        return sorted_dispatch(*args, gmm_implementation="xla")
    if implementation in PALLAS_IMPLEMENTATIONS:
        options = gmm_lib.pallas_options(implementation, interpret, gpu_tuning)
        with jax.named_scope("routed_experts_pallas"):
            return _routed_pallas(*args, options)
    raise ValueError(
        f"routed_experts implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")
