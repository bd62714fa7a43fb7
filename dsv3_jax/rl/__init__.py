"""Reinforcement learning with GRPO (the DeepSeek-R1 step): the objective (`loss`), rewards
(`rewards`), prompts and the built-in task (`prompts`), the GRPO settings (`spec`), rollouts and
the jitted update (`step`) and the run (`loop`, what `python -m launch.grpo` calls).

Sits above training and generation: imports `dsv3_jax.train` (the trainer's state, optimizer,
checkpointer, metrics writer, mesh and run spec), `dsv3_jax.infer` (rollouts are
`generate` calls on the latent cache), the model, `dsv3_jax.parallel`, `dsv3_jax.checkpoints`,
`dsv3_jax.config` and `dsv3_jax.tokenizer`. Nothing below imports it.
"""
