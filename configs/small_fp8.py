"""`small` with DeepSeek-V3's FP8 recipe (model.fp8="blockwise", dsv3_jax/model/fp8.py): E4M3
GEMMs with 1x128 activation tiles and 128x128 weight blocks in the attention projections and the
dense, shared and routed experts; everything else as configs/small.py.

  python -m launch.train --config=configs/small_fp8.py --workdir=runs/small_fp8

On the H200 the routed experts' forward and input-gradient GEMMs run on the FP8 kernel when
model.moe_impl resolves to "pallas_gpu"; the other FP8 GEMMs run as quantize-dequantize
emulation (logged at start-up), so this config checks the recipe's loss, not yet its speed.
"""

from configs import small


def get_config():
    c = small.get_config()
    c.model.fp8 = "blockwise"
    return c
