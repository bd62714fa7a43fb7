"""The GRPO part of a run, built and validated once from `cfg.grpo` (beside the trainer's
`RunSpec`, which covers the model, optimizer, mesh and schedule of the same config).

The trainer's fields keep their meaning where GRPO has one: `batch_size` is the sequences of one
rollout batch (batch_size / group_size prompts, group_size samples each), `seq_len` the tokens
of one sequence, prompt and response together (so prompts may take seq_len - max_new_tokens
tokens), `microbatches` the pieces each update accumulates its gradient over, `steps` the
rollout batches, `optimizer` the updates, `objective.bias_rate` the router bias rate when
`update_router_bias` is on.
"""

from __future__ import annotations

import dataclasses

from ml_collections import config_dict

from dsv3_jax import checkpoints
from dsv3_jax.config import ModelConfig
from dsv3_jax.rl import loss, prompts, rewards
from dsv3_jax.tokenizer import HFTokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
    group_size: int  # G samples per prompt
    prompts_per_batch: int  # batch_size / G
    seq_len: int  # prompt + response tokens
    max_new_tokens: int
    temperature: float
    top_p: float
    updates_per_batch: int  # inner updates on each rollout batch (0: rollouts only, a control)
    epsilon: float
    epsilon_high: float
    beta: float  # KL weight; 0 needs no reference model
    scale_by_std: bool
    aggregation: str
    rewards: tuple[rewards.Reward, ...]
    prompts: str  # a built-in task or a .jsonl / .parquet path
    prompt_field: str
    template: str
    update_router_bias: bool
    mtp_weight: float
    recompute_old_logprobs: bool

    @classmethod
    def from_config(cls, cfg: config_dict.ConfigDict, model: ModelConfig,
                    processes: int = 1) -> GRPOSpec:
        """ValueError naming the field for anything GRPO cannot run (before any compile)."""
        g = cfg.grpo
        _check(cfg, model, processes)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.init_from:
            _check_tokenizer(cfg.data.tokenizer, tokenizer, cfg.init_from)
        need(tokenizer.vocab_size <= model.vocab_size,
             f"data.tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
             f"vocab_size={model.vocab_size}")
        _check_prompts(g, tokenizer, cfg.seq_len - g.max_new_tokens)
        return cls(
            group_size=g.group_size, prompts_per_batch=cfg.batch_size // g.group_size,
            seq_len=cfg.seq_len, max_new_tokens=g.max_new_tokens,
            temperature=float(g.temperature), top_p=float(g.top_p),
            updates_per_batch=g.updates_per_batch, epsilon=float(g.epsilon),
            epsilon_high=float(g.epsilon_high), beta=float(g.beta),
            scale_by_std=bool(g.scale_by_std), aggregation=g.aggregation,
            rewards=rewards.resolve(g.rewards, g.max_new_tokens), prompts=g.prompts,
            prompt_field=g.prompt_field, template=g.template,
            update_router_bias=bool(g.update_router_bias), mtp_weight=float(g.mtp_weight),
            recompute_old_logprobs=bool(g.recompute_old_logprobs))


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"config: {msg}")


