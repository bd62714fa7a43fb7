"""The whole model against Hugging Face's PyTorch DeepseekV3 (fp32, same random weights).

Tolerance: both sides compute in fp32; they differ only in summation order and in a few
formulations (HF's rope on de-interleaved halves, the 1e-20 in HF's weight normalizer), which moves
logits by O(1e-6) relative. We assert max |ours - HF| <= 1e-4 * max |HF|: two orders above that
noise, and far below what any real discrepancy (a wrong mask, a swapped rope pair, a 0 instead
of -inf group mask, a missing scale) produces, which is O(1e-1) relative.
"""

import numpy as np
import pytest
import torch

import dsv3_jax
from tests.hf_reference import hf_mtp_logits, random_hf_model, random_mtp_tensors

TINY = dsv3_jax.preset("tiny")
VARIANTS = {
    "tiny": TINY,
    "no_q_lora": TINY.replace(q_lora_rank=0),
    # YaRN on (max_seq_len above original_seq_len): scaled frequencies and mscale^2 softmax.
    "yarn": TINY.replace(max_seq_len=4096, original_seq_len=256, rope_factor=16.0),
    # 8 groups of 2 experts, 3 kept: many experts masked to -inf by the group limit.
    "eight_groups": TINY.replace(n_expert_groups=8, n_limited_groups=3),
}


def relative_max_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name):
    cfg = VARIANTS[name]
    model, tensors = random_hf_model(cfg, seed=len(name))
    tensors.update(random_mtp_tensors(cfg, tensors, seed=1))
    variables = dsv3_jax.from_hf_state_dict(cfg, tensors)
    biases = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert biases.min() < 0 < biases.max()

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    out = dsv3_jax.forward(cfg, variables, tokens)
    assert relative_max_error(out.logits, ref) < 1e-4


def test_group_limit_masks_excluded_experts_to_minus_infinity():
    """All biases negative, so every biased score is below 0: an implementation that masks the
    excluded groups with 0 instead of -inf would route every token outside its kept groups."""
    cfg = VARIANTS["eight_groups"]
    model, tensors = random_hf_model(cfg, seed=7, bias_scale=0.3, bias_offset=-1.5)
    tensors.update(random_mtp_tensors(cfg, tensors, seed=2))
    variables = dsv3_jax.from_hf_state_dict(cfg, tensors)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    out = dsv3_jax.forward(cfg, variables, tokens)
    assert relative_max_error(out.logits, ref) < 1e-4


def test_mtp_logits_match_spec_reference():
    cfg = TINY
    model, tensors = random_hf_model(cfg, seed=3)
    tensors.update(random_mtp_tensors(cfg, tensors, seed=4))
    variables = dsv3_jax.from_hf_state_dict(cfg, tensors)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 20))
    ref = hf_mtp_logits(cfg, model, tensors, tokens)  # positions 0 .. T-2
    ours = np.asarray(dsv3_jax.forward(cfg, variables, tokens).mtp_logits[0])[:, :-1]
    assert relative_max_error(ours, ref) < 1e-4
    # The order of the concat matters: swapping the two halves of eh_proj changes the output.
    D = cfg.dim
    name = f"model.layers.{cfg.n_layers}.eh_proj.weight"
    swapped = dict(tensors)
    swapped[name] = np.concatenate([tensors[name][:, D:], tensors[name][:, :D]], axis=1)
    bad = dsv3_jax.forward(cfg, dsv3_jax.from_hf_state_dict(cfg, swapped), tokens)
    assert relative_max_error(np.asarray(bad.mtp_logits[0])[:, :-1], ref) > 1e-2


def test_state_dict_round_trip_is_exact():
    cfg = TINY
    _, tensors = random_hf_model(cfg, seed=5)
    tensors.update(random_mtp_tensors(cfg, tensors, seed=6))
    back = dsv3_jax.to_hf_state_dict(cfg, dsv3_jax.from_hf_state_dict(cfg, tensors))
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
