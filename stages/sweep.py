"""`pipeline.py sweep`: the beta / KL trade-off, one short training run per beta on shared shards.

The reference model is scored once (the shards); each run only trains the policy. Runs go one
after another here; on a cluster each is the same `train` call and can be submitted as its own
job. Every training key applies to every run (`SweepConfig` is `TrainConfig` with a list of
betas). Output: sweep.png (reward accuracy and margin against the mean log-ratio to the reference on
the held-out chosen answers, one point per beta; for KTO on unpaired shards, margin and loss against
KTO's KL estimate), sweep.md (a table) and sweep.json.
"""

from __future__ import annotations

from stages import train
from stages.core import storage
from stages.core.config.options import SweepConfig
from stages.core.plots import figure, sweep_tradeoff
from stages.core.refs.stream import load_refs

COLUMNS = [("beta", "beta"), ("eval accuracy", "eval/rewards/accuracies"), ("eval margin", "eval/rewards/margins"),
           ("log-ratio chosen / seq", "eval/logratio/chosen"),
           ("log-ratio chosen / token", "eval/logratio_per_token/chosen"),
           ("log-ratio rejected / seq", "eval/logratio/rejected"), ("eval loss", "eval/loss")]
# Unpaired shards (KTO) have no accuracy and no log-ratio of chosen answers: KTO's own figures instead.
UNPAIRED_COLUMNS = [("beta", "beta"), ("eval margin", "eval/rewards/margins"),
                    ("eval reward desirable", "eval/rewards/chosen"),
                    ("eval reward undesirable", "eval/rewards/rejected"), ("eval KL estimate", "eval/kl"),
                    ("eval loss", "eval/loss")]


def run(cfg: SweepConfig) -> list[dict]:
    storage.configure(cfg.storage_options_dict)
    kind = load_refs(cfg.eval_refs).kind
    rows = []
    for beta in cfg.beta:
        run_cfg = cfg.run_config(beta)
        summary = train.run(run_cfg)
        rows.append({"beta": beta, "output": run_cfg.output, "kind": kind, **summary["eval"]})
    storage.write_json(storage.join(cfg.output, "sweep.json"), rows)
    storage.write_bytes_atomic(storage.join(cfg.output, "sweep.md"), table(rows).encode())
    if storage.is_local(cfg.output):
        draw = unpaired_tradeoff if kind == "unpaired" else sweep_tradeoff
        draw(rows, storage.join(cfg.output, "sweep.png"))
    return rows


def unpaired_tradeoff(rows: list[dict], path: str) -> str:
    """KTO's sweep picture: held-out margin and loss against its KL estimate (mismatched completions),
    one point per beta (sweep_tradeoff's axes, accuracy and chosen log-ratio, do not exist for KTO)."""
    kl = [r["eval/kl"] for r in rows]
    with figure(path, 2, (4.5, 3.6)) as axes:
        for ax, key, name in ((axes[0], "eval/rewards/margins", "held-out reward margin"),
                              (axes[1], "eval/loss", "held-out loss")):
            ys = [r.get(key, float("nan")) for r in rows]  # a held-out set of one class has no margin
            ax.plot(kl, ys, "o-", color="#4c72b0")
            for x, y, r in zip(kl, ys, rows):
                ax.annotate(f"beta {r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("KL estimate (policy || reference), nats per sequence")
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
    return path


def table(rows: list[dict]) -> str:
    columns = UNPAIRED_COLUMNS if rows and rows[0].get("kind") == "unpaired" else COLUMNS
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    lines = [head, "|" + "---:|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(key, float('nan')):.4g}" for _, key in columns) + " |")
    return "\n".join(lines) + "\n"
