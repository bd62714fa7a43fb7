"""Pallas kernels for DeepSeek-V3, each beside a plain-JAX reference with the same signature.

Modules:
  grouped_matmul   -- ragged (grouped) matmul over expert-sorted rows, with its VJP.
  expert_dispatch  -- the routed-expert block: permute token-rows to expert order, SwiGLU experts,
                      weighted un-permute/combine.
  mla_attention    -- causal multi-head latent attention for training/prefill (q/k 192, v 128).
  mla_decode       -- absorbed MLA decode attention over the shared 576-value latent cache.
  implementations  -- the names their `implementation` argument takes ("pallas_gpu",
                      "pallas_tpu", ...), defined once.

Every public op takes an `implementation` argument; "reference" is always available and is
what the kernels are tested against on CPU (interpret mode).
"""
