"""Listening sockets, and a server run in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one). Bound here, before the model loads,
    so that a taken port fails at once; uvicorn then serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}"


def server_config(app: Any, config: Any = None) -> Any:
    """uvicorn's settings for ``app``: its h11 protocol with the time limits for slow senders and the
    cap on connections of ``config`` (a ``ServeConfig``; its defaults when None)."""
    import uvicorn

    from coder_index.serve.config import ServeConfig
    from coder_index.serve.guard import protocol_class

    c = config or ServeConfig(index=None)  # type: ignore[arg-type]
    # no access log: a first request's address holds the token (?token=), which is written nowhere
    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=5,
                          http=protocol_class(c.header_timeout, c.body_timeout, c.max_connections))


class BackgroundServer:
    """``with BackgroundServer(app) as url: ...``: uvicorn serving ``app`` on 127.0.0.1 in a thread,
    with the limits of ``app.state.config`` (the ``ServeConfig`` it was made from)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = url_of(host, self.sock)
        self.server = uvicorn.Server(server_config(app, getattr(app.state, "config", None)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
