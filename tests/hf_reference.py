"""Hugging Face's PyTorch DeepseekV3 as the independent reference for the tests.

`random_hf_model` builds transformers' DeepseekV3ForCausalLM from our config with random weights
(norm scales and router biases randomized too, biases of both signs), and returns it with its
tensors in the released file layout (what `save_pretrained` writes: one tensor per expert).
"""

from __future__ import annotations

import glob
import tempfile

import numpy as np
import safetensors.numpy
import torch
import transformers

from dsv3_jax.config import ModelConfig


def hf_config(cfg: ModelConfig) -> transformers.DeepseekV3Config:
    return transformers.DeepseekV3Config(**cfg.to_hf(), attn_implementation="eager")


def random_hf_model(cfg: ModelConfig, seed: int, bias_scale: float = 0.05,
                    bias_offset: float = 0.0):
    """(model in fp32 eval mode, {released name: numpy array}); router biases are uniform in
    bias_offset +- bias_scale."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_config(cfg)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Both signs: excluded groups must be -inf, not 0 (transformers #45440).
                b.copy_(bias_offset + bias_scale * (2 * torch.rand(b.shape, generator=gen) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = {}
        for path in sorted(glob.glob(f"{tmp}/*.safetensors")):
            tensors.update(safetensors.numpy.load_file(path))
    return model, tensors


def random_mtp_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], seed: int):
    """Released-layout MTP tensors (layer n_layers + k) with random values, sharing the main
    embedding and head as the released files do."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(cfg.mtp_depth):
        src, dst = f"model.layers.{cfg.n_layers - 1}.", f"model.layers.{cfg.n_layers + k}."
        for name, value in tensors.items():
            if name.startswith(src):
                scale = 0.2 if "norm" in name else 0.02
                base = 1.0 if "norm" in name else 0.0
                if name.endswith("e_score_correction_bias"):
                    scale, base = 0.05, 0.0
                new = base + scale * rng.standard_normal(value.shape)
                out[dst + name[len(src):]] = new.astype(np.float32)
        D = cfg.dim
        out[dst + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        out[dst + "shared_head.head.weight"] = tensors["lm_head.weight"]
        out[dst + "enorm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
        out[dst + "hnorm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
        out[dst + "shared_head.norm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(
            np.float32)
        out[dst + "eh_proj.weight"] = (0.02 * rng.standard_normal((D, 2 * D))).astype(np.float32)
    return out


def hf_mtp_logits(cfg: ModelConfig, model, tensors: dict[str, np.ndarray], tokens: np.ndarray):
    """Depth-1 MTP logits straight from SPEC.md section 6 with HF's own decoder layer:
    h' = eh_proj [enorm(Emb(t_{i+1})) ; hnorm(h0_i)], h0 = the main model's final-normed state,
    then one DeepseekV3DecoderLayer (MLA + MoE), shared_head.norm, the shared head."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    hf_cfg = model.config
    prefix = f"model.layers.{cfg.n_layers}."

    def t(name):
        return torch.from_numpy(np.asarray(tensors[prefix + name], np.float32))

    layer = m.DeepseekV3DecoderLayer(hf_cfg, layer_idx=cfg.n_layers).float().eval()
    state = {}
    for name, param in layer.state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            state[name] = torch.stack([
                torch.cat([t(f"mlp.experts.{e}.gate_proj.weight"),
                           t(f"mlp.experts.{e}.up_proj.weight")], dim=0)
                for e in range(cfg.n_routed_experts)])
        elif name == "mlp.experts.down_proj":
            state[name] = torch.stack([t(f"mlp.experts.{e}.down_proj.weight")
                                       for e in range(cfg.n_routed_experts)])
        else:
            state[name] = t(name)
        assert state[name].shape == param.shape, name
    layer.load_state_dict(state)

    def rms(x, w):
        norm = m.DeepseekV3RMSNorm(cfg.dim, eps=cfg.norm_eps)
        norm.weight.data.copy_(w)
        return norm(x)

    ids = torch.from_numpy(tokens.astype(np.int64))
    B, T = ids.shape
    with torch.no_grad():
        h0 = model.model(input_ids=ids).last_hidden_state  # final-normed
        emb_next = model.model.embed_tokens(ids)[:, 1:]
        x = torch.cat([rms(emb_next, t("enorm.weight")), rms(h0[:, :-1], t("hnorm.weight"))], -1)
        x = x @ t("eh_proj.weight").T
        positions = torch.arange(T - 1)[None].expand(B, -1)
        cos_sin = model.model.rotary_emb(x, positions)
        causal = torch.full((T - 1, T - 1), float("-inf")).triu(1)[None, None]
        h = layer(x, attention_mask=causal, position_ids=positions,
                  position_embeddings=cos_sin)
        h = h[0] if isinstance(h, tuple) else h
        h = rms(h, t("shared_head.norm.weight"))
        return (h @ t("shared_head.head.weight").T).numpy()
