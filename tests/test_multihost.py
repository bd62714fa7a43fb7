"""Multi-host training through jax.distributed: two processes of 4 CPU devices (cross-process
collectives over gloo, JAX's default CPU implementation) take the same training step as one
process of 8 devices, and the checkpoint both processes write restores in one process. Also how
launch.distributed decides whether to initialize."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from launch import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
CLUSTER_VARS = ("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_",
                "JOB_COMPLETION_INDEX")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any cluster variables (a CI runner may be a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
    env.update({k: os.environ[k] for k in keep if k in os.environ})
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def run_workers(commands_envs) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in commands_envs]
    results = []
    try:
        for (cmd, _), p in zip(commands_envs, procs, strict=True):
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:  # a crashed peer leaves the others waiting on collectives
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def assemble(files: list[str]) -> dict[str, np.ndarray]:
    """Global arrays from the shard files every process wrote (multihost_worker.local_shards)."""
    pieces: dict[str, list] = {}
    for name in files:
        with np.load(name) as f:
            for key in f.files:
                path, index = key.rsplit("@", 1)
                bounds = [tuple(int(b) for b in dim.split(":")) for dim in index.split(",")
                          if dim]
                pieces.setdefault(path, []).append((bounds, f[key]))
    arrays = {}
    for path, parts in pieces.items():
        shape = tuple(max(b[i][1] for b, _ in parts) for i in range(len(parts[0][0])))
        out = np.full(shape, np.nan, np.float32)  # params and router bias are float32
        for bounds, data in parts:
            out[tuple(slice(a, b) for a, b in bounds)] = data
        assert not np.isnan(out).any(), f"{path}: the shards do not cover the array"
        arrays[path] = out
    return arrays


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multihost"))
    port = free_port()
    worker = [sys.executable, "-m", "tests.multihost_worker"]
    multi = run_workers([
        ([*worker, "multi", out], clean_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i in range(2)])
    for i, r in enumerate(multi):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    single = run_workers([([*worker, "single", out], clean_env())])[0]
    assert single.returncode == 0, single.stderr[-4000:]

    def load(mode):
        with open(os.path.join(out, mode, "result.json")) as f:
            result = json.load(f)
        return result, assemble(sorted(glob.glob(os.path.join(out, mode, "shards-*.npz"))))

    return {"multi": load("multi"), "single": load("single"),
            "stdout": [r.stdout for r in multi]}


def test_two_processes_of_four_devices_form_one_job(outputs):
    result, _ = outputs["multi"]
    assert (result["processes"], result["devices"], result["local_devices"]) == (2, 8, 4)
    assert result["cluster"] == "JAX_COORDINATOR_ADDRESS"
    # maybe_initialize prints its line once: on process 0 only.
    assert [("distributed (" in s) for s in outputs["stdout"]] == [True, False]
    assert "process 0 of 2; 8 devices, 4 per process" in outputs["stdout"][0]


def test_two_processes_take_the_same_step_as_one(outputs):
    (multi, multi_state), (single, single_state) = outputs["multi"], outputs["single"]
    assert single["processes"] == 1 and single["devices"] == 8
    # fp32; the same mesh and program: only where reductions cross processes can differ.
    assert abs(multi["loss"] - single["loss"]) <= 1e-6 * abs(single["loss"])
    assert abs(multi["grad_norm"] - single["grad_norm"]) <= 1e-5 * single["grad_norm"]
    params = [k for k in single_state if k.startswith("['params']")]
    biases = [k for k in single_state if k.startswith("['router_bias']")]
    assert params and biases
    assert set(multi_state) == set(params + biases + [f"init{k}" for k in params])
    for k in params:
        np.testing.assert_array_equal(multi_state[f"init{k}"], single_state[f"init{k}"], k)
        # The update itself (not the parameters, which the initial values dominate) agrees.
        update = single_state[k] - single_state[f"init{k}"]
        assert np.max(np.abs(update)) > 0, f"{k}: the step did not move the parameters"
        error = multi_state[k] - multi_state[f"init{k}"] - update
        # + the fp32 rounding of the parameters the updates are recovered from (norm scales
        # near 1 have steps of 1.2e-7, over 1e-4 of a 1e-3 update).
        rounding = 2 * np.spacing(np.max(np.abs(single_state[k])))
        assert np.max(np.abs(error)) <= 1e-4 * np.max(np.abs(update)) + rounding, k
    for k in biases:  # integer expert counts: the bias update is exact
        np.testing.assert_array_equal(multi_state[k], single_state[k], err_msg=k)
        assert np.any(single_state[k] != 0), f"{k}: the step did not move the bias"


def test_checkpoint_written_by_both_processes_restores_in_one(outputs):
    single, state = outputs["single"]
    _, multi_state = outputs["multi"]
    assert single["restored_step"] == 1
    for k, v in multi_state.items():
        if not k.startswith("init"):
            np.testing.assert_array_equal(state[f"restored{k}"], v, err_msg=k)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"},
     distributed.Cluster("JAX_COORDINATOR_ADDRESS", 4)),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ({**SLURM, "SLURM_NTASKS": "16"}, distributed.Cluster("SLURM", 16)),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),  # too little for JAX's detection
    ({"OMPI_COMM_WORLD_SIZE": "8"}, distributed.Cluster("Open MPI", 8)),
    ({"KUBERNETES_SERVICE_HOST": "10.1.0.1", "JOB_COMPLETION_INDEX": "3"},
     distributed.Cluster("Kubernetes")),
    ({"KUBERNETES_SERVICE_HOST": "10.1.0.1"}, None),  # a plain pod
])
def test_auto_detects_multi_process_clusters_only(environ, expected):
    assert distributed.detect(environ, tpu_hosts=lambda: None) == expected


@pytest.mark.parametrize("hosts, expected", [
    (None, None), (1, None), (4, distributed.Cluster("Cloud TPU", 4))])
def test_auto_detects_tpu_pods_by_their_host_count(hosts, expected):
    assert distributed.detect({}, tpu_hosts=lambda: hosts) == expected


def test_slurm_one_process_per_node_sees_every_gpu_of_its_node():
    node = {**SLURM, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"}
    per_gpu = {**node, "SLURM_NTASKS": "32"}
    cluster = distributed.detect(node, tpu_hosts=lambda: None)
    assert distributed.initialize_kwargs(node, cluster) == {"local_device_ids": list(range(8))}
    # One process per GPU: JAX's own choice (GPU SLURM_LOCALID) stands.
    assert distributed.initialize_kwargs(per_gpu, cluster) == {}
    assert distributed.initialize_kwargs(
        {**node, "JAX_LOCAL_DEVICE_IDS": "0,1"}, cluster) == {}
    assert distributed.initialize_kwargs(
        {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, None) == {
        "num_processes": 2, "process_id": 1}


def test_bad_modes_and_values_are_refused():
    with pytest.raises(ValueError, match="--distributed='yes' must be one of auto, on, off"):
        distributed.maybe_initialize("yes", environ={})
    with pytest.raises(ValueError, match="SLURM_NTASKS='many' must be an integer"):
        distributed.detect({**SLURM, "SLURM_NTASKS": "many"}, tpu_hosts=lambda: None)
    assert distributed.maybe_initialize("off", environ={"OMPI_COMM_WORLD_SIZE": "8"}) is None
    assert distributed.maybe_initialize("auto", environ={}, tpu_hosts=lambda: None) is None


def test_train_with_distributed_on_outside_a_cluster_says_what_to_set(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", "--distributed=on"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: --distributed=on: jax.distributed.initialize() failed" in out.stderr
    assert "JAX_COORDINATOR_ADDRESS=host:port" in out.stderr
    assert not os.listdir(tmp_path)  # refused before the run started
