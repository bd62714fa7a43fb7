"""Tensor-by-tensor mapping between our variables and the released (Hugging Face / official
DeepSeek-V3) tensor names, in PyTorch's [out, in] layout (SPEC.md sections 6 and 8).

`tensor_map(config)` lists every released tensor with where it lives in our variables; the
whole-model functions below and the streaming converter (launch.convert) both use it, so there is
one mapping. Experts are one tensor each (as `save_pretrained` and the official files store
them); the MTP depth k is layer `n_layers + k` with its own copies of the embedding and head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.api import abstract_variables
from dsv3_jax.model.moe import ROUTER_BIAS


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One released tensor.

    path: keys into our variables (collection first); index: leading indices into that leaf
    (layer in a stack, expert); in_dims: how many leading dims of the indexed slice are the
    matmul input (0 for vectors and the embedding, whose layout matches PyTorch's); shared: the
    tensor is a copy of one stored elsewhere (the MTP embedding and head).
    """

    name: str
    path: tuple[str, ...]
    index: tuple[int, ...] = ()
    in_dims: int = 0
    shared: bool = False

    def to_torch_layout(self, value: np.ndarray) -> np.ndarray:
        """Our slice -> the released [out, in] tensor."""
        if self.in_dims == 0:
            return value
        n_in = int(np.prod(value.shape[:self.in_dims]))
        return value.reshape(n_in, -1).T

    def from_torch_layout(self, tensor: np.ndarray, slice_shape: tuple[int, ...]) -> np.ndarray:
        """The released tensor -> our slice of `slice_shape`."""
        if self.in_dims == 0:
            return tensor.reshape(slice_shape)
        return tensor.T.reshape(slice_shape)

    def expected_shape(self, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.in_dims == 0:
            return tuple(slice_shape)
        n_in = int(np.prod(slice_shape[:self.in_dims]))
        return (int(np.prod(slice_shape)) // n_in, n_in)


def _attention_specs(cfg: ModelConfig, prefix: str, base: tuple[str, ...],
                     index: tuple[int, ...]) -> Iterator[TensorSpec]:
    a = (*base, "attn")
    yield TensorSpec(f"{prefix}.input_layernorm.weight", (*base, "attn_norm", "scale"), index)
    yield TensorSpec(f"{prefix}.post_attention_layernorm.weight", (*base, "mlp_norm", "scale"),
                     index)
    p = f"{prefix}.self_attn"
    if cfg.q_lora_rank:
        yield TensorSpec(f"{p}.q_a_proj.weight", (*a, "wq_a"), index, 1)
        yield TensorSpec(f"{p}.q_a_layernorm.weight", (*a, "q_norm", "scale"), index)
        yield TensorSpec(f"{p}.q_b_proj.weight", (*a, "wq_b"), index, 1)
    else:
        yield TensorSpec(f"{p}.q_proj.weight", (*a, "wq"), index, 1)
    yield TensorSpec(f"{p}.kv_a_proj_with_mqa.weight", (*a, "wkv_a"), index, 1)
    yield TensorSpec(f"{p}.kv_a_layernorm.weight", (*a, "kv_norm", "scale"), index)
    yield TensorSpec(f"{p}.kv_b_proj.weight", (*a, "wkv_b"), index, 1)
    yield TensorSpec(f"{p}.o_proj.weight", (*a, "wo"), index, 2)


def _ffn_specs(cfg: ModelConfig, prefix: str, base: tuple[str, ...], index: tuple[int, ...],
               moe: bool) -> Iterator[TensorSpec]:
    p = f"{prefix}.mlp"
    if not moe:
        for proj, w in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            yield TensorSpec(f"{p}.{proj}.weight", (*base, "mlp", w), index, 1)
        return
    m = (*base, "moe")
    yield TensorSpec(f"{p}.gate.weight", (*m, "router"), index, 1)
    yield TensorSpec(f"{p}.gate.e_score_correction_bias", (ROUTER_BIAS, *m[1:], "bias"), index)
    for e in range(cfg.n_routed_experts):
        for proj, w in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            yield TensorSpec(f"{p}.experts.{e}.{proj}.weight", (*m, w), (*index, e), 1)
    if cfg.n_shared_experts:
        for proj, w in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            yield TensorSpec(f"{p}.shared_experts.{proj}.weight", (*m, "shared", w), index, 1)


def tensor_map(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the released layout, in file order (embedding, layers, MTP, norm, head)."""
    specs = [TensorSpec("model.embed_tokens.weight", ("params", "embed"))]
    for i in range(cfg.n_layers):
        moe = i >= cfg.n_dense_layers
        stack = "moe_layers" if moe else "dense_layers"
        j = i - cfg.n_dense_layers if moe else i
        base = ("params", stack)
        specs += _attention_specs(cfg, f"model.layers.{i}", base, (j,))
        specs += _ffn_specs(cfg, f"model.layers.{i}", base, (j,), moe)
    for k in range(cfg.mtp_depth):
        prefix, mtp = f"model.layers.{cfg.n_layers + k}", ("params", f"mtp_{k}")
        specs += [
            TensorSpec(f"{prefix}.embed_tokens.weight", ("params", "embed"), shared=True),
            TensorSpec(f"{prefix}.enorm.weight", (*mtp, "enorm", "scale")),
            TensorSpec(f"{prefix}.hnorm.weight", (*mtp, "hnorm", "scale")),
            TensorSpec(f"{prefix}.eh_proj.weight", (*mtp, "eh_proj"), (), 1),
            TensorSpec(f"{prefix}.shared_head.norm.weight", (*mtp, "head_norm", "scale")),
            TensorSpec(f"{prefix}.shared_head.head.weight", ("params", "head"), (), 1,
                       shared=True),
        ]
        specs += _attention_specs(cfg, prefix, (*mtp, "block"), ())
        specs += _ffn_specs(cfg, prefix, (*mtp, "block"), (), moe=True)
    specs += [
        TensorSpec("model.norm.weight", ("params", "final_norm", "scale")),
        TensorSpec("lm_head.weight", ("params", "head"), (), 1),
    ]
    return specs


def _leaf(tree: dict[str, Any], path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def to_hf_state_dict(config: ModelConfig, variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """Our variables -> {released name: numpy [out, in]} (the dtype of the variables)."""
    out = {}
    for spec in tensor_map(config):
        leaf = np.asarray(jax.device_get(_leaf(variables, spec.path)))
        out[spec.name] = np.ascontiguousarray(spec.to_torch_layout(leaf[spec.index]))
    return out


def from_hf_state_dict(config: ModelConfig, tensors: dict[str, np.ndarray],
                       dtype=np.float32) -> dict[str, Any]:
    """{released name: array [out, in]} -> our variables (numpy, `dtype`; the bias float32).

    Raises ValueError naming the tensor for a missing, unexpected or wrongly shaped tensor, and
    for MTP copies of the embedding/head that differ from the main ones (they are shared here).
    """
    abstract = nn.meta.unbox(abstract_variables(config))
    variables = jax.tree.map(
        lambda a: np.zeros(a.shape, np.float32 if a.dtype == np.float32 else a.dtype), abstract)
    specs = tensor_map(config)
    expected = {s.name for s in specs}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. "
                         f"{missing[:3]} (config: {config.n_layers} layers, "
                         f"{config.n_routed_experts} experts, MTP depth {config.mtp_depth})")
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) not in the DeepSeek-V3 layout for this "
                         f"config, e.g. {unknown[:3]}")
    # Owners first, then the MTP copies, which are checked against them.
    for spec in sorted(specs, key=lambda s: s.shared):
        place_tensor(variables, spec, np.asarray(tensors[spec.name]))
    params_dtype = np.dtype(dtype)
    variables["params"] = jax.tree.map(lambda x: x.astype(params_dtype), variables["params"])
    return variables


def place_tensor(variables: dict[str, Any], spec: TensorSpec, tensor: np.ndarray) -> None:
    """Write one released tensor into numpy `variables` (in place), checking its shape."""
    leaf = _leaf(variables, spec.path)
    slice_shape = leaf[spec.index].shape
    want = spec.expected_shape(slice_shape)
    if tuple(tensor.shape) != want:
        raise ValueError(f"tensor {spec.name}: expected shape {want}, found {tuple(tensor.shape)}")
    value = spec.from_torch_layout(tensor.astype(np.float32), slice_shape)
    if spec.shared:
        if not np.array_equal(leaf[spec.index], value):
            raise ValueError(
                f"tensor {spec.name} differs from the main model's copy; this stack shares the "
                "embedding and output head between the main model and MTP (paper 2.2)")
        return
    leaf[spec.index] = value
