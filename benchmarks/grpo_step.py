"""One GRPO step on one accelerator: rollout tokens/s beside plain `generate` on the same batch,
update tokens/s and MFU, and the share of the step spent generating.

  python -m benchmarks.grpo_step --config=configs/small.py
  python -m benchmarks.grpo_step --config=configs/small.py --prompts=16 --group=8 \
      --prompt_len=256 --max_new_tokens=512 --microbatches=4 --steps=3

Random weights and synthetic prompts (random bytes) with no EOS in reach, so every sample runs
to max_new_tokens: the rollout is the worst case for its length. The update MFU counts the
trained tokens' FLOPs (dsv3_jax/model/flops.py, 6 x active parameters + attention, over whole
sequences, prompt and response) of the `updates` inner updates; the reference model's forward
pass (beta > 0) is timed with the update but not counted as useful FLOPs. update_s excludes
compilation. ratio_max_deviation is the first update's largest |exp(train logp - sampler
logp) - 1| over the response tokens: in bf16 it says whether grpo.recompute_old_logprobs is
needed (README, GRPO).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dsv3_jax.infer.generate import generate
from dsv3_jax.model import flops
from dsv3_jax.rl import loop as grpo_loop
from dsv3_jax.rl import step as rl_step
from dsv3_jax.rl.spec import GRPOSpec
from dsv3_jax.tokenizer import ByteTokenizer
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Model/run config.")
# 128 sequences of 768 tokens in 4 microbatches: 24.6K tokens a piece, beside the 32K of one
# microbatch of configs/small.py's train step.
_PROMPTS = flags.DEFINE_integer("prompts", 16, "Prompts per rollout batch.")
_GROUP = flags.DEFINE_integer("group", 8, "Samples per prompt (G).")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 4, "Pieces of the update's batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "Prompt tokens (BOS included).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512, "Response tokens per sample.")
_UPDATES = flags.DEFINE_integer("updates", 1, "Inner updates per rollout batch.")
_BETA = flags.DEFINE_float("beta", 0.04, "KL weight (> 0: the reference forward runs).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    cfg.unlock()
    cfg.batch_size = _PROMPTS.value * _GROUP.value
    cfg.seq_len = _PROMPT_LEN.value + _MAX_NEW.value
    cfg.microbatches = _MICROBATCHES.value
    cfg.grpo.group_size, cfg.grpo.max_new_tokens = _GROUP.value, _MAX_NEW.value
    cfg.grpo.updates_per_batch, cfg.grpo.beta = _UPDATES.value, _BETA.value
    cfg.grpo.recompute_old_logprobs = False  # the sampler's record: ratio_max_deviation below
    spec = RunSpec.from_config(cfg, devices=1, backend=jax.default_backend())
    grpo = GRPOSpec.from_config(cfg, spec.model)
    trainer = Trainer(spec.model, spec.hyper)
    updater = rl_step.Updater(trainer, grpo)
    state = trainer.init_state(jax.random.key(0))
    reference = trainer.init_variables(jax.random.key(0)) if grpo.beta else None
    tokenizer = NoEosTokenizer()
    rng = np.random.default_rng(0)
    records = [{"prompt": "".join(chr(c) for c in rng.integers(97, 123, _PROMPT_LEN.value - 1)),
                "answer": "0"} for _ in range(_PROMPTS.value)]

    times, deviations = [], []
    for i in range(_STEPS.value + 1):  # the first compiles
        t0 = time.perf_counter()
        batch = rl_step.rollout(trainer, state, grpo, tokenizer, records, seed=i)
        state, update = grpo_loop.rl_update(updater, state, batch, reference)
        times.append((batch.seconds, update.seconds, time.perf_counter() - t0,
                      batch.new_tokens))
        # The first inner update's largest |exp(train logp - sampler logp) - 1| over the
        # response tokens (recompute_old_logprobs is off here): how far the sampler (absorbed
        # attention on the latent cache) and the training forward (expanded form) disagree.
        deviations.append(float(update.metrics["ratio_max_deviation"]))
    rollout_s, update_s, step_s, new_tokens = np.mean(np.array(times[1:]), axis=0).tolist()

    prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(r["prompt"])] for r in records
                  for _ in range(_GROUP.value)]
    variables = {"params": state.params, "router_bias": state.router_bias}
    plain = []
    for i in range(_STEPS.value + 1):
        out = generate(trainer.model, variables, prompt_ids, max_new_tokens=_MAX_NEW.value,
                       temperature=1.0, seed=i, eos_id=None, cache_len=cfg.seq_len)
        plain.append(out.stats.tokens_per_s)

    trained_tokens = cfg.batch_size * cfg.seq_len * grpo.updates_per_batch
    update_tps = trained_tokens / update_s
    peak = flops.device_peak_flops()
    result = {
        "device": jax.devices()[0].device_kind, "batch": cfg.batch_size,
        "prompt_len": _PROMPT_LEN.value, "max_new_tokens": _MAX_NEW.value,
        "rollout_tokens_per_sec": new_tokens / rollout_s,
        "generate_tokens_per_sec": float(np.mean(plain[1:])),
        "update_tokens_per_sec": update_tps,
        "update_mfu": (update_tps * flops.train_flops_per_token(spec.model, cfg.seq_len) / peak
                       if peak else None),
        "model_dtype": spec.model.dtype, "ratio_max_deviation": deviations[0],
        "ratio_max_deviation_all_steps": max(deviations),
        "rollout_share": rollout_s / step_s, "step_s": step_s, "rollout_s": rollout_s,
        "update_s": update_s,
    }
    print(json.dumps(result))


class NoEosTokenizer(ByteTokenizer):
    """Bytes with an EOS id no sample reaches, so every sample runs to max_new_tokens."""

    eos_id = None


if __name__ == "__main__":
    app.run(main)
