"""Plot a run: loss curves and the expert-load heatmap of a training run, or the rewards,
KL, clipping, entropy, lengths and throughput of a GRPO run (launch.grpo), as PNG files in the
workdir.

  python -m launch.plot --workdir=runs/tiny
  python -m launch.plot --workdir=runs/grpo_tiny
"""

import json
import os

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
flags.mark_flag_as_required("workdir")


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), one per step: a resumed run re-logs the steps after its
    checkpoint, and the latest record of a step wins."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"no metrics.jsonl in {workdir!r}: is it a training workdir?")
    train, evals = {}, {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_no} is not valid JSON") from None
            if "eval_loss" in record:
                evals[record["step"]] = record
            elif "loss" in record or "reward_mean" in record:
                train[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def plot(workdir: str, out: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or workdir
    os.makedirs(out, exist_ok=True)
    train, evals = read_metrics(workdir)
    if not train:
        raise ValueError(f"{workdir!r} has no logged training steps yet")
    if "reward_mean" in train[0]:
        return [plot_grpo(train, os.path.join(out, "grpo.png"))]
    steps = [r["step"] for r in train]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["ce_loss"] for r in train], label="train (next token)")
    ax.plot(steps, [r["mtp_loss"] for r in train], label="train MTP", alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval (next token)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(out, "loss.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    load = np.array([r["expert_load_max_over_mean"] for r in train]).T  # [layers, steps]
    fig, ax = plt.subplots(figsize=(7, 0.4 * load.shape[0] + 1.5))
    image = ax.imshow(load, aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(steps[0], steps[-1], load.shape[0] - 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_yticks(range(load.shape[0]))
    ax.set_ylabel("MoE layer (MTP last)")
    ax.set_title("expert load: max / mean tokens per expert (1 = balanced)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    written.append(os.path.join(out, "expert_load.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


# (panel title, [(metric, label)], y label) of the GRPO figure; metrics a run lacks are skipped.
GRPO_PANELS = (
    ("reward", [("reward_mean", "mean (band: std)"), ("accuracy", "task accuracy")], "reward"),
    ("KL to the reference (k3)", [("kl", "kl")], "nats/token"),
    ("clipped tokens", [("clip_fraction", "fraction")], "fraction"),
    ("policy entropy", [("entropy", "entropy")], "nats/token"),
    ("response length", [("response_length", "mean")], "tokens"),
    ("rollout throughput", [("rollout_tokens_per_sec", "tokens/s")], "tokens/s"),
    ("time per step", [("rollout_time", "rollout"), ("update_time", "update")], "s"),
)


def plot_grpo(records: list[dict], path: str) -> str:
    """One figure of a GRPO run's per-step metrics (GRPO_PANELS, and each reward function)."""
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    per_reward = sorted({k for r in records for k in r if k.startswith("reward/")})
    panels = list(GRPO_PANELS)
    if len(per_reward) > 1:
        panels.insert(1, ("reward per function", [(k, k[7:]) for k in per_reward], "reward"))
    fig, axes = plt.subplots(2, -(-len(panels) // 2), figsize=(4 * -(-len(panels) // 2), 6.5))
    for ax, (title, series, ylabel) in zip(axes.flat, panels, strict=False):
        for key, label in series:
            if key in records[0]:
                ax.plot(steps, [r.get(key, np.nan) for r in records], label=label)
        if title == "reward":
            mean = np.array([r["reward_mean"] for r in records])
            std = np.array([r["reward_std"] for r in records])
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv):
    del argv
    for path in plot(_WORKDIR.value, _OUT.value):
        print(path)


if __name__ == "__main__":
    app.run(main)
