#!/bin/bash
# DeepSeek-V3 671B on N nodes x 8 GPUs under SLURM: an example to adapt (partition, account,
# paths, environment modules). Size the job first, on any machine:
#
#   python -m launch.plan --config=configs/deepseek_v3_671b.py --devices=1024 $MESH_FLAGS
#
#   sbatch --nodes=128 launch/slurm_example.sh                 # 1024 GPUs, a process per node
#   PER_GPU=1 sbatch --nodes=128 launch/slurm_example.sh       # a process per GPU instead
#
# Every task runs the same command. launch.train's --distributed=auto (the default) sees an srun
# step with more than one task and calls jax.distributed.initialize(), which takes the
# coordinator (the step's first node), the process count and this task's index from SLURM's
# variables. With a process per node each process drives the node's 8 GPUs; with a process per
# GPU, JAX gives each task GPU number SLURM_LOCALID, so every task must see all GPUs of its node
# (no --gpus-per-task binding). The workdir must be a filesystem every node mounts: all
# processes write their shards of each orbax checkpoint into it.
#
#SBATCH --job-name=dsv3-671b
#SBATCH --nodes=128
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

REPO=${REPO:-$SLURM_SUBMIT_DIR}            # this checkout, on a shared filesystem
PYTHON=${PYTHON:-$REPO/.venv/bin/python}  # pip install -e '.[cuda]'
WORKDIR=${WORKDIR:-/shared/runs/dsv3-671b}
DATA=${DATA:-/shared/data/corpus.npy}     # python -m launch.prepare_data (DeepSeek-V3 tokenizer)
# The config's mesh: 64-way expert parallelism, data parallelism over the rest (16 at 1024 GPUs)
# with fully sharded parameters; 15360 sequences of 4096 tokens per step in 15 microbatches of
# 1024, one sequence per GPU (README, "Parallelism and clusters"). Other layouts: MESH_FLAGS.
MESH_FLAGS=${MESH_FLAGS:-""}

if [ "${PER_GPU:-0}" = 1 ]; then
  TASKS_PER_NODE=8
else
  TASKS_PER_NODE=1
fi

cd "$REPO"
# shellcheck disable=SC2086  # MESH_FLAGS is a list of flags
srun --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node=8 --kill-on-bad-exit=1 \
  "$PYTHON" -m launch.train --config=configs/deepseek_v3_671b.py --workdir="$WORKDIR" \
  --config.data.path="$DATA" $MESH_FLAGS
