"""The one channel for what a command says while it works: progress lines and notices.

Every line goes to stderr, flushed at once, prefixed with who says it (`train: loading the policy
...`, `device: cpu for training (...)`) or with what it is (`note: ...`, `warning: ...`). stdout is
kept for each command's own summary, which users and scripts read (`pipeline.py train ... >
summary.txt` stays clean); stderr is already where the progress bars and errors go, so a user
watching a terminal sees all of it in order.

It sits on the library's bottom floor (with errors and storage) because every room speaks through
it: the input readers (`inputs/`, which may not import `runtime/`) as much as the devices and the
training loop.
"""

from __future__ import annotations

import sys


def say(stage: str, message: str) -> None:
    """One progress line of `stage` (a command, or `device`): `stage: message`."""
    line(f"{stage}: {message}")


def note(message: str) -> None:
    """Something the user may want to act on that stops nothing (`note: ...`)."""
    line(f"note: {message}")


def warn(message: str) -> None:
    """Something found wrong that the command works around or stops on by its exit code, not by an
    error (`warning: ...`): `inspect` naming each damaged file before it refuses to draw statistics."""
    line(f"warning: {message}")


def line(text: str) -> None:
    """`text` as one line of the channel, written as it is."""
    from tqdm import tqdm

    # Through tqdm: a line printed while a progress bar is drawn would land in the middle of the bar;
    # tqdm clears the bar, writes the line and draws the bar again below it.
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()
