"""Plot a run: loss curves and the expert-load heatmap, as PNG files in the workdir.

  python -m launch.plot --workdir=runs/tiny
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
            elif "loss" in record:
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


def main(argv):
    del argv
    for path in plot(_WORKDIR.value, _OUT.value):
        print(path)


if __name__ == "__main__":
    app.run(main)
