"""Training metrics: one JSON line per step (metrics.jsonl) and TensorBoard scalars."""

from __future__ import annotations

import json
import os

from stages.core import storage

# Fields that depend on the machine, not on the run: left out when comparing runs.
TIMING = ("tokens/s", "seconds")


class MetricsLog:
    """Appends to FOLDER/metrics.jsonl and FOLDER/tensorboard/ (a local folder: the run's staging
    folder). On resume, lines after the checkpoint's step are dropped first, so the file ends
    like an uninterrupted run's."""

    def __init__(self, folder: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
        self.tb = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=(resume_step or 0) + 1)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.tb.close()


def read(url: str) -> list[dict]:
    """The records of a metrics.jsonl, local or remote."""
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
