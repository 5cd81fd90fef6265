"""Errors a user can act on.

Every failure caused by input (options, URLs, files, disk) is a `TnflowError` whose
message is one line saying what went wrong and what to do. The CLI prints it without a
traceback; anything else is a bug and keeps its traceback.
"""


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
