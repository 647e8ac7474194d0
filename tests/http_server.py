"""An HTTP file server on 127.0.0.1 for the tests, able to misbehave on purpose.

Serves a folder with ``Range`` support (206), optional basic authentication, and per-path faults
that the test sets and counts:

* ``status``: answer these codes first (e.g. ``[503, 503]``, ``[429]``, ``[404]``), one per request;
* ``reset_after``: close the connection after this many body bytes, for the first ``times`` requests;
* ``cut_after``: send the full ``Content-Length`` header, then stop the body after this many bytes;
* ``stall_after``: stop sending (keep the connection open) after this many bytes, for ``stall`` s;
* ``slow``: sleep this long between 64 KiB chunks.

``requests`` records (path, Range header, Authorization header present) of every request.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Fault:
    status: list[int] = field(default_factory=list)
    reset_after: int | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall: float = 0.0
    slow: float = 0.0
    times: int = 1          # requests the byte faults apply to (then the path behaves)


class FileServer:
    def __init__(self, root: Path, auth: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.auth = auth
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str | None, bool]] = []
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                server.serve(self, head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str, user: str | None = None, password: str | None = None) -> str:
        cred = f"{user}:{password}@" if user else ""
        return f"http://{cred}127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------ serving
    def serve(self, h: BaseHTTPRequestHandler, head: bool = False) -> None:
        path = unquote(urlsplit(h.path).path).lstrip("/")
        auth = h.headers.get("Authorization")
        self.requests.append((path, h.headers.get("Range"), auth is not None))
        if self.auth is not None:
            want = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            if auth != want:
                return self._status(h, 401, head)
        fault = self.faults.get(path)
        if fault is not None and fault.status:
            return self._status(h, fault.status.pop(0), head)
        file = (self.root / path).resolve()
        if not str(file).startswith(str(self.root.resolve())) or not file.is_file():
            return self._status(h, 404, head)
        size = file.stat().st_size
        start, end, status = 0, size, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = min(size, int(last) + 1) if last else size
            if start >= size:
                return self._status(h, 416, head)
            status = 206
        with open(file, "rb") as f:  # only the range asked for: a 1 GB file is not read for its footer
            f.seek(start)
            body = f.read(end - start)
        h.send_response(status)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        h.end_headers()
        if head:
            return
        active = fault is not None and fault.times > 0
        if active:
            fault.times -= 1
        limit = len(body)
        for attr in ("reset_after", "cut_after", "stall_after"):
            v = getattr(fault, attr, None) if active else None
            if v is not None:
                limit = min(limit, v)
        sent = 0
        try:
            while sent < limit:
                chunk = body[sent:min(limit, sent + 65536)]
                h.wfile.write(chunk)
                sent += len(chunk)
                self.bytes_sent += len(chunk)
                if active and fault.slow:
                    time.sleep(fault.slow)
            if active and fault.stall_after is not None and sent < len(body):
                h.wfile.flush()
                time.sleep(fault.stall)
            if sent < len(body) and active:
                if fault.reset_after is not None:  # a reset: RST instead of FIN
                    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            if sent < len(body):
                h.wfile.write(body[sent:])
                self.bytes_sent += len(body) - sent
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True

    def _status(self, h: BaseHTTPRequestHandler, code: int, head: bool = False) -> None:
        body = f"status {code}".encode()
        h.send_response(code)
        if code == 401:
            h.send_header("WWW-Authenticate", 'Basic realm="test"')
        if code in (429, 503):
            h.send_header("Retry-After", "0")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:  # a HEAD answer has no body (a body would be read as the next answer's status line)
            h.wfile.write(body)


def fast_retries(monkeypatch_or_env: object = None) -> dict[str, str]:
    """Environment of a quick retry policy, so that fault tests take seconds."""
    env = {"CODER_INDEX_REMOTE_RETRIES": "4", "CODER_INDEX_REMOTE_BACKOFF": "0.05",
           "CODER_INDEX_REMOTE_MAX_WAIT": "0.2", "CODER_INDEX_REMOTE_TIMEOUT": "2"}
    if monkeypatch_or_env is not None and hasattr(monkeypatch_or_env, "setenv"):
        for k, v in env.items():
            monkeypatch_or_env.setenv(k, v)
    return {**os.environ, **env}
