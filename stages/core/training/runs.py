"""The training run a saved model belongs to: its train_config.yaml, found from final/, best/ or a
checkpoint folder. eval and the implicit-reward judge take the run's loss and beta from it."""

from __future__ import annotations

from stages.core import storage


def run_config(model: str | None) -> dict:
    """The train_config.yaml of the run a final/, best/ or checkpoints/step-N folder belongs to ({} if
    none), with `_source`: the file it came from."""
    import yaml

    if not model:
        return {}
    for up in range(3):  # final/ and best/ sit in the run folder; checkpoints/step-N two levels down
        folder = model.rstrip("/").rsplit("/", up)[0] if up else model
        url = storage.join(folder, "train_config.yaml")
        if storage.exists(url):
            return {**(yaml.safe_load(storage.read_bytes(url)) or {}), "_source": url}
    return {}
