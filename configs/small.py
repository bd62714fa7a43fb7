"""The `small` model (about 2B parameters, DeepSeek-V3 proportions) on one H200.

  python -m launch.train --config=configs/small.py --workdir=runs/small
  python -m launch.train --config=configs/small.py --workdir=runs/small \
      --config.data.path='corpus/*.jsonl' --config.data.tokenizer=tokenizer.json
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "small"
    # The fastest measured on one H200 (benchmarks/RESULTS.md, 2026-11-29): 45.2% MFU at 86 GB,
    # vs 43.7% with "save_dots_no_batch" (75.6 GB) in the same run.
    c.model.remat = "save_kernels"
    c.steps = 20000
    c.batch_size = 32
    c.microbatches = 4
    c.seq_len = 4096
    c.optimizer.schedule = (("linear", 500, 4.2e-4), ("constant", 12500, 4.2e-4),
                            ("cosine", 7000, 4.2e-5))
    c.checkpoint_every = 1000
    c.eval_every = 1000
    c.log_every = 10
    return c
