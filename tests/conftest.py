"""Test session setup: a persistent XLA compilation cache shared by the tests and the trainer
subprocesses they start, so identical programs (the tiny train step) compile once."""

import os
import tempfile

# The Mosaic GPU interpreter runs a kernel's warpgroups as threads; on a 2-core machine it can
# deadlock unless the CPU client has enough threads (must be set before JAX starts).
os.environ.setdefault("PJRT_NPROC", "16")
# Tests run on the CPU; TPU targets are compile-only topologies (libtpu, the `tpu` extra), which
# JAX_PLATFORMS does not hide. dsv3_jax keeps libtpu from probing this host for chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

import dsv3_jax  # noqa: F401  (sets the no-TPU-host environment before a JAX backend starts)

CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dsv3_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
