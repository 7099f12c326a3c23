"""Reward functions for the on-policy tests (loaded as tests/online_rewards.py:NAME)."""

import os
import signal


def chars(prompt, response):
    """Longer is better: distinct scores for random tiny-model samples."""
    return float(len(response))


def chars_then_die(prompt, response):
    """`chars`, but the process kills itself (SIGKILL, no clean-up) once the file named by
    $DPO_TEST_KILL_WHEN exists: a crash in the middle of a later round."""
    when = os.environ.get("DPO_TEST_KILL_WHEN")
    if when and os.path.exists(when):
        os.kill(os.getpid(), signal.SIGKILL)
    return float(len(response))


def picky(prompt, response):
    """Raises for some responses, returns a non-number for others: judge_error rejects."""
    if "a" in response[:3]:
        raise ValueError("no a's up front")
    if "e" in response[:3]:
        return "high"
    return float(len(response))
