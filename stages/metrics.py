"""Training metrics: one JSON line per step, TensorBoard scalars, and a PNG of the curves."""

from __future__ import annotations

import json
import os

WATCHED = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/chosen", "logps/rejected", "grad_norm", "lr"]

# Fields that depend on the machine, not on the run: left out when comparing runs.
TIMING = ("tokens/s", "seconds")


class MetricsLog:
    """Appends to OUTPUT/metrics.jsonl and OUTPUT/tensorboard/. On resume, lines after the
    checkpoint's step are dropped first, so the file ends like an uninterrupted run's."""

    def __init__(self, output: str, resume_step: int | None = None):
        os.makedirs(output, exist_ok=True)
        self.path = os.path.join(output, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [line for line in open(self.path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(kept)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output, "tensorboard"), purge_step=(resume_step or 0) + 1)
        except ImportError:  # tensorboard is optional: metrics.jsonl always has everything
            pass

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display here or on a cluster), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(records: list[dict], path: str, title: str = "") -> str | None:
    """Loss, reward accuracy, margins and chosen/rejected rewards against step (eval points too)."""
    plt = pyplot()
    if plt is None:
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    panels = [("loss", ["loss"]), ("reward accuracy", ["rewards/accuracies"]), ("reward margin", ["rewards/margins"]),
              ("rewards", ["rewards/chosen", "rewards/rejected"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            xs = [r["step"] for r in train if key in r]
            ys = [r[key] for r in train if key in r]
            ax.plot(xs, ys, label=f"train {key.split('/')[-1]}", alpha=0.85)
            ex = [r["step"] for r in evals if f"eval/{key}" in r]
            if ex:
                ax.plot(ex, [r[f"eval/{key}"] for r in evals if f"eval/{key}" in r], "o--",
                        label=f"eval {key.split('/')[-1]}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
