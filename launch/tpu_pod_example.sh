#!/bin/bash
# The same training job on a Cloud TPU pod slice: every host (TPU VM worker) runs the same
# command; an example to adapt. Size the job first, on any machine (v5p: 95 GB per chip):
#
#   python -m launch.plan --config=configs/deepseek_v3_671b.py --devices=1024 --backend=tpu \
#       --device_memory_gb=95 $MESH_FLAGS
#
# Run the plan for your slice and pass the mesh it fits with as MESH_FLAGS (e.g. more devices on
# `data`, or more microbatches): the config's default layout (expert 64, fsdp over data) is sized
# for 141 GB GPUs. The TPU Pallas kernels are tested in interpret mode only.
#
#   TPU=my-v5p-4096 ZONE=us-east5-a bash launch/tpu_pod_example.sh setup   # copy + install
#   TPU=my-v5p-4096 ZONE=us-east5-a bash launch/tpu_pod_example.sh train
#
# launch.train --distributed=on calls jax.distributed.initialize() on every host; JAX reads the
# slice's hosts and this host's index from the TPU metadata server. The workdir must be a
# filesystem every host mounts (a Filestore share, or a bucket mounted with gcsfuse): all hosts
# write their shards of each orbax checkpoint into it. For a run of days, start the command
# under nohup or tmux on the workers rather than holding the ssh session.

set -euo pipefail

TPU=${TPU:?set TPU to the name of the TPU VM (the pod slice)}
ZONE=${ZONE:?set ZONE to the TPU zone}
REMOTE=${REMOTE:-dsv3-jax}                 # checkout directory on every worker
WORKDIR=${WORKDIR:-/mnt/shared/runs/dsv3-671b}
DATA=${DATA:-/mnt/shared/data/corpus.npy}
MESH_FLAGS=${MESH_FLAGS:-""}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-train}" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
      "$(dirname "$0")/.." "$TPU:$REMOTE"
    on_all_workers "cd $REMOTE && python3.12 -m venv .venv && .venv/bin/pip install -e '.[tpu]'"
    ;;
  train)
    on_all_workers "cd $REMOTE && .venv/bin/python -m launch.train \
      --config=configs/deepseek_v3_671b.py --workdir=$WORKDIR --distributed=on \
      --config.data.path=$DATA $MESH_FLAGS"
    ;;
  *)
    echo "usage: TPU=... ZONE=... $0 setup|train" >&2
    exit 2
    ;;
esac
