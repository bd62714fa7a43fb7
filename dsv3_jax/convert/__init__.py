"""Checkpoint conversion: the released (Hugging Face) tensor layout (`released`), safetensors
files (`safetensors_io`), orbax files read and written directly (`orbax_files`) and the
streaming conversions between them (`stream`).

Imports the model, `dsv3_jax.config` and `dsv3_jax.tokenizer`; never training or generation.
"""
