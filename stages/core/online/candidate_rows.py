"""Generate's candidates as the judge handles them: one row per usable response (an empty one, or one
repeating an earlier response to its prompt, is rejected before any judge sees it), grouped by prompt; and
the random source seeded per prompt that both the pair selection and the labelling sheet draw from.
"""

from __future__ import annotations

import random

from stages.core.inputs.formats import is_blank
from stages.core.online.judges import CandidateKey


def flatten(rows: list[dict]) -> tuple[list[dict], dict[CandidateKey, tuple[str, str]]]:
    """Candidates as one row each (key: (prompt_index, response_index)), and the rejects before judging:
    an empty response, or one the same as an earlier response to its prompt."""
    out, rejects = [], {}
    for rec in rows:
        seen: dict[str, int] = {}
        for j, (text, reason) in enumerate(zip(rec["responses"], rec["finish_reasons"])):
            key = (rec["prompt_index"], j)
            if is_blank(text):
                rejects[key] = ("empty_response", f"response {j} is empty (finish reason {reason})")
                continue
            if text in seen:
                rejects[key] = ("duplicate_response", f"response {j} is the same text as response {seen[text]}")
                continue
            seen[text] = j
            out.append({"key": key, "prompt_index": rec["prompt_index"], "response_index": j,
                        "prompt": rec["prompt"], "conversational": rec["conversational"],
                        "template_json": rec["template_json"], "response": text, "finish_reason": reason})
    return out, rejects


def group_by_prompt(cands: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in cands:
        out.setdefault(c["prompt_index"], []).append(c)
    return out


def prompt_rng(seed: int, rec: dict) -> random.Random:
    return random.Random(f"{seed}:{rec['prompt_id']}:{rec['prompt_index']}")
