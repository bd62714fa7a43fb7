"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax.

The public API. Its names load on first use (PEP 562), so importing one subpackage
(`dsv3_jax.train.loop`, say) does not import generation or conversion with it.

  dsv3_jax.config       ModelConfig and the presets            (pallas_kernels.implementations)
  dsv3_jax.tokenizer    byte-level and Hugging Face tokenizers  (nothing of ours)
  dsv3_jax.checkpoints  find and read a saved run              (config, tokenizer)
  dsv3_jax.parallel     mesh, logical axes, expert and pipeline parallelism   (config)
  dsv3_jax.model        the model, its public functions, implementations      (parallel)
  dsv3_jax.train        data, objective, optimizer, step, loop, checkpointer  (model)
  dsv3_jax.convert      the released layout, safetensors, orbax files          (model)
  dsv3_jax.infer        generation                                              (model)
  dsv3_jax.rl           GRPO: loss, rewards, prompts, rollouts, its run   (train, infer)
"""

import glob
import importlib
import os

# libtpu (the `tpu` extra, installed to compile for TPU targets: launch.compile) makes JAX probe
# for TPU chips at start-up, and on a host without them log metadata-server errors. Where the
# host has no TPU chips (no /dev/accel*, no /dev/vfio/N), tell libtpu there is nothing to look
# up; compile-only TPU topologies still work. Set before any JAX backend starts.
NO_TPU_HOST_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                   "TPU_HOST_BOUNDS": "1,1,1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    for _key, _value in NO_TPU_HOST_ENV.items():
        os.environ.setdefault(_key, _value)

_EXPORTS = {
    "dsv3_jax.config": ("PRESETS", "ModelConfig", "preset"),
    "dsv3_jax.model.api": ("Cache", "ModelOutput", "abstract_variables", "decode", "forward",
                           "init", "init_cache", "init_mtp_cache", "logical_axes", "mtp_step",
                           "param_counts", "prefill"),
    "dsv3_jax.infer.generate": ("generate", "load_checkpoint"),
    "dsv3_jax.convert.released": ("from_hf_state_dict", "to_hf_state_dict"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'dsv3_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
