"""Pairs laid end to end in one sequence: the layout the flex and varlen paths share.

Each row (`packing.pair_rows`: prefix, first, second) is put after the last, with no padding between
them; `second`'s positions restart right after the prefix, so with attention that lets `second` see the
prefix but not `first` (a FlexAttention BlockMask, or varlen documents whose keys skip `first`) each
row computes exactly what two separate sequences would, as on the dense path (`packing.pack_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Flat:
    """One flat sequence. `spans`: per row (where it starts, len prefix, len first, len second).
    `used`: tokens the rows take; ids and pos run on to `len(ids)` with the padding at the end."""
    ids: list[int]
    pos: list[int]
    spans: list[tuple[int, int, int, int]]
    cols: list[int]
    labels: list[int]
    seq_ids: list[int]
    used: int

    def tensors(self, device=None):
        """(input_ids (1, T), position_ids (1, T), rows, cols, labels, seq_ids) for `scored_logps`."""
        t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return (t(self.ids).unsqueeze(0), t(self.pos).unsqueeze(0), torch.zeros(len(self.labels), dtype=torch.long,
                device=device), t(self.cols), t(self.labels), t(self.seq_ids))


def lay_flat(rows: list[tuple], pad_id: int, multiple: int = 1) -> Flat:
    """Rows (prefix, first, second, seq_first, seq_second) end to end, padded at the end to a multiple of
    `multiple` tokens (at least one multiple): the padding's positions count from 0."""
    ids: list[int] = []
    pos: list[int] = []
    spans: list[tuple[int, int, int, int]] = []
    cols: list[int] = []
    labels: list[int] = []
    seq_ids: list[int] = []
    for p, c, r, sc, sr in rows:
        at, lp, lc, lr = len(ids), len(p), len(c), len(r)
        spans.append((at, lp, lc, lr))
        ids += list(p) + list(c) + list(r)
        pos += list(range(lp + lc)) + list(range(lp, lp + lr))
        labels += list(c) + list(r)
        cols += range(at + lp - 1, at + lp + lc - 1)  # first's token k at lp + k, predicted from lp + k - 1
        if lr:  # second's first token is predicted from the prefix's last position
            cols += [at + lp - 1, *range(at + lp + lc, at + lp + lc + lr - 1)]
        seq_ids += [sc] * lc + [sr] * lr
    used = len(ids)
    pad = max(multiple, -(-used // multiple) * multiple) - used
    return Flat(ids + [pad_id] * pad, pos + list(range(pad)), spans, cols, labels, seq_ids, used)


def unsupported(kwargs: dict) -> None:
    """Refuse what a plain causal softmax kernel would silently leave out (`attention.resolve` keeps such models
    on the dense path; this catches a model it did not see)."""
    for key, what in (("softcap", "logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(key) is not None:
            raise RuntimeError(f"the model's attention uses {what}, which the packed flex and varlen paths do not "
                               "compute: use attention dense")
