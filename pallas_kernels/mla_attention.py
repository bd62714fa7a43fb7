"""Causal multi-head latent attention (training and prefill form).

Legend: B batch, T query length, S key length (T == S here), N heads, Hn nope head dim (128),
Hr rope head dim (64, ONE rope key shared by all heads), Hv value head dim (128).

  mla_attention(q_nope[B,T,N,Hn], q_rope[B,T,N,Hr], k_nope[B,S,N,Hn], k_rope[B,S,Hr],
                v[B,S,N,Hv], segment_ids[B,T] | None, *, scale) -> o[B,T,N,Hv]

  score[t, s] = scale * (q_nope[t] . k_nope[s] + q_rope[t] . k_rope[s]);
  key s is visible to query t iff s <= t and segment_ids[s] == segment_ids[t].
  Softmax in fp32; output in q_nope.dtype.

Implementations (pallas_kernels.implementations): "xla" (reference() below), "cudnn" (GPU only),
"pallas_gpu" = Mosaic GPU flash attention (_mla_attention_mgpu.py) and "pallas_tpu" = Mosaic TPU
(_mla_attention_tpu.py), both behind one custom_vjp (_flash) that saves only the log-sum-exp; a
bare "pallas" takes the default backend's. Benchmark: benchmarks/mla_attention.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import implementations, residuals
from pallas_kernels.implementations import PALLAS, PALLAS_GPU, PALLAS_TPU


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


IMPLEMENTATIONS = implementations.MLA_ATTENTION
# Head dims are zero-padded up to this multiple for the Mosaic GPU kernels (their swizzle tile).
GPU_HEAD_DIM_MULTIPLE = 64


def _round_up(d: int, multiple: int) -> int:
    return -(-d // multiple) * multiple


def pallas_unsupported(backend: str, Hn: int, Hr: int, Hv: int,
                       config: Any = None) -> str | None:
    """Why implementation="pallas" cannot run these head dims on `backend` ("gpu" | "tpu"), as
    one sentence naming the dim and the constraint; None when it can.

    On GPU, head dims that are not multiples of 64 are zero-padded to them (scores and outputs
    are unchanged; the kernels do the padded work), so only shared memory can refuse; `config`
    (a _mla_attention_mgpu.Config, default when None) picks the kernels checked (split or fused
    backward).
    """
    if backend == "gpu":
        from pallas_kernels import _mla_attention_mgpu
        m = GPU_HEAD_DIM_MULTIPLE
        return _mla_attention_mgpu.unsupported(_round_up(Hn, m), _round_up(Hr, m),
                                               _round_up(Hv, m), config=config)
    if backend == "tpu":
        from pallas_kernels import _mla_attention_tpu
        return _mla_attention_tpu.unsupported(Hn, Hr, Hv)
    return f"no MLA attention kernel for backend {backend!r} (Mosaic GPU and Mosaic TPU only)"


def gpu_head_padding(Hn: int, Hr: int, Hv: int) -> tuple[int, int, int]:
    """Zero columns the Mosaic GPU kernels add to each head dim."""
    m = GPU_HEAD_DIM_MULTIPLE
    return _round_up(Hn, m) - Hn, _round_up(Hr, m) - Hr, _round_up(Hv, m) - Hv


def mla_attention(q_nope: jax.Array, q_rope: jax.Array, k_nope: jax.Array, k_rope: jax.Array,
                  v: jax.Array, segment_ids: jax.Array | None = None, *, scale: float,
                  implementation: str = "xla", interpret: bool = False,
                  config: Any = None) -> jax.Array:
    """Causal MLA attention, o[B, T, N, Hv] (see module docstring). Differentiable.

    implementation:
      "xla": the plain-JAX reference (materializes [B, N, T, S] scores).
      "cudnn": jax.nn.dot_product_attention(implementation="cudnn") on [q_nope; q_rope] and
        [k_nope; k_rope broadcast to every head], v zero-padded to the qk head dim and sliced back;
        segment_ids become a boolean [B, 1, T, S] mask. GPU only.
      "pallas_gpu" / "pallas_tpu": flash attention in Pallas, Mosaic GPU / Mosaic TPU ("pallas":
        the default backend's, read when traced: TPU on a TPU, GPU elsewhere). Saves only the
        log-sum-exp for the custom_vjp backward; dk_rope is summed over heads. Any T (padded to
        the tile multiple inside); on GPU head dims are zero-padded to multiples of 64, and dims
        the kernels cannot hold (`pallas_unsupported`) raise a ValueError naming them. The
        Mosaic GPU kernels run their matmuls on bf16/f16 operands: fp32 inputs are rounded to
        bf16 (fp32 accumulation and softmax), outputs and gradients come back in the input
        dtypes.
    interpret: run the Pallas kernels in interpret mode (CPU tests); `config` overrides the tile
      sizes (_mla_attention_mgpu.Config / _mla_attention_tpu.Config), and on GPU picks the
      backward: Config(backward="split") a dq and a dk/dv kernel (the default), "fused" one
      kernel adding dq into fp32 from each key block.
    """
    if implementation == "xla":
        return reference(q_nope, q_rope, k_nope, k_rope, v, segment_ids, scale=scale)
    if implementation == "cudnn":
        return _cudnn(q_nope, q_rope, k_nope, k_rope, v, segment_ids, scale=scale)
    if implementation == PALLAS:
        implementation = implementations.for_backend(jax.default_backend())
    if implementation in (PALLAS_GPU, PALLAS_TPU):
        return _pallas(q_nope, q_rope, k_nope, k_rope, v, segment_ids, scale=scale,
                       chip=implementations.chip_of(implementation), config=config,
                       interpret=interpret)
    raise ValueError(
        f"mla_attention implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------------------------
# cuDNN baseline
# ----------------------------------------------------------------------------------------------
def _cudnn(q_nope, q_rope, k_nope, k_rope, v, segment_ids, *, scale):
    # A refusal, not a choice: without a GPU the cuDNN call would fail later and less clearly.
    if jax.default_backend() != "gpu":
        raise ValueError("mla_attention implementation 'cudnn' needs a CUDA GPU backend, "
                         f"this is {jax.default_backend()!r}; use 'xla' or 'pallas'")
    B, S, N, _ = k_nope.shape
    Hqk, Hv = q_nope.shape[-1] + q_rope.shape[-1], v.shape[-1]
    with jax.named_scope("mla_cudnn_pack"):
        q_btnh = jnp.concatenate([q_nope, q_rope], axis=-1)
        k_rope_bsnh = jnp.broadcast_to(k_rope[:, :, None, :], (B, S, N, k_rope.shape[-1]))
        k_bsnh = jnp.concatenate([k_nope, k_rope_bsnh.astype(k_nope.dtype)], axis=-1)
        # cuDNN flash attention needs equal qk and v head dims: pad v with zeros, slice o back.
        v_bsnh = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, Hqk - Hv)))
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # [B,1,T,S]
    o_btnh = jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask, scale=scale,
                                          is_causal=True, implementation="cudnn")
    return o_btnh[..., :Hv]


# ----------------------------------------------------------------------------------------------
# Pallas flash attention: padding, segment tables, custom_vjp (shared by Mosaic GPU and TPU)
# ----------------------------------------------------------------------------------------------
def segment_bounds(segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """first_bt[b, t] = min{s : seg[b, s] == seg[b, t]}, last_bt[b, t] = max{...} (int32 [B, T]).

    Query t sees no key before first_bt[b, t]; key s is seen by no query after last_bt[b, s].
    Segment ids need not be contiguous or sorted.
    """
    B, T = segment_ids_bt.shape
    order_bt = jnp.argsort(segment_ids_bt, axis=1, stable=True)
    sorted_bt = jnp.take_along_axis(segment_ids_bt, order_bt, axis=1)
    pos_t = jnp.arange(T, dtype=jnp.int32)
    change_bt = sorted_bt[:, 1:] != sorted_bt[:, :-1]
    edge_b1 = jnp.ones((B, 1), bool)
    run_start_bt = lax.cummax(jnp.where(jnp.concatenate([edge_b1, change_bt], 1), pos_t, 0),
                              axis=1)
    run_end_bt = lax.cummin(jnp.where(jnp.concatenate([change_bt, edge_b1], 1), pos_t, T - 1),
                            axis=1, reverse=True)
    # Within a run the stable sort keeps positions increasing: its ends are the min and max.
    first_sorted_bt = jnp.take_along_axis(order_bt, run_start_bt, axis=1)
    last_sorted_bt = jnp.take_along_axis(order_bt, run_end_bt, axis=1)
    inverse_bt = jnp.argsort(order_bt, axis=1)
    first_bt = jnp.take_along_axis(first_sorted_bt, inverse_bt, axis=1)
    last_bt = jnp.take_along_axis(last_sorted_bt, inverse_bt, axis=1)
    return first_bt.astype(jnp.int32), last_bt.astype(jnp.int32)


def _chip_module(chip: str):
    if chip == "gpu":
        from pallas_kernels import _mla_attention_mgpu as module
    else:
        from pallas_kernels import _mla_attention_tpu as module
    return module


def _pallas(q_nope, q_rope, k_nope, k_rope, v, segment_ids, *, scale, chip, config,
            interpret):
    module = _chip_module(chip)
    config = module.Config() if config is None else config
    B, T = q_nope.shape[:2]
    if k_nope.shape[1] != T:
        raise ValueError(f"causal MLA attention needs S == T, got S={k_nope.shape[1]}, T={T}")
    Hn, Hr, Hv = q_nope.shape[-1], q_rope.shape[-1], v.shape[-1]
    reason = pallas_unsupported(chip, Hn, Hr, Hv, config if chip == "gpu" else None)
    if reason:
        raise ValueError(f"mla_attention implementation 'pallas' on {chip}: {reason}; "
                         "use implementation 'xla'")
    pad_n, pad_r, pad_v = gpu_head_padding(Hn, Hr, Hv) if chip == "gpu" else (0, 0, 0)
    out_dtype = q_nope.dtype
    compute_dtype = module.compute_dtype(out_dtype)
    has_segments = segment_ids is not None
    pad = -T % config.seq_multiple
    with jax.named_scope("mla_pallas_pad"):
        def prep(x, head_pad):
            x = x.astype(compute_dtype)
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3) + [(0, head_pad)]
            return jnp.pad(x, widths) if pad or head_pad else x

        args = [prep(x, p) for x, p in ((q_nope, pad_n), (q_rope, pad_r), (k_nope, pad_n),
                                        (k_rope, pad_r), (v, pad_v))]
        if has_segments:
            seg_bt = segment_ids.astype(jnp.int32)
            # Padded rows get a segment of their own; causality alone keeps real rows off them.
            seg_bt = jnp.pad(seg_bt, ((0, 0), (0, pad)), constant_values=jnp.max(seg_bt) + 1)
        else:
            seg_bt = jnp.zeros((B, T + pad), jnp.int32)
    o = _flash(*args, seg_bt, scale, chip, config, has_segments, interpret)
    return o[:, :T, :, :Hv].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q_nope, q_rope, k_nope, k_rope, v, seg_bt, scale, chip, config, has_segments,
           interpret):
    o, _ = _flash_fwd(q_nope, q_rope, k_nope, k_rope, v, seg_bt, scale, chip, config,
                      has_segments, interpret)
    return o


def _flash_fwd(q_nope, q_rope, k_nope, k_rope, v, seg_bt, scale, chip, config, has_segments,
               interpret):
    module = _chip_module(chip)
    bounds = segment_bounds(seg_bt) if has_segments else None
    with jax.named_scope("mla_flash_fwd"):
        o, lse = module.forward(q_nope, q_rope, k_nope, k_rope, v, seg_bt, bounds, scale=scale,
                                config=config, has_segments=has_segments, interpret=interpret)
    # Named so a remat policy may keep them (the model's "save_kernels"). The output is
    # named where it leaves too: the layer's next matmul needs it as well, and an unnamed copy
    # would make the backward run this kernel again to get it.
    o, lse = residuals.saveable(o, lse)
    return o, (q_nope, q_rope, k_nope, k_rope, v, seg_bt, o, lse)


def _flash_bwd(scale, chip, config, has_segments, interpret, residuals, do):
    module = _chip_module(chip)
    q_nope, q_rope, k_nope, k_rope, v, seg_bt, o, lse = residuals
    bounds = segment_bounds(seg_bt) if has_segments else None
    with jax.named_scope("mla_flash_bwd"):
        do = do.astype(o.dtype)
        delta_bnt = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32))
        dq_nope, dq_rope, dk_nope, dk_rope, dv = module.backward(
            q_nope, q_rope, k_nope, k_rope, v, do, lse, delta_bnt, seg_bt, bounds, scale=scale,
            config=config, has_segments=has_segments, interpret=interpret)
    return dq_nope, dq_rope, dk_nope, dk_rope, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
