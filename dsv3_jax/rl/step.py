"""Rollouts and the GRPO update.

Legend: N sequences of a rollout batch (prompts x G), S = seq_len tokens per sequence (prompt,
response, padding), V vocab, D model dim.

A rollout batch is N = batch_size sequences: each prompt G times, sampled by
`dsv3_jax.infer.generate` (batched, on the latent cache) with the sampling policy's
log-probabilities recorded, then scored and laid out for the update as
  tokens [N, S], segment_ids [N, S] (1 on prompt + response, 0 on padding),
  mask [N, S-1] (1 where the position's next token is a response token of a sample with a
  finite reward; the EOS that stopped a sample included), old_logp / ref_logp [N, S-1],
  advantages [N].
The update runs the training forward pass over whole sequences and takes log softmax(logits /
temperature) at the response tokens: the quantity the sampler recorded, so the first inner
update's ratio is 1 up to the two code paths' rounding (tests/test_grpo_sampling.py). The
optimizer step is the trainer's own (`Trainer.update`: microbatch accumulation, ZeRO-2 gradient
layout, non-finite skip), given the GRPO loss of one piece of the batch, each piece's sums
divided by the whole batch's counts, so the step is the whole batch's.

MoE during RL: the router bias stays as it was (by default; `update_router_bias` applies the
trainer's balance rule to the update's expert loads), and the MTP loss is off (by default;
`mtp_weight` adds lambda * the MTP cross-entropy over prompt and response tokens). The
sequence-wise balance loss is not part of the objective.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dsv3_jax.infer.generate import generate
from dsv3_jax.model import api
from dsv3_jax.model.transformer import cast_matmul_weights, head_logits
from dsv3_jax.parallel.sharding import Parallel
from dsv3_jax.rl import loss, prompts, rewards
from dsv3_jax.rl.spec import GRPOSpec
from dsv3_jax.train import objective
from dsv3_jax.train.step import Trainer, TrainState

# Tokens (rows x positions) per chunk of the head: the [N, S, V] logits never exist whole (4096
# tokens of a 129280-token vocabulary are 2 GB of fp32 logits).
LOGPROB_TOKENS = 4096


@dataclasses.dataclass
class Rollout:
    """One scored rollout batch: host arrays for the update, and what the metrics report."""

    batch: dict[str, np.ndarray]
    records: list[dict]  # N, one per sequence
    completions: list[str]  # N
    scored: rewards.Scored
    response_lengths: np.ndarray  # [N] tokens, the stopping EOS included
    new_tokens: int
    seconds: float  # generation (prefill + decode) without compilation
    compile_seconds: float


def rollout(trainer: Trainer, state: TrainState, spec: GRPOSpec, tokenizer,
            records: Sequence[dict], seed: int) -> Rollout:
    """Sample G completions per record with the current policy, score them, lay them out."""
    G, S = spec.group_size, spec.seq_len
    rows = [r for r in records for _ in range(G)]
    prompt_ids = []
    for record in records:
        ids = tokenizer.encode(prompts.render(spec.template, record, spec.prompt_field))
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
        if len(ids) + spec.max_new_tokens > S:
            raise ValueError(f"prompt {record[spec.prompt_field]!r} takes {len(ids)} tokens; "
                             f"with grpo.max_new_tokens={spec.max_new_tokens} it needs seq_len "
                             f">= {len(ids) + spec.max_new_tokens} (seq_len={S})")
        prompt_ids += [ids] * G
    out = generate(trainer.model, {"params": state.params, "router_bias": state.router_bias},
                   prompt_ids, max_new_tokens=spec.max_new_tokens,
                   temperature=spec.temperature, top_p=spec.top_p, seed=seed,
                   eos_id=tokenizer.eos_id, cache_len=S)
    completions = [tokenizer.decode(t) for t in out.tokens]
    scored = rewards.score(spec.rewards, rows, completions, prompt_field=spec.prompt_field)
    advantages_n = loss.group_advantages(np.asarray(scored.totals), G, spec.scale_by_std)
    N = len(rows)
    batch = {"tokens": np.zeros((N, S), np.int32), "segment_ids": np.zeros((N, S), np.int32),
             "mask": np.zeros((N, S - 1), np.float32),
             "old_logp": np.zeros((N, S - 1), np.float32), "advantages": advantages_n}
    lengths = np.zeros(N, np.int32)
    for n, (ids, new, reason, logps) in enumerate(zip(prompt_ids, out.tokens,
                                                      out.finish_reasons, out.logprobs,
                                                      strict=True)):
        response = new + ([tokenizer.eos_id] if reason == "eos" else [])
        sequence = ids + response
        P, R = len(ids), len(response)
        batch["tokens"][n, :len(sequence)] = sequence
        batch["segment_ids"][n, :len(sequence)] = 1
        # Position p predicts token p + 1: the response tokens are predicted from P-1 .. P+R-2.
        batch["old_logp"][n, P - 1:P - 1 + R] = logps
        batch["mask"][n, P - 1:P - 1 + R] = float(np.isfinite(scored.totals[n]))
        lengths[n] = R
    return Rollout(batch, rows, completions, scored, lengths, out.stats.new_tokens,
                   out.stats.prefill_s + out.stats.decode_s, out.stats.compile_s)


class Updater:
    """The jitted policy log-probabilities and GRPO update around a `Trainer`: its model,
    optimizer, state, shardings and accumulate-and-apply step (`Trainer.update`), one train
    state for pre-training and RL."""

    def __init__(self, trainer: Trainer, spec: GRPOSpec):
        self.trainer, self.spec, self.model = trainer, spec, trainer.model
        self.logprobs = jax.jit(self._logprobs)
        self._compiled: dict[tuple, Callable] = {}
        if trainer.state_sharding is None:
            self.update = jax.jit(self._update, donate_argnums=0)
        else:
            replicated = NamedSharding(trainer.parallel.mesh, trainer.parallel.spec())
            self.update = jax.jit(self._update, donate_argnums=0,
                                  out_shardings=(trainer.state_sharding, replicated))

    def compiled(self, name: str, *args) -> tuple[Callable, float]:
        """(the program `name`, "update" or "logprobs", compiled for these arguments' shapes
        and layouts; the seconds compiling it took now: 0 when it was compiled before)."""
        key = (name, str(jax.tree.map(lambda a: (a.shape, a.dtype, getattr(a, "sharding", None)),
                                      args)))
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        self._compiled[key] = getattr(self, name).lower(*args).compile()
        return self._compiled[key], time.perf_counter() - t0

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays -> device arrays, rows over the batch axes of the mesh (if any)."""
        parallel = self.trainer.parallel
        if parallel is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {k: jax.device_put(v, NamedSharding(
            parallel.mesh, parallel.spec("batch", *([None] * (v.ndim - 1)))))
            for k, v in batch.items()}

    def _forward(self, params, router_bias, tokens_ns, segment_ids_ns):
        """(log p of each next token [N, S-1], entropy [N, S-1], the model output) of N rows."""
        parallel = self.trainer.parallel
        out = api.forward(self.model, {"params": params, "router_bias": router_bias},
                          tokens_ns, segment_ids_ns, return_hidden=True, parallel=parallel)
        logp, entropy = token_logprobs(params, out.hidden[:, :-1], tokens_ns[:, 1:],
                                       self.spec.temperature, parallel=parallel)
        return logp, entropy, out

    def _logprobs(self, params, router_bias, tokens_ns, segment_ids_ns):
        return self._forward(cast_matmul_weights(self.model, params), router_bias, tokens_ns,
                             segment_ids_ns)[0]

    def _update(self, state: TrainState, batch: dict[str, jax.Array]):
        """One optimizer step on the rollout batch through `Trainer.update`: accumulated over
        `microbatches` pieces (rows m, m+M, ...), each piece's sums divided by the whole
        batch's counts, so the gradient is the whole batch's; skipped when non-finite."""
        spec, trainer = self.spec, self.trainer
        mask_ns = batch["mask"]
        counts = {"tokens": mask_ns.sum(), "sequences": jnp.sum(mask_ns.sum(-1) > 0) * 1.0}
        if spec.mtp_weight:
            counts["mtp"] = mtp_counts(batch["tokens"], batch["segment_ids"],
                                       self.model.mtp_depth)
        bias_rate = None
        if spec.update_router_bias:
            tokens_seen = state.step.astype(jnp.float32) * trainer.tokens_per_step
            bias_rate = trainer.bias_rate(tokens_seen)

        def loss_fn(compute_params, piece):
            return self._piece_loss(compute_params, state.router_bias, piece, counts)

        new_state, metrics, _ = trainer.update(state, batch, loss_fn, bias_rate=bias_rate,
                                               combine=_combine_stats)
        return new_state, metrics

    def _piece_loss(self, compute_params, router_bias, piece, counts):
        """This piece's share of the whole batch's loss; (share, (stats shares, expert loads))."""
        spec = self.spec
        mask = piece["mask"]
        logp, entropy, out = self._forward(compute_params, router_bias, piece["tokens"],
                                           piece["segment_ids"])
        sums = loss.grpo_sums(logp, piece["old_logp"], piece.get("ref_logp"),
                              piece["advantages"], mask, epsilon=spec.epsilon,
                              epsilon_high=spec.epsilon_high, beta=spec.beta,
                              aggregation=spec.aggregation)
        value, stats = loss.normalized(sums, spec.aggregation, counts["tokens"],
                                       counts["sequences"])
        stats["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(counts["tokens"], 1.0)
        stats["policy_loss"] = value
        if spec.mtp_weight:
            stats["mtp_loss"] = mtp_loss(compute_params, out, piece["tokens"],
                                         piece["segment_ids"], counts["mtp"],
                                         self.trainer.parallel)
            value = value + spec.mtp_weight * stats["mtp_loss"]
        return value, (stats, objective.expert_loads(out.router_stats))


def _combine_stats(total: dict, this: dict) -> dict:
    """Pieces' stats add up (each is a share of the whole batch's), but for the largest
    |ratio - 1|, their max."""
    out = {k: total[k] + this[k] for k in total}
    out["ratio_max_deviation"] = jnp.maximum(total["ratio_max_deviation"],
                                             this["ratio_max_deviation"])
    return out


def token_logprobs(params, h_ntd: jax.Array, targets_nt: jax.Array, temperature: float,
                   chunk_tokens: int = LOGPROB_TOKENS, parallel: Parallel | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """(log softmax(head(h) / temperature)[target], the entropy of that distribution), fp32
    [N, T] each, in chunks of positions holding about chunk_tokens tokens; differentiated, each
    chunk's logits are recomputed rather than kept. The entropy carries no gradient (a
    metric). With a mesh it runs per device over the batch shards, as
    `objective.cross_entropy_sum` does, so the head's weight gradient is summed over devices
    once per call, not once per chunk."""
    if parallel is None:
        return _token_logprobs(params["head"], h_ntd, targets_nt, temperature, chunk_tokens)
    rows, replicated = parallel.spec("batch"), parallel.spec()

    def local(w_dv, h_, t_):
        return _token_logprobs(w_dv, h_, t_, temperature, chunk_tokens)

    # check_vma=False: the transpose sums the replicated head's per-device cotangents over the
    # batch axes (once, here), as in objective.cross_entropy_sum.
    return jax.shard_map(local, mesh=parallel.mesh, in_specs=(replicated, rows, rows),
                         out_specs=(rows, rows), check_vma=False)(
        params["head"], h_ntd, targets_nt)


def _token_logprobs(w_dv, h_ntd, targets_nt, temperature, chunk_tokens):
    N, T, _ = h_ntd.shape
    chunk = max(1, min(T, chunk_tokens // N))
    n = -(-T // chunk)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(h_ncd, t_nc):
        logp_ncv = jax.nn.log_softmax(head_logits({"head": w_dv}, h_ncd) / temperature,
                                      axis=-1)
        picked_nc = jnp.take_along_axis(logp_ncv, t_nc[..., None], axis=-1)[..., 0]
        p_ncv = jnp.exp(jax.lax.stop_gradient(logp_ncv))
        entropy_nc = -jnp.sum(p_ncv * jax.lax.stop_gradient(logp_ncv), axis=-1)
        return picked_nc, entropy_nc

    _, (logp, entropy) = jax.lax.scan(lambda c, xs: (c, one(*xs)), None,
                                      (objective.split_positions(h_ntd, chunk),
                                       objective.split_positions(targets_nt, chunk)))

    def unchunk(x):
        return x.swapaxes(0, 1).reshape(N, n * chunk)[:, :T]

    return unchunk(logp), unchunk(entropy)


def mtp_counts(tokens_ns, segment_ids_ns, depth: int) -> jax.Array:
    """[depth] target counts of each MTP depth over the whole batch (prompt and response)."""
    _, _, _, masks = _mtp_targets(tokens_ns, segment_ids_ns, depth)
    return jnp.stack([jnp.maximum(m.sum().astype(jnp.float32), 1.0) for m in masks[1:]])


def mtp_loss(params, out: api.ModelOutput, tokens_ns, segment_ids_ns,
             counts_d: jax.Array, parallel: Parallel | None = None) -> jax.Array:
    """Mean over depths of each MTP depth's cross-entropy per target token (the whole batch's
    counts_d), over the sequences' prompt and response tokens (as in pre-training, SPEC.md 6)."""
    depth = len(out.mtp_hidden)
    _, _, targets, masks = _mtp_targets(tokens_ns, segment_ids_ns, depth)
    total = jnp.zeros((), jnp.float32)
    for k, h in enumerate(out.mtp_hidden, start=1):
        total += objective.cross_entropy_sum(params, h, targets[k], masks[k],
                                             parallel=parallel) / counts_d[k - 1]
    return total / depth


def _mtp_targets(tokens_ns, segment_ids_ns, depth: int):
    # targets_and_masks reads windows of S + 1 tokens; the extra padding column is masked off.
    pad = [(0, 0), (0, 1)]
    return objective.targets_and_masks(jnp.pad(tokens_ns, pad), jnp.pad(segment_ids_ns, pad),
                                       depth)
