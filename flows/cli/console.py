"""What a user error looks like on the console: tnflow's one line, not Prefect's tracebacks.

Prefect logs a failed task or flow with its traceback through the engine's frames, which
reads like a crash even when the cause is a wrong path or digest, and a run stopped by
SIGTERM or Ctrl-C as "Crash detected!". For tnflow's own error types and for interruptions
the console handlers drop those records; the run's log in the Prefect UI (the API
handler) keeps them whole, and `--debug` keeps them on the console too. Unexpected errors
keep their tracebacks everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tnflow.tasks.core.errors import TnflowError
from tnflow.tasks.core.files import is_disk_full


class _DropUserErrors(logging.Filter):
    """Drops tracebacks of user errors, and Prefect's 'Finished in state Failed(...)' lines that repeat them."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TnflowError) or (error is not None and is_disk_full(error)):
            return False
        message = str(record.msg)
        return not (
            message.startswith("Finished in state Failed")
            and any(f"exception {name}:" in message or f"exception: {name}:" in message for name in _user_errors())
        )


# What Prefect's engine logs of a run stopped by a signal (its state's message), which tnflow's
# own line ("interrupted by SIGTERM during train; finished work is kept ...") says better.
_INTERRUPTED = ("aborted by a termination signal", "aborted by an interrupt signal", "Interrupted:")


class _DropInterruptions(logging.Filter):
    """Drops Prefect's 'Crash detected!' and 'Finished in state Crashed(...)' lines for a run a signal stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        crashed = message.startswith(("Crash detected!", "Finished in state Crashed("))
        return not (crashed and any(mark in record.getMessage() for mark in _INTERRUPTED))


def _user_errors(kind: type[BaseException] = TnflowError) -> list[str]:
    return [kind.__name__, *(name for sub in kind.__subclasses__() for name in _user_errors(sub))]


@contextmanager
def user_errors_in_one_line(enabled: bool = True) -> Iterator[None]:
    """While active, console handlers leave out log records that carry a TnflowError."""
    if not enabled:
        yield
        return
    import prefect.logging.configuration  # noqa: F401 - Prefect sets up its console handler on import

    handlers = [h for h in logging.getLogger().handlers if not _sends_to_api(h)]
    droppers = (_DropUserErrors(), _DropInterruptions())
    for handler in handlers:
        for dropper in droppers:
            handler.addFilter(dropper)
    try:
        yield
    finally:
        for handler in handlers:
            for dropper in droppers:
                handler.removeFilter(dropper)


def _sends_to_api(handler: logging.Handler) -> bool:
    return "APILogHandler" in type(handler).__name__


def interrupted_line(command: str, stopped: BaseException) -> str:
    """The one line an interrupted command ends with: what stopped, and how to go on."""
    from tnflow.tasks.core.processes import Interrupted
    from tnflow.tasks.core.progress import running_stage

    reason = stopped.reason if isinstance(stopped, Interrupted) else type(stopped).__name__
    if isinstance(stopped, Interrupted) and not stopped.signalled:  # tnflow stopped it, and says why
        return f"tnflow {command}: error: {reason}"
    stage = running_stage()
    return (
        f"tnflow {command}: interrupted by {reason}{f' during {stage}' if stage else ''}; finished work is kept "
        "(downloads, caches, finished epochs): run the same command again to resume"
    )


def disk_full_line(command: str, exc: BaseException) -> str:
    """The one line for a full disk that reached the command unconverted."""
    from tnflow.tasks.core.files import disk_full_error
    from tnflow.tasks.core.progress import running_stage

    full = disk_full_error(getattr(exc, "filename", None) or "the disk", running_stage() or command)
    return f"tnflow {command}: error: {full}"
