"""DeepSeek-V3 671B with the paper's recipe (section 4.2 of the technical report).

  python -m launch.train --config=configs/deepseek_v3_671b.py --workdir=/shared/run \
      --config.data.path=/data/corpus.npy          # on 1024 GPUs (launch/slurm_example.sh)

Batch 15360 sequences of 4096 tokens (62.9M tokens per step); learning rate 2.2e-4 after a 2K-step
warmup, constant to 10T tokens, cosine to 2.2e-5 over 4.3T, then 2.2e-5 for 333B and 7.3e-6 for
the last 167B tokens (14.8T in all); MTP weight 0.3 then 0.1 after 10T; bias rate 0.001 then 0
after 14.3T; balance alpha 1e-4; AdamW 0.9/0.95, decay 0.1, clip 1.0. Not reproduced here: the
batch-size ramp from 3072 over the first 469B tokens (this config trains at 15360 throughout),
FP8 GEMMs (bf16 compute with fp32 master weights instead), and the 16-stage DualPipe layout:
pipeline stages here must divide the 58 MoE layers (1, 2, 29 or 58), so the default layout is
expert parallelism over 64 devices with data parallelism and fully sharded parameters over the
rest. Every device takes whole sequences: 15360 sequences in 15 microbatches of 1024 fit 1024
devices (or any count dividing 1024); check a layout with `python -m launch.plan`.
"""

from configs import base

TOKENS_PER_STEP = 15360 * 4096


def steps(tokens: float) -> int:
    return round(tokens / TOKENS_PER_STEP)


def get_config():
    c = base.get_config()
    c.model.preset = "deepseek_v3_671b"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.batch_size = 15360
    c.microbatches = 15
    c.seq_len = 4096
    c.steps = steps(14.8e12)
    warmup = 2000
    c.optimizer.schedule = (
        ("linear", warmup, 2.2e-4),
        ("constant", steps(10e12) - warmup, 2.2e-4),
        ("cosine", steps(4.3e12), 2.2e-5),
        ("constant", steps(333e9), 2.2e-5),
        ("constant", steps(167e9), 7.3e-6),
    )
    c.objective.mtp_weight = ((0, 0.3), (10e12, 0.1))
    c.objective.bias_rate = ((0, 1e-3), (14.3e12, 0.0))
    c.objective.balance_alpha = 1e-4
    c.data.source = "tokens"  # a file from launch.prepare_data with the DeepSeek-V3 tokenizer
    c.mesh.pipeline = 1
    c.mesh.expert = 64
    c.mesh.data = -1
    c.mesh.fsdp = True
    c.checkpoint_every = 500
    c.eval_every = 1000
    return c
