"""Multi-host start-up through JAX's own runtime: `jax.distributed.initialize()`.

Every host runs the same command (one process per host, or per GPU); `maybe_initialize` decides
whether this is one process of a cluster and, if so, connects it to the others before any JAX
array exists. JAX's cluster auto-detection then supplies the coordinator address, the process
count and this process's index; there is no launcher or transport of our own.

Modes (`python -m launch.train --distributed=MODE`):
  off   never initialize: one process (its local devices only).
  on    always call jax.distributed.initialize(); an environment JAX cannot read is an error.
  auto  initialize when the environment shows a multi-process cluster (`detect`):
          JAX_COORDINATOR_ADDRESS   set explicitly (with JAX_NUM_PROCESSES, JAX_PROCESS_ID)
          SLURM                     an srun step with SLURM_NTASKS > 1
          Open MPI                  mpirun with OMPI_COMM_WORLD_SIZE > 1
          Cloud TPU                 a TPU VM whose slice (or slices) has more than one host, as
                                    JAX's own TPU detection counts them (GKE or GCE metadata)
          Kubernetes                an indexed Job (JOB_COMPLETION_INDEX); JAX reads the Job's
                                    parallelism from the API (`pip install jax[k8s]`)
        and stay single-process otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

MODES = ("auto", "on", "off")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")  # what JAX's SLURM detection reads

log = logging.getLogger("dsv3_jax.distributed")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A multi-process environment: its kind, and the process count when the environment says."""

    kind: str
    processes: int | None = None  # None: JAX finds out (Kubernetes API, TPU metadata)


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def cloud_tpu_hosts() -> int | None:
    """Processes of this Cloud TPU job (hosts per slice x slices) as JAX's own TPU cluster
    detection counts them; None when not on a Cloud TPU VM. JAX exposes this detection only
    inside `jax.distributed.initialize`, so its cluster classes are called directly."""
    try:
        from jax._src import cloud_tpu_init, clusters
    except ImportError:  # pragma: no cover - a JAX without these modules
        return None
    if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return None
    for env in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
        if env.is_env_present():
            return env.get_process_count()
    return None


def detect(environ: Mapping[str, str],
           tpu_hosts: Callable[[], int | None] = cloud_tpu_hosts) -> Cluster | None:
    """The multi-process cluster `environ` describes, or None for a single process.

    `tpu_hosts` counts the processes of a Cloud TPU job (None off TPU VMs); tests replace it.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        processes = _int(environ, "JAX_NUM_PROCESSES")
        if processes is None or processes > 1:
            return Cluster("JAX_COORDINATOR_ADDRESS", processes)
        return None
    if all(v in environ for v in SLURM_VARS):
        tasks = _int(environ, "SLURM_NTASKS")
        return Cluster("SLURM", tasks) if tasks and tasks > 1 else None
    world = _int(environ, "OMPI_COMM_WORLD_SIZE")
    if world is not None:
        return Cluster("Open MPI", world) if world > 1 else None
    hosts = tpu_hosts()
    if hosts is not None:
        return Cluster("Cloud TPU", hosts) if hosts > 1 else None
    if environ.get("KUBERNETES_SERVICE_HOST") and "JOB_COMPLETION_INDEX" in environ:
        return Cluster("Kubernetes")
    return None


def initialize_kwargs(environ: Mapping[str, str], cluster: Cluster | None) -> dict[str, Any]:
    """What JAX cannot read from the environment by itself.

    - JAX_NUM_PROCESSES and JAX_PROCESS_ID (JAX reads JAX_COORDINATOR_ADDRESS, not these).
    - SLURM with one process per node: JAX's SLURM detection makes only GPU SLURM_LOCALID
      visible to each process (right for one process per GPU); with one task per node every
      GPU of the node is listed instead (SLURM_GPUS_ON_NODE of them; an empty list, when SLURM
      does not say, leaves all of them visible). JAX_LOCAL_DEVICE_IDS overrides both.
    """
    kwargs: dict[str, Any] = {}
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = _int(environ, name)
        if value is not None:
            kwargs[key] = value
    if (cluster is not None and cluster.kind == "SLURM" and "JAX_LOCAL_DEVICE_IDS" not in environ
            and _int(environ, "SLURM_NTASKS") == _int(environ, "SLURM_STEP_NUM_NODES")):
        kwargs["local_device_ids"] = list(range(_int(environ, "SLURM_GPUS_ON_NODE") or 0))
    return kwargs


def maybe_initialize(mode: str = "auto", environ: Mapping[str, str] | None = None,
                     tpu_hosts: Callable[[], int | None] = cloud_tpu_hosts) -> Cluster | None:
    """Connect this process to its cluster (mode auto|on|off; see the module docstring).

    Call it first thing, before any JAX array or device query: JAX fixes its devices when the
    backend starts. Returns the cluster joined, or None when staying single-process. Process 0
    prints one line with the process count and the devices. `environ` and `tpu_hosts` decide
    (tests pass their own); JAX's initialization itself reads os.environ.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r} must be one of {', '.join(MODES)}")
    environ = os.environ if environ is None else environ
    if mode == "off" or jax.distributed.is_initialized():
        return None
    cluster = detect(environ, tpu_hosts)
    if cluster is None:
        if mode == "auto":
            return None
        cluster = Cluster("JAX auto-detection")
    try:
        jax.distributed.initialize(**initialize_kwargs(environ, cluster))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"--distributed={mode}: jax.distributed.initialize() failed for {cluster.kind}: {e}. "
            "Outside SLURM, Open MPI, Cloud TPU and Kubernetes indexed Jobs, set "
            "JAX_COORDINATOR_ADDRESS=host:port (process 0's host), JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID on every process") from e
    log.info("process %d of %d: %d local devices %s", jax.process_index(), jax.process_count(),
             jax.local_device_count(), [d.id for d in jax.local_devices()])
    if jax.process_index() == 0:
        print(describe(cluster), flush=True)
    return cluster


def describe(cluster: Cluster) -> str:
    """One line: processes, devices and where they came from (call after initializing)."""
    devices = jax.devices()
    return (f"distributed ({cluster.kind}): process {jax.process_index()} of "
            f"{jax.process_count()}; {len(devices)} devices, {jax.local_device_count()} per "
            f"process, {devices[0].device_kind}")
