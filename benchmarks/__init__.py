"""Benchmarks for the accelerator: each prints ours beside baselines measured in the same run."""
