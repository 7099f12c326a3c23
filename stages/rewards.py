"""Example reward functions for `judge --reward-fn` / `iterate --reward-fn`: (prompt, response) -> float.

Any importable `module:function` (or `path/to/file.py:function`) with this signature works: the prompt as
the data gives it (a string, or a list of chat messages), the response as text; higher is better. A
function that raises, or returns something that is not a finite number, rejects that one response
(`judge_error`), never the run.
"""

from __future__ import annotations

import re
from typing import Any

WORD = re.compile(r"\w+")


def concise(prompt: Any, response: str, target_words: int = 60) -> float:
    """The demo's judge: a short, non-repetitive answer scores highest.

    score = distinct words / words (1.0 when no word repeats), minus 0.5 per `target_words` words beyond
    `target_words`. Rambling, looping or run-on samples lose; a small instruct model learns this in a round
    or two, which makes the effect of on-policy rounds visible in minutes. It knows nothing of correctness:
    use a reward model or a task verifier for real work."""
    words = [w.lower() for w in WORD.findall(response)]
    if not words:
        return 0.0
    return len(set(words)) / len(words) - 0.5 * max(0, len(words) - target_words) / target_words


def exact_answer(prompt: Any, response: str) -> float:
    """A verifier for prompts that end with `Answer: X` hidden in a system message or the prompt text
    (`{"role": "system", "content": "Answer: 42"}`): 1.0 when the response's last number or word equals X,
    else 0.0. An example of a verifiable-task judge; adapt the rule to your data."""
    text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
    found = re.findall(r"Answer:\s*(\S+)", text)
    tokens = WORD.findall(response)
    return float(bool(found and tokens and tokens[-1].lower() == found[-1].strip(".").lower()))
