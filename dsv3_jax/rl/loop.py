"""The GRPO run: `run(cfg, workdir)` is what `python -m launch.grpo` calls.

Each step: the next prompts -> G rollouts each with the current policy (sampling seed from
(seed, step)) -> rewards and group advantages -> the reference model's log-probs (beta > 0) ->
`updates_per_batch` updates on that batch -> metrics. It shares the trainer's pieces: the run
spec and mesh, the train state and optimizer (`Trainer`), the checkpointer (the prompt
iterator's position is the checkpoint's data item; the sampling keys follow from the seed and
the step, both in the checkpoint), metrics.jsonl and TensorBoard (`MetricsWriter`), the
progress bar, SIGTERM handling and the workdir lock. A run killed at any point and started
again with the same command continues from its latest checkpoint and logs the same metrics as
an uninterrupted run.

The reference model is the run's starting params and router bias, frozen (init_from's, else
the seed's initial ones, made by the trainer's init), rebuilt on resume rather than stored in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from dsv3_jax.checkpoints import load_variables
from dsv3_jax.rl import rewards as reward_fns
from dsv3_jax.rl.prompts import Prompts
from dsv3_jax.rl.spec import GRPOSpec
from dsv3_jax.rl.step import Rollout, Updater, rollout
from dsv3_jax.tokenizer import load_tokenizer
from dsv3_jax.train import loop as train_loop
from dsv3_jax.train import workdir as workdirs
from dsv3_jax.train.checkpointer import Checkpointer
from dsv3_jax.train.run_spec import RunSpec
from dsv3_jax.train.step import Trainer

log = logging.getLogger("dsv3_jax.rl")
say = train_loop.say


def run(cfg: config_dict.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """GRPO until cfg.steps rollout batches; resume from the latest good checkpoint in workdir.
    Returns the last step's metrics. Config, workdir and prompts are checked before anything is
    compiled or the workdir created."""
    spec = RunSpec.from_config(cfg, devices=jax.device_count(), backend=jax.default_backend(),
                               processes=jax.process_count())
    grpo = GRPOSpec.from_config(cfg, spec.model, jax.process_count())
    if spec.run.init_from and not os.path.isdir(spec.run.init_from):
        raise ValueError(f"config: init_from={spec.run.init_from!r} is not a directory")
    workdirs.check_writable(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = workdirs.WorkdirLock(workdir).acquire()
    try:
        return _run(spec, grpo, load_tokenizer(cfg.data.tokenizer), workdir, progress)
    finally:
        lock.release()


def _run(spec: RunSpec, grpo: GRPOSpec, tokenizer, workdir: str, progress: bool):
    began = time.perf_counter()
    run = spec.run
    parallel = train_loop.parallel_layout(spec.mesh)
    trainer = Trainer(spec.model, spec.hyper, parallel)
    updater = Updater(trainer, grpo)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
    meta = {"model": dataclasses.asdict(spec.model), "config": spec.config,
            "tokenizer": tokenizer.to_json()}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    prompts = Prompts(grpo.prompts, grpo.prompt_field, run.seed)
    start, state = train_loop.starting_state(trainer, checkpoints, prompts, run)
    reference = reference_variables(trainer, run) if grpo.beta else None
    if grpo.beta and not run.init_from:
        log.warning("grpo.beta=%g with no init_from: the KL reference is this run's random "
                    "initial weights (set grpo.beta=0 for RL from scratch)", grpo.beta)
    train_loop.say_start_up(trainer, grpo.seq_len, parallel, start, run.steps)
    say(f"GRPO: {grpo.prompts_per_batch} prompts x {grpo.group_size} samples per step, "
        f"{grpo.updates_per_batch} update(s) each; rewards "
        f"{', '.join(f'{r.weight:g} x {r.name}' for r in grpo.rewards)}")
    writer = train_loop.MetricsWriter.continuing(workdir, start)
    preemption = train_loop.Preemption(1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=run.steps, initial=start, unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    last: dict[str, Any] = {}

    def save(step):
        checkpoints.save(step, state, prompts.get_state(), meta)

    try:
        for step in range(start + 1, run.steps + 1):
            t0 = time.perf_counter()
            records = prompts.next_batch(grpo.prompts_per_batch)
            batch = rollout(trainer, state, grpo, tokenizer, records, sampling_seed(run.seed,
                                                                                    step))
            state, update = rl_update(updater, state, batch, reference)
            if update.metrics.get("nonfinite_in_a_row", 0) >= run.max_nonfinite_steps:
                train_loop.check_finite(step, update.metrics, run.max_nonfinite_steps,
                                        checkpoints)  # raises NonFiniteError
            last = step_record(step, batch, update, time.perf_counter() - t0)
            if step % run.log_every == 0 or step == run.steps:
                writer.write(last)
            if bar is not None:
                bar.set_postfix({"reward": f"{last['reward_mean']:.3f}",
                                 "kl": f"{last.get('kl', 0):.4f}",
                                 "tok/s": f"{last['rollout_tokens_per_sec']:,.0f}"})
                bar.update(1)
            if step % run.checkpoint_every == 0 or step == run.steps:
                save(step)
            if preemption.reached(step):
                if step % run.checkpoint_every and step != run.steps:
                    save(step)
                say(f"stopped by SIGTERM: checkpoint saved at step {step}")
                break
        checkpoints.wait()
        say(summary(last, checkpoints, time.perf_counter() - began))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        checkpoints.close()
        preemption.close()
    return last


def sampling_seed(seed: int, step: int) -> int:
    """The sampling key of a step's rollouts: a function of the run's seed and the step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def reference_variables(trainer: Trainer, run) -> dict[str, Any]:
    """The frozen reference: the run's starting params and router bias together (init_from's,
    else the seed's initial ones), made and laid out by the trainer as the state's are."""
    if run.init_from:
        abstract = trainer.abstract_state()
        variables, _ = load_variables(
            run.init_from, {"params": abstract.params, "router_bias": abstract.router_bias})
        return variables
    return trainer.init_variables(jax.random.key(run.seed))


