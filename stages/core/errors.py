"""The one base class of every error a user should see as a message, not a traceback.

`pipeline.py` catches `PipelineError` and prints `error: <message>` with exit code 2. Each module
raises its own subclass (ConfigError, DataError, ShardError, ...) whose message names the key,
file, row or URL at fault. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A user-facing error: bad input, settings, files or storage; the message says what to fix."""


def unwrap(error: BaseException | None) -> PipelineError | None:
    """The PipelineError a Ray task or actor raised, if that is what `error` is or carries. Ray wraps it
    (sometimes twice) in a class derived from both RayTaskError and the error's own class, whose text
    is a remote traceback: the original, one-line error is in `.cause`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        from_ray = any(k.__module__.startswith("ray.") for k in type(error).__mro__)
        if isinstance(error, PipelineError) and not from_ray:
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None
