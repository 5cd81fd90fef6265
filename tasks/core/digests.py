"""Short digests: the one way tnflow names a thing by its content (file and directory names, keys, identities)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def short_digest(content: str | bytes | Any, length: int = 16) -> str:
    """The first `length` hex digits of SHA-256 of text, bytes, or anything JSON holds (keys sorted).

    Text is digested as the bytes it came from: a path that is not UTF-8 (its bytes held as
    surrogate escapes) has a digest, which is that of its bytes; UTF-8 text digests as ever.
    """
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    elif not isinstance(content, bytes):
        content = json.dumps(content, sort_keys=True).encode()
    return hashlib.sha256(content).hexdigest()[:length]


class Digest:
    """SHA-256 fed in parts (a file read in blocks, a list of rows): `short_digest` of the parts joined.

    Text parts are their bytes as `short_digest` takes them, so a file name that is not UTF-8
    digests rather than raising.
    """

    def __init__(self, first: str | bytes = b""):
        self._hash = hashlib.sha256()
        self.update(first)

    def update(self, part: str | bytes) -> None:
        self._hash.update(part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part)

    def hex(self, length: int = 64) -> str:
        return self._hash.hexdigest()[:length]

    def raw(self) -> bytes:
        return self._hash.digest()
