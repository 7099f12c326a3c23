"""`pipeline.py sweep`: the beta / KL trade-off, one short training run per beta on shared shards.

The reference model is scored once (the shards); each run only trains the policy. Runs go one
after another here; on a cluster each is the same `train` call and can be submitted as its own
job. Output: sweep.png (reward accuracy and margin against KL to the reference, one point per
beta), sweep.md (a table) and sweep.json.
"""

from __future__ import annotations

import json

from stages import storage, train
from stages.config import ConfigError, SweepConfig, TrainConfig

COLUMNS = [("beta", "beta"), ("eval accuracy", "eval/rewards/accuracies"), ("eval margin", "eval/rewards/margins"),
           ("KL chosen / seq", "eval/kl/chosen"), ("KL chosen / token", "eval/kl_per_token/chosen"),
           ("KL rejected / seq", "eval/kl/rejected"), ("eval loss", "eval/loss")]


def betas(cfg: SweepConfig) -> list[float]:
    try:
        values = [float(b) for b in cfg.beta.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"config key 'beta': {cfg.beta!r} is not a comma list of numbers") from None
    if not values or any(b <= 0 for b in values):
        raise ConfigError(f"config key 'beta': need positive betas, got {cfg.beta!r}")
    return values


def run(cfg: SweepConfig) -> list[dict]:
    storage.configure(cfg.storage_options)
    rows = []
    for beta in betas(cfg):
        tcfg = TrainConfig(refs=cfg.refs, eval_refs=cfg.eval_refs, model=cfg.model,
                           output=storage.join(cfg.output, f"beta-{beta:g}"), beta=beta, loss_type=cfg.loss_type,
                           learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, max_steps=cfg.max_steps, epochs=cfg.epochs,
                           seed=cfg.seed, dtype=cfg.dtype, storage_options=cfg.storage_options, progress=cfg.progress,
                           overwrite=True)
        summary = train.run(tcfg)
        rows.append({"beta": beta, "output": tcfg.output, **summary["eval"]})
    storage.write_bytes_atomic(storage.join(cfg.output, "sweep.json"), json.dumps(rows, indent=1).encode())
    storage.write_bytes_atomic(storage.join(cfg.output, "sweep.md"), table(rows).encode())
    if storage.is_local(cfg.output):
        plot(rows, storage.join(cfg.output, "sweep.png"))
    return rows


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [head, "|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(key, float('nan')):.4g}" for _, key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> str | None:
    from stages.metrics import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    kl = [r["eval/kl/chosen"] for r in rows]
    for ax, key, name in ((axes[0], "eval/rewards/accuracies", "held-out reward accuracy"),
                          (axes[1], "eval/rewards/margins", "held-out reward margin")):
        ys = [r[key] for r in rows]
        ax.plot(kl, ys, "o-", color="#4c72b0")
        for x, y, r in zip(kl, ys, rows):
            ax.annotate(f"beta {r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL(policy || reference) on chosen, nats per sequence")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
