"""What a user error looks like on the console: tnflow's one line, not Prefect's tracebacks.

Prefect logs a failed task or flow with its traceback through the engine's frames, which
reads like a crash even when the cause is a wrong path or digest. For tnflow's own error
types the console handlers drop those records; the run's log in the Prefect UI (the API
handler) keeps them whole, and `--debug` keeps them on the console too. Unexpected errors
keep their tracebacks everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tnflow.tasks.errors import TnflowError
from tnflow.tasks.files import is_disk_full


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
    dropper = _DropUserErrors()
    for handler in handlers:
        handler.addFilter(dropper)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(dropper)


def _sends_to_api(handler: logging.Handler) -> bool:
    return "APILogHandler" in type(handler).__name__
