"""Generation: batched prefill and decode with a latent KV cache, sampling and MTP speculative
decoding, from a checkpoint (`generate`).

Imports the model, `dsv3_jax.config` and `dsv3_jax.tokenizer`; never training or conversion.
"""
