"""The test oracle, kept apart from the code it checks: one unpadded forward of one sequence.

No packing, no padding, no chunked LM head, no index arithmetic: the model's own full logits,
a full log-softmax, and a sum over the completion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exact_logps(model, sequence: list[int], start: int) -> float:
    """The oracle: one unpadded forward of one sequence, full log-softmax, sum from `start`.

    The logits are the model's (float32 for a float32 model); log-softmax and sum run in float64
    so the oracle's own rounding stays far below the tolerances it checks.
    """
    ids = torch.tensor([sequence], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V)
    logps = F.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return float(logps[max(start, 1) - 1:].sum())
