"""Reading the files of a built directory (adapter, corpus) so that damage is one clear line.

A missing, truncated or foreign file of an adapter or corpus directory must not end in a raw
RuntimeError from FAISS, a ValueError from NumPy or a KeyError from a half-written manifest: it is
an ``IndexFormatError`` naming the directory, the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc

from coder_index.core.errors import CoderIndexError, IndexFormatError


@contextmanager
def reading(directory: Path, name: str, fix: str) -> Iterator[None]:
    try:
        yield
    except CoderIndexError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, EOFError, RecursionError,
            sa_exc.DBAPIError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = reason[-1][:200] if reason else exc.__class__.__name__
        raise IndexFormatError(f"{directory / name} is missing or damaged ({reason}); {fix}") from None


def read_manifest(directory: Path, fmt: str, required: tuple[str, ...], what: str, fix: str) -> dict[str, Any]:
    """The manifest of a built directory, checked for its format and required keys."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise IndexFormatError(f"{directory} is not {what} (no manifest.json); {fix}")
    with reading(directory, "manifest.json", fix):
        manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise IndexFormatError(f"{directory} is not {what} (manifest.json has another format); {fix}")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise IndexFormatError(f"{path} has no {', '.join(missing)}: it is damaged; {fix}")
    return manifest
