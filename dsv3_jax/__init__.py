"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax."""

from dsv3_jax.api import (
    Cache,
    ModelOutput,
    abstract_variables,
    decode,
    forward,
    init,
    init_cache,
    init_mtp_cache,
    logical_axes,
    mtp_step,
    param_counts,
    prefill,
)
from dsv3_jax.config import PRESETS, ModelConfig, preset
from dsv3_jax.generate import generate, load_checkpoint
from dsv3_jax.hf_weights import from_hf_state_dict, to_hf_state_dict

__all__ = [
    "PRESETS",
    "Cache",
    "ModelConfig",
    "ModelOutput",
    "abstract_variables",
    "decode",
    "forward",
    "from_hf_state_dict",
    "generate",
    "init",
    "init_cache",
    "init_mtp_cache",
    "load_checkpoint",
    "logical_axes",
    "mtp_step",
    "param_counts",
    "prefill",
    "preset",
    "to_hf_state_dict",
]