@dataclasses.dataclass
class Update:
    metrics: dict[str, Any]  # the last inner update's (ratio_max_deviation: the first one's)
    seconds: float  # without compilation
    compile_seconds: float


def rl_update(updater: Updater, state, batch: Rollout, reference) -> tuple[Any, Update]:
    """The reference log-probs (`reference`: its params and router bias, or None), then
    updates_per_batch updates on the rollout batch; the programs' first compile is timed
    apart."""
    grpo = updater.spec
    t0 = time.perf_counter()
    placed = updater.place(batch.batch)
    tokens, seg = placed["tokens"], placed["segment_ids"]
    compile_s = 0.0
    if reference is not None or grpo.recompute_old_logprobs:
        logprobs, compile_s = updater.compiled("logprobs", state.params, state.router_bias,
                                               tokens, seg)
        if reference is not None:
            placed["ref_logp"] = logprobs(reference["params"], reference["router_bias"],
                                          tokens, seg)
        if grpo.recompute_old_logprobs:
            placed["old_logp"] = logprobs(state.params, state.router_bias, tokens, seg)
    metrics: dict[str, Any] = {}
    first_deviation = None
    for _ in range(grpo.updates_per_batch):
        update, seconds = updater.compiled("update", state, placed)
        compile_s += seconds
        state, out = update(state, placed)
        out = train_loop.to_host(out)
        if first_deviation is None:
            first_deviation = out["ratio_max_deviation"]
        if not out["finite"]:
            say(f"non-finite GRPO loss {out['loss']} / gradient norm {out['grad_norm']}; update "
                f"skipped ({out['nonfinite_in_a_row']} in a row)")
        metrics = out
    if first_deviation is not None:
        metrics["ratio_max_deviation"] = first_deviation
    jax.block_until_ready(state.params)
    return state, Update(metrics, time.perf_counter() - t0 - compile_s, compile_s)


def step_record(step: int, batch: Rollout, update: Update, seconds: float) -> dict[str, Any]:
    """The metrics of one step: rewards (total and per function), task accuracy, the update's
    loss terms, response lengths, throughput and times."""
    totals = np.asarray(batch.scored.totals, np.float64)
    finite = totals[np.isfinite(totals)]
    record: dict[str, Any] = {
        "step": step,
        "reward_mean": float(finite.mean()) if finite.size else math.nan,
        "reward_std": float(finite.std()) if finite.size else math.nan,
        "reward_failures": batch.scored.failures,
    }
    for name, values in batch.scored.per_reward.items():
        values = np.asarray(values, np.float64)
        record[f"reward/{name}"] = (float(values[np.isfinite(values)].mean())
                                    if np.isfinite(values).any() else math.nan)
    if all("answer" in r for r in batch.records):
        record["accuracy"] = float(np.mean([reward_fns.exact_match(r, c) for r, c in
                                            zip(batch.records, batch.completions,
                                                strict=True)]))
    record.update({k: v for k, v in update.metrics.items()
                   if k not in ("finite", "nonfinite_in_a_row")})
    rollout_s = max(batch.seconds, 1e-9)
    record.update({
        "response_length": float(batch.response_lengths.mean()),
        "rollout_tokens": batch.new_tokens,
        "rollout_tokens_per_sec": batch.new_tokens / rollout_s,
        "rollout_time": batch.seconds, "rollout_compile_time": batch.compile_seconds,
        "update_time": update.seconds, "update_compile_time": update.compile_seconds,
        "step_time": seconds,
    })
    return record


def summary(last: dict, checkpoints: Checkpointer, seconds: float) -> str:
    if not last:
        return "no step was run (the run had already reached config.steps)"
    steps = checkpoints.steps()
    text = (f"done: step {last['step']}, reward {last['reward_mean']:.3f}"
            + (f", accuracy {last['accuracy']:.3f}" if "accuracy" in last else "")
            + f"; wall time {time.strftime('%H:%M:%S', time.gmtime(seconds))}; latest "
            f"checkpoint "
            f"{os.path.join(checkpoints.directory, str(steps[-1])) if steps else 'none'}")
    return text
