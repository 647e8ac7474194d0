"""`coder-index serve`: an HTTP API and a local web page for predictions and their explanations.

Needs the ``serve`` extra (``pip install 'coder-index[serve]'``: FastAPI, uvicorn, python-multipart).
``create_app(ServeConfig(...))`` builds the ASGI app; the CLI runs it with uvicorn.
"""

from __future__ import annotations

from coder_index.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig, **kwargs):  # noqa: ANN003, ANN201 - fastapi.FastAPI, an optional extra
    from coder_index.serve.app import create_app as _create

    return _create(config, **kwargs)
