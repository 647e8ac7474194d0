"""An S3-compatible server on 127.0.0.1 for the tests: moto's server mode (what s3fs's own tests run
against), with a fake key pair. fsspec reaches it through its configuration (the endpoint), boto
through the environment, as a user's s3fs would reach MinIO or another S3-compatible store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

FAKE_KEY = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE0000", "AWS_SECRET_ACCESS_KEY": "fake/Secret+Key0123456789abcdefGHIJ",
            "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start moto on a free port; yields the environment a process needs to reach it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server._server.server_port  # noqa: SLF001 - moto exposes the bound port only there
        yield {**FAKE_KEY, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


def use_in_process(env: dict[str, str], monkeypatch) -> None:  # noqa: ANN001 - pytest's monkeypatch
    """Point this process's fsspec and boto at the server (fsspec read its configuration at import)."""
    import fsspec.config

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def environ(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


def s3_fs(env: dict[str, str]):  # noqa: ANN201 - an s3fs.S3FileSystem
    """A filesystem of the test's own on the server (the test process's environment untouched)."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]},
                             key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             skip_instance_cache=True)