def _check(cfg: config_dict.ConfigDict, model: ModelConfig, processes: int) -> None:
    g = cfg.grpo
    need(isinstance(g.group_size, int) and g.group_size >= 2,
         f"grpo.group_size={g.group_size!r} must be an integer >= 2: advantages compare the "
         "samples of one prompt with each other")
    need(cfg.batch_size % g.group_size == 0,
         f"batch_size={cfg.batch_size} (sequences per rollout batch) must be a multiple of "
         f"grpo.group_size={g.group_size}; e.g. batch_size="
         f"{g.group_size * max(1, cfg.batch_size // g.group_size)}")
    need(isinstance(g.max_new_tokens, int) and 1 <= g.max_new_tokens < cfg.seq_len,
         f"grpo.max_new_tokens={g.max_new_tokens!r} must be an integer in [1, seq_len="
         f"{cfg.seq_len}): seq_len holds the prompt and the response")
    need(g.temperature > 0, f"grpo.temperature={g.temperature} must be > 0: greedy rollouts "
         "give every sample of a group the same answer")
    need(0 < g.top_p <= 1, f"grpo.top_p={g.top_p} must lie in (0, 1]")
    need(isinstance(g.updates_per_batch, int) and g.updates_per_batch >= 0,
         f"grpo.updates_per_batch={g.updates_per_batch!r} must be an integer >= 0 (0: "
         "rollouts only)")
    need(0 < g.epsilon < 1, f"grpo.epsilon={g.epsilon} must lie in (0, 1): the ratio is "
         "clipped below at 1 - epsilon (e.g. 0.2)")
    need(g.epsilon_high > 0, f"grpo.epsilon_high={g.epsilon_high} must be > 0 (the upper clip "
         "range; = epsilon for symmetric clipping, 0.28 in DAPO)")
    need(g.beta >= 0, f"grpo.beta={g.beta} must be >= 0 (the KL weight; 0: no reference)")
    need(g.aggregation in loss.AGGREGATIONS,
         f"grpo.aggregation={g.aggregation!r} is not one of {', '.join(loss.AGGREGATIONS)}")
    need(g.mtp_weight >= 0, f"grpo.mtp_weight={g.mtp_weight} must be >= 0")
    need(g.mtp_weight == 0 or model.mtp_depth > 0,
         f"grpo.mtp_weight={g.mtp_weight} needs an MTP module; this model has mtp_depth=0")
    need(processes == 1, f"GRPO runs in one process for now ({processes} processes started)")
    try:
        prompts.template_text(g.template)
    except ValueError as e:
        need(False, str(e))


def _check_prompts(g: config_dict.ConfigDict, tokenizer, budget: int) -> None:
    """Every prompt renders with the template and fits seq_len - max_new_tokens tokens (the
    built-in task: a sample of its problems)."""
    try:
        if g.prompts in prompts.BUILT_IN_TASKS:
            records = prompts.Prompts(g.prompts, g.prompt_field, seed=0).next_batch(64)
        else:
            records = prompts.read_records(g.prompts, g.prompt_field)
    except ValueError as e:
        need(False, str(e))
    for i, record in enumerate(records):
        try:
            text = prompts.render(g.template, record, g.prompt_field)
        except (KeyError, IndexError, ValueError) as e:
            need(False, f"grpo.template={g.template!r} cannot be filled from record {i} "
                 f"({type(e).__name__}: {e}); its fields: {sorted(record)}")
        n = len(tokenizer.encode(text)) + (tokenizer.bos_id is not None)
        need(n <= budget, f"grpo.prompts record {i} takes {n} tokens with the template; "
             f"seq_len - grpo.max_new_tokens leaves {budget}: raise seq_len or shorten it")


def _check_tokenizer(configured: str, tokenizer, init_from: str) -> None:
    """data.tokenizer must be the one init_from's checkpoint records (the same byte-level
    tokenizer, or a tokenizer.json with the same contents); a checkpoint recording none (trained
    on token ids) is taken as it is."""
    meta, meta_dir = checkpoints.read_meta(init_from)
    recorded = checkpoints.recorded_tokenizer(meta.get("tokenizer"), meta_dir)
    if recorded is None:
        return
    same = type(recorded) is type(tokenizer)
    if same and isinstance(tokenizer, HFTokenizer):
        with open(recorded.path, "rb") as a, open(tokenizer.path, "rb") as b:
            same = a.read() == b.read()
    recorded_name = getattr(recorded, "path", "bytes")
    need(same, f"data.tokenizer={configured!r} is not the tokenizer init_from={init_from!r} was "
         f"trained with ({recorded_name!r}, recorded in {meta_dir}); pass "
         f"--config.data.tokenizer={recorded_name}")
