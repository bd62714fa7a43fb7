"""The one base config every training config starts from (ml_collections, overridable from the
command line as --config.FIELD=VALUE, e.g. --config.steps=100 --config.model.dim=128)."""

from __future__ import annotations

import dataclasses

from ml_collections import config_dict

from dsv3_jax.config import ModelConfig


def model_fields() -> config_dict.ConfigDict:
    """`preset` plus one typed placeholder per ModelConfig field: unset fields keep the preset's
    value, set ones override it (--config.model.dim=128)."""
    types = {"int": int, "float": float, "str": str}
    fields = config_dict.ConfigDict()
    fields.preset = "tiny"
    for field in dataclasses.fields(ModelConfig):
        fields[field.name] = config_dict.placeholder(types[str(field.type)])
    return fields


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = model_fields()
    c.steps = 1000
    c.batch_size = 8  # sequences per optimizer step, global (all processes)
    c.microbatches = 1  # gradient accumulation: the batch is split into this many pieces
    c.seq_len = 128
    c.seed = 0
    c.init_from = ""  # an orbax checkpoint (trainer or launch.convert) to fine-tune from
    # Start from step 0 in a workdir whose every checkpoint failed to restore (else refused).
    c.allow_fresh_start = False

    c.data = config_dict.ConfigDict()
    c.data.source = "text"  # text | tokens | synthetic
    c.data.path = ""  # '' = the embedded corpus (the Python standard library's source)
    c.data.text_field = "text"  # .jsonl / .parquet field holding the document
    c.data.tokenizer = "bytes"  # 'bytes' or a path to a Hugging Face tokenizer.json
    c.data.eval_period = 50  # every eval_period-th window is held out for eval

    c.optimizer = config_dict.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.optimizer.start_lr = 0.0
    # AdamW's first and second moments: "float32" or "bfloat16" (DeepSeek-V3 section 3.3.3
    # keeps both in bf16; the update is still computed in fp32; halves the optimizer state).
    c.optimizer.moments_dtype = "float32"
    # (kind, steps, end_value) phases; kind in linear | constant | cosine (dsv3_jax.train.optim).
    c.optimizer.schedule = (("linear", 100, 3e-3), ("cosine", 900, 3e-4))

    c.objective = config_dict.ConfigDict()
    # Token-count schedules, ((from_tokens, value), ...): MTP weight lambda and bias rate gamma.
    c.objective.mtp_weight = ((0, 0.3), (10e12, 0.1))
    c.objective.bias_rate = ((0, 1e-3), (14.3e12, 0.0))
    c.objective.balance_alpha = 1e-4
    c.objective.max_nonfinite_steps = 3  # consecutive non-finite steps before the run stops

    c.mesh = config_dict.ConfigDict()
    c.mesh.pipeline = 1  # layer stages
    c.mesh.data = -1  # -1: the devices left
    c.mesh.expert = 1  # routed experts split over this many devices
    c.mesh.fsdp = False  # also shard parameters over `data` (optimizer state always is)
    c.mesh.capacity_factor = 1.25  # expert all-to-all rows per round / balanced load
    c.mesh.pipeline_schedule = "gpipe"  # gpipe | circular
    c.mesh.pipeline_microbatches = 4  # microbatches in flight through the stages
    c.mesh.pipeline_repeats = 2  # circular: times each microbatch goes round the stages

    # Reinforcement learning (python -m launch.grpo; dsv3_jax/rl). There batch_size is the
    # sequences of one rollout batch (batch_size / group_size prompts) and seq_len the prompt
    # and response tokens of one sequence.
    c.grpo = config_dict.ConfigDict()
    c.grpo.group_size = 8  # G samples per prompt (>= 2)
    c.grpo.max_new_tokens = 64
    c.grpo.temperature = 1.0  # > 0
    c.grpo.top_p = 1.0
    c.grpo.updates_per_batch = 1  # inner updates per rollout batch (0: rollouts only)
    c.grpo.epsilon = 0.2  # clip range below 1
    c.grpo.epsilon_high = 0.2  # clip range above 1 (DAPO's clip-higher: 0.28)
    c.grpo.beta = 0.04  # k3 KL weight to the frozen reference (the run's starting weights)
    c.grpo.scale_by_std = True  # False: advantages not divided by the group's std (Dr. GRPO)
    c.grpo.aggregation = "token"  # token | sequence (dsv3_jax/rl/loss.py)
    # ((built-in name or module:function, weight), ...); built-ins: exact_match, format,
    # length_penalty (dsv3_jax/rl/rewards.py).
    c.grpo.rewards = (("exact_match", 1.0),)
    c.grpo.prompts = "add"  # a built-in task (add) or a .jsonl / .parquet file of records
    c.grpo.prompt_field = "prompt"
    c.grpo.template = "plain"  # plain | r1_zero | a format string over the record's fields
    c.grpo.update_router_bias = False  # True: the balance rule runs on the rollouts' loads
    c.grpo.mtp_weight = 0.0  # > 0: add the MTP loss on the rollout sequences
    # True: the old log-probs come from a training forward pass before the updates (one extra
    # forward) instead of the sampler's record.
    c.grpo.recompute_old_logprobs = False

    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.eval_every = 200
    c.eval_batches = 4
    c.log_every = 10
    return c
