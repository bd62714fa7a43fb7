"""Moonlight-16B-A3B's architecture (Moonshot AI's DeepSeek-V3-style MoE: 27 layers, 64 experts,
top-6, 2 shared, no q_lora, no MTP) pre-trained at 4096 tokens on a TPU or GPU slice.

  python -m launch.compile --config=configs/moonlight_16b_a3b.py --topology=v5p-64
  python -m launch.train --config=configs/moonlight_16b_a3b.py --workdir=/shared/moonlight \
      --config.data.path=/data/corpus.npy

Batch 512 sequences of 4096 tokens (2.1M tokens per step), AdamW (Moonlight itself was trained
with Muon: not reproduced here), experts over 8 devices, data parallelism with fully sharded
parameters over the rest, full remat. 16B parameters with fp32 master weights and AdamW are
16 bytes each, 256 GB before activations: the smallest slices that hold it are in the README's
rent table.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "moonlight_16b_a3b"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.batch_size = 512
    c.microbatches = 4
    c.seq_len = 4096
    c.steps = 100000
    c.optimizer.schedule = (("linear", 2000, 4.2e-4), ("cosine", 98000, 4.2e-5))
    c.data.source = "tokens"  # a file from launch.prepare_data with Moonlight's tokenizer
    c.mesh.pipeline = 1
    c.mesh.expert = 8
    c.mesh.data = -1
    c.mesh.fsdp = True
    c.checkpoint_every = 1000
    c.eval_every = 1000
    return c
