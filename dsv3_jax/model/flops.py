"""Model FLOPs per trained token, and device peaks for MFU.

FLOPs per token of a training step (forward + backward = 3x forward), counting matmuls only:
  6 * (active matmul parameters, main model + MTP modules; the embedding lookup excluded,
       the output head counted once per head application: 1 + mtp_depth times)
  + 3 * attention: per layer 2 * n_heads * (qk_head_dim + v_head_dim) * T/2 multiply-adds for
       QK^T and PV under a causal mask (average context T/2), over every layer and MTP block.
This is the usual "model FLOPs" of MFU (PaLM, appendix B): recomputation is not counted.
"""

from __future__ import annotations

import jax

from dsv3_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def attention_params(c: ModelConfig) -> int:
    D, N = c.dim, c.n_heads
    q = (D * c.q_lora_rank + c.q_lora_rank * N * c.qk_head_dim if c.q_lora_rank
         else D * N * c.qk_head_dim)
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * N * (
        c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + N * c.v_head_dim * D


def active_matmul_params(c: ModelConfig) -> int:
    """Matmul weights one token passes through (embedding lookup excluded)."""
    attn = attention_params(c)
    dense_ffn = 3 * c.dim * c.inter_dim
    moe_ffn = 3 * c.dim * c.moe_inter_dim * (c.n_activated_experts + c.n_shared_experts)
    router = c.dim * c.n_routed_experts
    moe_layer = attn + moe_ffn + router
    per_mtp = moe_layer + 2 * c.dim * c.dim  # + eh_proj
    head = c.dim * c.vocab_size
    return (c.n_dense_layers * (attn + dense_ffn) + c.n_moe_layers * moe_layer
            + c.mtp_depth * per_mtp + (1 + c.mtp_depth) * head)


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    attention_layers = c.n_layers + c.mtp_depth
    attn_fwd = 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * seq_len / 2 * attention_layers
    return 6 * active_matmul_params(c) + 3 * attn_fwd


def device_peak_flops(device=None) -> float | None:
    """bf16 dense peak of a device by its kind, or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    return None
