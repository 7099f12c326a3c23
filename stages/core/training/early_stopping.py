"""Early stopping on one held-out metric, with its state kept in checkpoints."""

from __future__ import annotations


class EarlyStopping:
    """Counts evaluations without improvement of one eval metric (loss: lower is better)."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience, self.on = metric, patience, patience > 0
        self.lower_is_better = metric.endswith("loss")
        self.best: float | None = None
        self.best_step, self.bad = 0, 0

    def update(self, step: int, evals: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        value = evals[self.metric]
        better = self.best is None or (value < self.best if self.lower_is_better else value > self.best)
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.on and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
