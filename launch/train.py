"""Train a DeepSeek-V3 model.

  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny
  python -m launch.train --config=configs/small.py --workdir=runs/small --config.steps=2000

Any config field can be overridden: --config.FIELD=VALUE (e.g. --config.model.dim=128,
--config.data.path=corpus/). Re-running the same command resumes from the latest checkpoint.
On a cluster every host runs the same command; --distributed (auto by default) connects the
processes through jax.distributed (launch/distributed.py).
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dsv3_jax.train import loop as train_loop
from dsv3_jax.train.checkpointer import CheckpointWriteError
from launch import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "auto: jax.distributed.initialize() when the environment shows a multi-process cluster "
    "(SLURM, Open MPI, Cloud TPU pod, Kubernetes indexed Job, JAX_COORDINATOR_ADDRESS); "
    "on: always; off: never.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain are chatty at INFO
    logging.getLogger("dsv3_jax").setLevel(logging.INFO)
    try:
        distributed.maybe_initialize(_DISTRIBUTED.value)  # before anything touches a device
        train_loop.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, train_loop.NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli.run(main, _CONFIG)
