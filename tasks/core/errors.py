"""Errors a user can act on.

Every failure caused by input (options, URLs, files, disk) is a `TnflowError` whose
message is one line saying what went wrong and what to do. The CLI prints it without a
traceback; anything else is a bug and keeps its traceback.
"""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as part of a one-line message: its first line, or its type when it says nothing."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


class TnflowError(Exception):
    """A failure the user can fix; the message says how."""


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
