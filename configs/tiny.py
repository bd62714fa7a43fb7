"""The default job: a tiny DeepSeek-V3 learns the embedded corpus on CPU in a few minutes.

  python -m launch.train --config=configs/tiny.py --workdir=runs/tiny
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"
    c.steps = 300
    c.batch_size = 16
    c.seq_len = 128
    c.optimizer.schedule = (("linear", 30, 3e-3), ("cosine", 270, 3e-4))
    # A short run needs a faster bias update than the paper's 1e-3 to balance in 300 steps.
    c.objective.bias_rate = ((0, 1e-2),)
    c.checkpoint_every = 100
    c.eval_every = 100
    return c
