"""Errors a user can act on.

Every failure caused by input (options, URLs, files, disk) is a `TnflowError` whose
message is one line saying what went wrong and what to do. The CLI prints it without a
traceback; anything else is a bug and keeps its traceback.
"""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as part of a one-line message: its first line, or its type when it says nothing."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


_CONTEXT = BaseException.__context__  # the slot Python fills with the error being handled at a raise


class TnflowError(Exception):
    """A failure the user can fix; the message says how.

    Raised `from None` it is the whole story, and has no context: Python still records the
    error it replaced, and libraries that pickle exceptions with their chain (tblib, which
    Dask and TensorFlow install) then try to pickle that error too (a TensorFlow error holds
    its graph operation, which cannot be), so Prefect could not store the failed state's
    result and said so in a warning beside the one line.
    """

    @property  # type: ignore[override]
    def __context__(self) -> BaseException | None:
        return None if self.__suppress_context__ else _CONTEXT.__get__(self)

    @__context__.setter
    def __context__(self, value: BaseException | None) -> None:
        _CONTEXT.__set__(self, value)


class ConfigError(TnflowError, ValueError):
    """An option value is out of range or unknown; raised before any work starts."""


class DownloadError(TnflowError):
    """A download failed in a way that retrying will not fix (404, wrong digest, bad URL)."""


class TransientDownloadError(DownloadError):
    """A download failed in a way that may pass (reset, timeout, HTTP 5xx); retried with backoff."""


class DataError(TnflowError):
    """An archive or cache file does not hold what the dataset format promises."""


class DiskFullError(TnflowError):
    """A disk filled up while a stage wrote; retrying cannot free space, so it is never retried."""
