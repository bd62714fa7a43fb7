"""Reinforcement learning with GRPO (the DeepSeek-R1 step) on a DeepSeek-V3 model.

  python -m launch.grpo --config=configs/grpo_tiny.py --workdir=runs/grpo_tiny
  python -m launch.grpo --config=configs/grpo_tiny.py --workdir=runs/rl \
      --config.init_from=runs/sft --config.grpo.prompts=prompts.jsonl \
      --config.grpo.rewards='(("exact_match", 1.0), ("format", 0.5))'

Any config field can be overridden (--config.grpo.beta=0.0); the grpo fields are in
configs/base.py. Re-running the same command resumes from the latest checkpoint.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dsv3_jax.rl import loop as grpo_loop
from dsv3_jax.train import loop as train_loop
from dsv3_jax.train.checkpointer import CheckpointWriteError
from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "GRPO config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    logging.getLogger("dsv3_jax").setLevel(logging.INFO)
    try:
        grpo_loop.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, train_loop.NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli.run(main, _CONFIG)
