"""The one base class of every error a user should see as a message, not a traceback.

`pipeline.py` catches `PipelineError` and prints `error: <message>` with exit code 2. Each module
raises its own subclass (ConfigError, DataError, ShardError, ...) whose message names the key,
file, row or URL at fault. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A user-facing error: bad input, settings, files or storage; the message says what to fix."""
