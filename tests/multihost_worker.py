"""Run by tests/test_multihost.py: one training step of the tiny model on a data=4 x expert=2
mesh, either as one process of a two-process jax.distributed job (4 CPU devices each, joined
through launch.distributed from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)
or as one process of 8 CPU devices.

  python -m tests.multihost_worker multi OUT   # every process of the job
  python -m tests.multihost_worker single OUT  # the reference; also restores OUT/multi/ckpt

Both build the step's global batch from the rows train_loop gives each process
(`data.dataset(..., process_index, process_count)` with two processes): the multi-process job
places each process's own rows with `Trainer.place_batch`, the reference places both halves
from one process. The multi-process job then saves its state with the trainer's orbax
Checkpointer (every process writes its shards); the reference restores that checkpoint.

Each process writes OUT/<mode>/shards-<process>.npz: the shards of the initial params and of
the params and router bias after the step that it holds, keyed `[init|restored]<tree
path>@<index>` (put back together by the test), and process 0 writes
OUT/<mode>/result.json. Nothing is gathered across processes, so no collective runs beyond
the train step's own and orbax's.
"""

import json
import os
import sys

import jax

MODE = sys.argv[1]
jax.config.update("jax_num_cpu_devices", 4 if MODE == "multi" else 8)

import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from dsv3_jax.parallel import sharding  # noqa: E402
from dsv3_jax.train import run_spec  # noqa: E402
from dsv3_jax.train.checkpointer import Checkpointer  # noqa: E402
from dsv3_jax.train.data import DataSpec, TokenData  # noqa: E402
from dsv3_jax.train.step import Trainer  # noqa: E402
from launch import distributed  # noqa: E402

PROCESSES = 2  # of the multi-process job, whose rows both modes use
MESH = {"pipeline": 1, "data": 4, "expert": 2}
BARRIER_MS = 900_000


def config():
    cfg = tiny.get_config()
    cfg.batch_size, cfg.seq_len, cfg.microbatches = 16, 32, 2
    cfg.optimizer.eps = 1e-4  # as tests/parallel_worker.py: a first update smooth in the grads
    # The tiny schedule warms up from 0, so its first step would not move the parameters.
    cfg.optimizer.schedule = (("constant", 10, 1e-3),)
    return cfg


def process_rows(data, cfg, process: int) -> dict[str, np.ndarray]:
    """The first batch train_loop's data pipeline gives `process` of PROCESSES."""
    per_process = cfg.batch_size // PROCESSES
    return next(iter(data.dataset("train", per_process, cfg.seed, process, PROCESSES)))


def local_shards(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """The shards of every leaf this process holds, keyed `<prefix><tree path>@<index>` with
    the index as start:stop per dimension (replicated copies are written once)."""
    shards = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        for shard in leaf.addressable_shards:
            index = ",".join(f"{s.start or 0}:{size if s.stop is None else s.stop}"
                             for s, size in zip(shard.index, leaf.shape, strict=True))
            shards[f"{prefix}{jax.tree_util.keystr(path)}@{index}"] = np.asarray(shard.data)
    return shards


def wait_for_peers(name: str) -> None:
    """A barrier of the coordination service. XLA's CPU (gloo) collectives give a peer only
    30 s to reach a collective it has not set up yet, and compiling the train step takes
    longer than that on a loaded 2-core runner, so every process compiles first and waits here.
    JAX has no public barrier that is not itself a collective; this is its distributed
    client's."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.wait_at_barrier(name, BARRIER_MS)


def main(out: str) -> None:
    cluster = distributed.maybe_initialize("auto") if MODE == "multi" else None
    cfg = config()
    model = run_spec.model_config(cfg)
    data = TokenData(
        DataSpec("text", "", "text", "bytes", cfg.seq_len, 50), model.vocab_size)
    parallel = sharding.Parallel(
        sharding.make_mesh(MESH["pipeline"], MESH["data"], MESH["expert"]),
        capacity_factor=0.5)  # forces several exchange rounds, across processes here
    trainer = Trainer(model, run_spec.RunSpec.from_config(
        cfg, devices=jax.device_count(), backend="cpu", processes=jax.process_count()).hyper,
        parallel)
    if MODE == "multi":
        rows = process_rows(data, cfg, jax.process_index())
    else:
        halves = [process_rows(data, cfg, p) for p in range(PROCESSES)]
        rows = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    batch = trainer.place_batch(rows)
    key = jax.random.key(cfg.seed)
    init = trainer.init_state.lower(key).compile()
    step = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
    wait_for_peers("compiled")
    state = init(key)
    arrays = local_shards({"params": state.params}, "init")  # host copies before the step
    state, metrics = step(state, batch)
    result = {
        "processes": jax.process_count(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "cluster": None if cluster is None else cluster.kind,
        "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),  # replicated
    }
    arrays.update(local_shards({"params": state.params, "router_bias": state.router_bias}))

    mine = os.path.join(out, MODE)
    os.makedirs(mine, exist_ok=True)
    if MODE == "multi":
        checkpoints = Checkpointer(os.path.join(mine, "ckpt"), keep=1)
        checkpoints.save(1, state, {"step": 1}, {"note": "multihost test"})
        checkpoints.close()
    else:
        checkpoints = Checkpointer(os.path.join(out, "multi", "ckpt"), keep=1,
                                   asynchronous=False)
        restored = checkpoints.restore_latest(trainer.abstract_state())
        checkpoints.close()
        if restored is None:
            raise SystemExit("the multi-process checkpoint did not restore")
        restored_step, restored_state, _, _ = restored
        result["restored_step"] = restored_step
        arrays.update(local_shards({"params": restored_state.params,
                                    "router_bias": restored_state.router_bias}, "restored"))
    np.savez(os.path.join(mine, f"shards-{jax.process_index()}.npz"), **arrays)
    if jax.process_index() == 0:
        with open(os.path.join(mine, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[2])
