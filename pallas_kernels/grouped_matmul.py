"""Grouped (ragged) matmul over expert-sorted rows.

Legend: M rows (token-rows sorted by group), K contraction, N output, G groups.

  grouped_matmul(lhs[M, K], rhs[G, K, N], group_sizes[G]) -> out[M, N]
  out[r] = lhs[r] @ rhs[g(r)], where rows [start_g, start_g + group_sizes[g]) belong to group g.
  Rows past sum(group_sizes) are zero in the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "xla")


def group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[M] int32: the group of each row; G (one past the last group) for rows past the end."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """Plain-JAX grouped matmul: one masked dense matmul per group (O(G*M*K*N); tests only)."""
    out_dtype = preferred_element_type or lhs.dtype
    gid_m = group_ids(group_sizes, lhs.shape[0])
    onehot_mg = (gid_m[:, None] == jnp.arange(rhs.shape[0])[None, :]).astype(lhs.dtype)
    out_mn = jnp.einsum(
        "MK,MG,GKN->MN", lhs, onehot_mg, rhs, preferred_element_type=jnp.float32
    )
    return out_mn.astype(out_dtype)


def xla(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """`jax.lax.ragged_dot` (XLA's grouped matmul)."""
    out_dtype = preferred_element_type or lhs.dtype
    out = jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


def grouped_matmul(lhs, rhs, group_sizes, *, implementation="xla", preferred_element_type=None):
    """Dispatch to one implementation of the grouped matmul (see module docstring)."""
    impls = {"reference": reference, "xla": xla}
    if implementation not in impls:
        raise ValueError(
            f"grouped_matmul implementation {implementation!r} is not one of {sorted(impls)}"
        )
    return impls[implementation](
        lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
