"""A loopback HTTP file server with scripted faults, so download tests never leave the machine."""

from __future__ import annotations

import re
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-$")


class FileServer:
    """Serves `files` at `url(name)`; each request first takes the next fault, if any.

    Faults: "500" (an error reply), "drop" (send half the body, then hang up), "corrupt"
    (flipped bytes), "ignore-range" (answer a Range request with the whole file, 200).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: deque[str] = deque()
        self.requests: list[tuple[str, str | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # Polled every 0.05 s, not 0.5 s: each test's shutdown waits for one poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                asked = self.headers.get("Range")
                server.requests.append((name, asked))
                fault = server.faults.popleft() if server.faults else None
                if fault == "500":
                    self.send_error(500, "injected failure")
                    return
                if name not in server.files:
                    self.send_error(404, "no such file")
                    return
                body = server.files[name]
                if fault == "corrupt":
                    body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
                start = 0
                match = _RANGE.match(asked or "")
                if match and fault != "ignore-range":
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if fault == "drop":
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        return Handler
