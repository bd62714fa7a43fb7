"""The train step: microbatched loss and gradients, AdamW, the bias update, non-finite skipping.

Legend: B sequences per step, M microbatches, T = seq_len, S = T + 1 window tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import api, implementations
from dsv3_jax.model.transformer import cast_matmul_weights
from dsv3_jax.parallel import pipeline, sharding
from dsv3_jax.parallel.sharding import Parallel
from dsv3_jax.train import objective, optim

# (compute params, one microbatch) -> (its share of the loss, (stats, expert loads)).
LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, tuple[Any, Any]]]
# (stats summed so far, this microbatch's) -> the combined stats.
Combine = Callable[[Any, Any], Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped non-finite steps included)
    params: Any
    router_bias: Any  # not trained: updated by the balance rule, no optimizer state
    opt_state: Any
    nonfinite: jax.Array  # int32: consecutive non-finite steps


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The static training settings the step needs (taken from the run config)."""

    batch_size: int
    microbatches: int
    seq_len: int
    schedule: tuple
    start_lr: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    mtp_weight: tuple
    bias_rate: tuple
    balance_alpha: float
    moments_dtype: str  # AdamW mu and nu (optim.MOMENTS_DTYPES)
    inject_nonfinite_steps: tuple = ()  # testing only: these steps' loss is made NaN


