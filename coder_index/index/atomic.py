"""Crash-safe file writes: write aside, fsync, rename, fsync the directory."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_faiss_durably(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` (a fresh name) and fsync it; the caller renames it into place."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """One writer per index directory at a time (advisory lock, released if the process dies)."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Build a new directory aside and rename it into place on success; on any failure nothing is
    left behind. ``out`` must not exist or be empty."""
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_dir() -> Path:
    """$CODER_INDEX_CACHE_DIR, else $XDG_CACHE_HOME/coder-index, else ~/.cache/coder-index."""
    base = os.environ.get("CODER_INDEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coder-index")
    return Path(base)
