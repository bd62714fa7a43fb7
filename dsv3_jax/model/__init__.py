"""The model: Multi-head Latent Attention, DeepSeekMoE and Multi-Token Prediction as Flax modules
(`layers`, `attention`, `moe`, `transformer`), the public functions over them (`api`: init,
forward, prefill, decode, the MTP step), which implementation runs each part on a backend
(`implementations`) and the FLOPs a token costs (`flops`).

Imports `dsv3_jax.config`, `dsv3_jax.parallel` and `pallas_kernels`; nothing above it.
"""