class Trainer:
    """Jitted init / train / eval steps; with a `parallel` layout every array is placed by the
    sharding rules (parameters, ZeRO-1 optimizer state, batch over data x expert).

    The implementations are chosen once, here, for `backend` (the default backend unless
    named: `launch.compile` builds a TPU trainer on a CPU host): `implementations` says what runs
    (its `describe()` is the start-up line) and `model` is the config resolved to it, which
    every step traces."""

    def __init__(self, model: ModelConfig, hyper: Hyper, parallel: Parallel | None = None,
                 backend: str | None = None):
        backend = backend or jax.default_backend()
        self.implementations = implementations.resolve(model, backend)
        self.model = implementations.resolved(model, backend)
        self.hyper, self.parallel = hyper, parallel
        self.lr = optim.piecewise_schedule(hyper.start_lr, hyper.schedule)
        self.tx = optim.adamw(self.lr, b1=hyper.b1, b2=hyper.b2, eps=hyper.eps,
                              weight_decay=hyper.weight_decay, clip_norm=hyper.clip_norm,
                              moments_dtype=hyper.moments_dtype)
        self.mtp_weight = optim.token_schedule(hyper.mtp_weight)
        self.bias_rate = optim.token_schedule(hyper.bias_rate)
        self.tokens_per_step = hyper.batch_size * hyper.seq_len
        if parallel is None:
            self.state_sharding = self.batch_sharding = self.grad_sharding = None
            self.init_state = jax.jit(self._init_state)
            self.init_variables = jax.jit(self._init_variables)
            self.state_from_variables = jax.jit(self._state_from_variables)
            self.train_step = jax.jit(self._train_step, donate_argnums=0)
            self.eval_step = jax.jit(self._eval_step)
            return
        mesh = parallel.mesh
        boxed = api.abstract_variables(self.model)
        var_sh = sharding.variable_shardings(boxed, mesh, parallel.fsdp)
        params = nn.meta.unbox(boxed)["params"]
        replicated = NamedSharding(mesh, parallel.spec())
        self.state_sharding = TrainState(
            step=replicated, params=var_sh["params"], router_bias=var_sh["router_bias"],
            opt_state=sharding.opt_state_shardings(self.tx, params, var_sh["params"]),
            nonfinite=replicated)
        # Gradients are accumulated split like the optimizer state (ZeRO-2): each microbatch's
        # partial sums are reduce-scattered rather than all-reduced, and the accumulator holds
        # 1/data of them.
        self.grad_sharding = jax.tree.map(lambda s, a: sharding.zero1(s, a.shape),
                                          var_sh["params"], params)
        rows = NamedSharding(mesh, parallel.spec("batch", None))
        self.batch_sharding = {"tokens": rows, "segment_ids": rows}
        self.init_state = jax.jit(self._init_state, out_shardings=self.state_sharding)
        self.init_variables = jax.jit(self._init_variables, out_shardings={
            "params": var_sh["params"], "router_bias": var_sh["router_bias"]})
        self.state_from_variables = jax.jit(self._state_from_variables,
                                            out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, replicated), donate_argnums=0)
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=replicated)

    # State -------------------------------------------------------------------------------------
    def _init_state(self, rng) -> TrainState:
        variables = api.init(self.model, rng)
        return self._state_from_variables(variables)

    def _init_variables(self, rng) -> dict[str, Any]:
        """The params and router bias `init_state` starts from (no optimizer state): a frozen
        copy of a run's initial weights, laid out like the state's."""
        state = self._init_state(rng)  # the optimizer state is not an output: XLA drops it
        return {"params": state.params, "router_bias": state.router_bias}

    def _state_from_variables(self, variables) -> TrainState:
        """A fresh state (step 0, new optimizer state) around given variables (fine-tuning)."""
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          router_bias=variables["router_bias"], opt_state=self.tx.init(params),
                          nonfinite=jnp.zeros((), jnp.int32))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and (with a layout) shardings of the state, for restoring."""
        abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        if self.state_sharding is None:
            return abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.state_sharding)

    def place_batch(self, batch: dict) -> dict:
        """Host arrays of this process's rows -> global arrays laid out for the step."""
        if self.batch_sharding is None:
            return batch
        return {k: jax.make_array_from_process_local_data(self.batch_sharding[k], v)
                for k, v in batch.items()}

    # Loss --------------------------------------------------------------------------------------
    def _loss_terms(self, params, router_bias, tokens_bs, segment_ids_bs, counts):
        """Sums over this (micro)batch divided by the WHOLE batch's counts."""
        cfg = self.model
        sums, router_stats = self._ce_sums(params, router_bias, tokens_bs, segment_ids_bs)
        ce = sums[0] / counts[0]
        mtp = jnp.zeros((), jnp.float32)
        for k in range(1, cfg.mtp_depth + 1):
            mtp += sums[k] / (counts[k] * cfg.mtp_depth)
        balance = objective.balance_loss_sum(cfg, router_stats) / self.hyper.batch_size
        return ce, mtp, balance, objective.expert_loads(router_stats)

    def _ce_sums(self, params, router_bias, tokens_bs, segment_ids_bs):
        """Per depth (0 = the main head, then each MTP depth): the summed cross-entropy over the
        masked targets; and the router statistics."""
        cfg = self.model
        inputs_bt, seg_bt, targets, masks = objective.targets_and_masks(
            tokens_bs, segment_ids_bs, cfg.mtp_depth)
        out = api.forward(cfg, {"params": params, "router_bias": router_bias}, inputs_bt,
                               seg_bt, return_hidden=True, parallel=self.parallel)
        with jax.named_scope("loss_head"):
            sums = [objective.cross_entropy_sum(params, h, targets[k], masks[k],
                                                parallel=self.parallel)
                    for k, h in enumerate([out.hidden, *out.mtp_hidden])]
        return sums, out.router_stats

    def _target_counts(self, tokens_bs, segment_ids_bs):
        _, _, _, masks = objective.targets_and_masks(tokens_bs, segment_ids_bs,
                                                     self.model.mtp_depth)
        return [jnp.maximum(m.sum().astype(jnp.float32), 1.0) for m in masks]

    # Step --------------------------------------------------------------------------------------
    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        h = self.hyper
        counts = self._target_counts(batch["tokens"], batch["segment_ids"])
        tokens_seen = state.step.astype(jnp.float32) * self.tokens_per_step
        lam, gamma = self.mtp_weight(tokens_seen), self.bias_rate(tokens_seen)

        def loss_fn(compute_params, mb):
            ce, mtp, bal, loads = self._loss_terms(compute_params, state.router_bias,
                                                   mb["tokens"], mb["segment_ids"], counts)
            loss = ce + lam * mtp + h.balance_alpha * bal
            return loss, ({"ce_loss": ce, "mtp_loss": mtp, "balance_loss": bal}, loads)

        new_state, metrics, loads = self.update(state, batch, loss_fn, bias_rate=gamma)
        metrics.update({"mtp_weight": lam, "bias_rate": gamma,
                        "expert_load": load_summary(loads, state.router_bias)})
        return new_state, metrics

    def update(self, state: TrainState, batch: dict[str, jax.Array], loss_fn: LossFn, *,
               bias_rate: jax.Array | None, combine: Combine | None = None
               ) -> tuple[TrainState, dict[str, jax.Array], Any]:
        """One optimizer step of `loss_fn` over `batch`, for any objective (pre-training here,
        GRPO in dsv3_jax/rl/step.py); traced inside a jitted step.

        `loss_fn(compute_params, microbatch) -> (loss, (stats, expert loads))` is one
        microbatch's share of the whole batch's loss (its sums divided by the whole batch's
        counts). Microbatch m takes rows m, m+M, ... of every array of `batch` (each device keeps
        a share of each); their losses, stats, loads and gradients are summed in a scan (stats
        by `combine(total, this)` when given, e.g. for a max), the gradients in the master
        weights' dtype and split like the optimizer state (ZeRO-2). Then AdamW, and the router
        bias rule on the summed loads at `bias_rate` (None: the bias stays), all kept only when
        the loss and gradient norm are finite (`hyper.inject_nonfinite_steps` poisons those
        steps' loss, for tests). Returns (new state, metrics: loss, the stats, grad_norm, lr,
        finite, nonfinite_in_a_row; the summed expert loads)."""
        h = self.hyper
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        # The matmul weights in the compute dtype once per step, not once per microbatch (their
        # gradients come back in that dtype and are summed in the master weights' fp32).
        compute_params = cast_matmul_weights(self.model, state.params)
        # [M, B / M, ...] for every array of the batch.
        microbatches = jax.tree.map(lambda x: pipeline.split_rows(x, h.microbatches), batch)

        def as_master(grads):
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            if self.grad_sharding is not None:
                grads = jax.lax.with_sharding_constraint(grads, self.grad_sharding)
            return grads

        def accumulate(acc, mb):
            (loss, (stats, loads)), grads = grad_fn(compute_params, mb)
            total = jax.tree.map(jnp.add, acc, (loss, (stats, loads), as_master(grads)))
            if combine is not None:
                total = (total[0], (combine(acc[1][0], stats), total[1][1]), total[2])
            return total, None

        (loss0, aux0), _ = jax.eval_shape(grad_fn, compute_params,
                                          jax.tree.map(lambda x: x[0], microbatches))
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss0, aux0, state.params))
        zeros = (*zeros[:2], as_master(zeros[2]))
        (loss, (stats, loads), grads), _ = jax.lax.scan(accumulate, zeros, microbatches)

        if h.inject_nonfinite_steps:
            poison = jnp.isin(state.step, jnp.asarray(h.inject_nonfinite_steps))
            loss = jnp.where(poison, jnp.nan, loss)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        router_bias = state.router_bias
        if bias_rate is not None:
            with jax.named_scope("bias_update"):
                router_bias = objective.update_bias(state.router_bias, loads, bias_rate)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            router_bias=keep_if_finite(router_bias, state.router_bias),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
        metrics = {"loss": loss, **stats, "grad_norm": grad_norm, "lr": self.lr(state.step),
                   "finite": finite, "nonfinite_in_a_row": new_state.nonfinite}
        return new_state, metrics, loads

    def _eval_step(self, state: TrainState, batch):
        """Per depth: summed cross-entropy and target count (`evaluate` divides the totals)."""
        tokens_bs, seg_bs = batch["tokens"], batch["segment_ids"]
        _, _, _, masks = objective.targets_and_masks(tokens_bs, seg_bs, self.model.mtp_depth)
        sums, _ = self._ce_sums(state.params, state.router_bias, tokens_bs, seg_bs)
        return {"ce_sums": jnp.stack(sums),
                "counts": jnp.stack([m.sum().astype(jnp.float32) for m in masks])}


def load_summary(loads: dict[str, Any], router_bias: dict[str, Any]) -> dict[str, jax.Array]:
    """Per MoE layer (main stack in order, then MTP depths): max/mean expert load and the bias
    spread (max - min)."""
    max_over_mean, spread = [], []
    for load, bias in zip(jax.tree.leaves(loads), jax.tree.leaves(router_bias), strict=True):
        load2 = load.reshape(-1, load.shape[-1])
        bias2 = bias.reshape(-1, bias.shape[-1])
        max_over_mean.append(load2.max(-1) / jnp.maximum(load2.mean(-1), 1e-9))
        spread.append(bias2.max(-1) - bias2.min(-1))
    return {"max_over_mean": _ordered(max_over_mean), "bias_spread": _ordered(spread)}


def _ordered(per_leaf: Sequence[jax.Array]) -> jax.Array:
    # tree leaves come sorted by key: "moe_layers" before "mtp_0", ... which is layer order.
    return jnp.concatenate(per_leaf)
