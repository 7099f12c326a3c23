"""`pipeline.py sweep`: the beta / KL trade-off, one short training run per beta on shared shards.

The reference model is scored once (the shards); each run only trains the policy. Runs go one
after another here; on a cluster each is the same `train` call and can be submitted as its own
job. Every training key applies to every run (`SweepConfig` is `TrainConfig` with a list of
betas). Output: sweep.png (reward accuracy and margin against the mean log-ratio to the reference on
the held-out chosen answers, one point per beta), sweep.md (a table) and sweep.json.
"""

from __future__ import annotations

from stages import train
from stages.core import storage
from stages.core.config import SweepConfig
from stages.core.plots import sweep_tradeoff

COLUMNS = [("beta", "beta"), ("eval accuracy", "eval/rewards/accuracies"), ("eval margin", "eval/rewards/margins"),
           ("log-ratio chosen / seq", "eval/logratio/chosen"),
           ("log-ratio chosen / token", "eval/logratio_per_token/chosen"),
           ("log-ratio rejected / seq", "eval/logratio/rejected"), ("eval loss", "eval/loss")]


def run(cfg: SweepConfig) -> list[dict]:
    storage.configure(cfg.storage_options_dict)
    rows = []
    for beta in cfg.betas:
        run_cfg = cfg.run_config(beta)
        summary = train.run(run_cfg)
        rows.append({"beta": beta, "output": run_cfg.output, **summary["eval"]})
    storage.write_json(storage.join(cfg.output, "sweep.json"), rows)
    storage.write_bytes_atomic(storage.join(cfg.output, "sweep.md"), table(rows).encode())
    if storage.is_local(cfg.output):
        sweep_tradeoff(rows, storage.join(cfg.output, "sweep.png"))
    return rows


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [head, "|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(key, float('nan')):.4g}" for _, key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
