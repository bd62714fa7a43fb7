"""Training: data (`data`), the objective (`objective`), the optimizer and its schedules
(`optim`), the jitted step (`step`), the run with progress, evals and checkpoints (`loop`), the
trainer's checkpoint manager (`checkpointer`) and the workdir's lock and metrics (`workdir`).

Imports the model, `dsv3_jax.parallel`, `dsv3_jax.config` and `dsv3_jax.tokenizer`; never
generation or conversion.
"""
