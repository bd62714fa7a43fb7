"""Run by tests/test_parallel.py in a subprocess with 8 CPU devices: one training step on each
mesh, compared with the same step on one device. Prints one JSON line per mesh."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from dsv3_jax.train import loop as train_loop  # noqa: E402
from dsv3_jax.train.data import DataSpec, TokenData  # noqa: E402
from dsv3_jax.train.run_spec import RunSpec  # noqa: E402
from dsv3_jax.train.step import Trainer  # noqa: E402


def spec_of(cfg):
    return RunSpec.from_config(cfg, devices=jax.device_count(), backend="cpu")


def step(cfg, parallel):
    """One training step from the seed-0 init on the first batch; (state, metrics) on host."""
    trainer = Trainer(spec_of(cfg).model, spec_of(cfg).hyper, parallel)
    data = TokenData(
        DataSpec("text", "", "text", "bytes", cfg.seq_len, 50), 320)
    batch = next(iter(data.dataset("train", cfg.batch_size, 0)))
    state = trainer.init_state(jax.random.key(0))
    state, metrics = trainer.train_step(state, trainer.place_batch(batch))
    return jax.device_get(state), jax.device_get(metrics)


def reference(cfg):
    """The single-device step, and whether it moved every weight (so comparisons mean
    something)."""
    ref_state, ref_metrics = step(cfg, None)
    init = jax.device_get(Trainer(spec_of(cfg).model, spec_of(cfg).hyper)
                          .init_state(jax.random.key(0)).params)
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(ref_state.params), jax.tree.leaves(init), strict=True)]
    return ref_state, ref_metrics, min(moved) > 0 and max(moved) > 5e-4


def main(cases):
    cfg = tiny.get_config()
    cfg.batch_size, cfg.seq_len, cfg.microbatches = 16, 32, 2
    # A larger Adam epsilon keeps the first update smooth in the gradient (with eps -> 0 it is
    # sign(g), which flips for gradients at rounding-noise level).
    cfg.optimizer.eps = 1e-4
    # The tiny config warms up from a learning rate of 0; this moves the weights at step 1.
    cfg.optimizer.schedule = (("constant", 1, 1e-3),)
    references = {}
    for case in cases:
        # 1 dense + 4 MoE layers by default: 2 or 4 pipeline stages, 2 repeats on 2 stages.
        cfg.model.n_layers = case.get("n_layers", 5)
        if cfg.model.n_layers not in references:
            references[cfg.model.n_layers] = reference(cfg)
        ref_state, ref_metrics, ref_moved = references[cfg.model.n_layers]
        mesh_shape = case["mesh"]
        cfg.mesh.pipeline, cfg.mesh.data, cfg.mesh.expert = mesh_shape
        cfg.mesh.fsdp = case["fsdp"]
        cfg.mesh.capacity_factor = 0.5  # forces several expert exchange rounds
        cfg.mesh.pipeline_schedule = case.get("schedule", "gpipe")
        cfg.mesh.pipeline_microbatches = 2
        cfg.mesh.pipeline_repeats = 2
        parallel = train_loop.parallel_layout(spec_of(cfg).mesh)
        state, metrics = step(cfg, parallel)
        params_err = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params),
                            strict=True))
        bias_equal = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(state.router_bias), jax.tree.leaves(ref_state.router_bias),
            strict=True))
        print(json.dumps({
            **case,
            "loss": float(metrics["loss"]), "ref_loss": float(ref_metrics["loss"]),
            "params_rel_err": params_err, "bias_equal": bias_equal, "ref_moved": ref_moved,
            "devices": int(parallel.mesh.size)}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
