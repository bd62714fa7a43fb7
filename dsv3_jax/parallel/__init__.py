"""Parallelism: the device mesh and the one logical-axis table every sharding comes from
(`sharding`), expert parallelism's token exchange (`expert_parallel`) and pipeline stages
(`pipeline`).

Imports `dsv3_jax.config` and `pallas_kernels`; the model builds on it, never the reverse.
"""
