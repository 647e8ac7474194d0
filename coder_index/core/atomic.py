"""Crash-safe file writes.

Files are written aside under a name unique to the writer (``.NAME.<pid>.<random>.tmp``), fsynced,
renamed into place, and the directory fsynced. A failed write removes its temp file, and a temp file
left by a killed writer never blocks anything: it is recognisable and is cleaned up by the next
writer that holds the lock (``core.locking.FileLock``, the one lock helper).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coder_index.core.errors import CoderIndexError
from coder_index.core.processes import pid_alive

_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


class DiskFullError(CoderIndexError):
    """The device ran out of space (or quota) during a write."""


def disk_full(exc: BaseException, path: Path | str | None = None) -> bool:
    """ENOSPC / EDQUOT, or SQLite's (possibly SQLAlchemy-wrapped) 'database or disk is full'. SQLite
    reports some failures to grow its journal as a plain 'disk I/O error': with ``path``, that
    counts as full when the device of ``path`` has (almost) no space left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if "database or disk is full" in text or "no space left on device" in text:
        return True
    return "disk i/o error" in text and path is not None and _nearly_full(Path(path))


def _nearly_full(path: Path) -> bool:
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def disk_full_message(path: Path | str) -> str:
    return (f"no space left on the device of {path}. Everything written before is kept and consistent: free some "
            "space and rerun the same command to continue")


@contextmanager
def translate_disk_full(path: Path | str) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT / SQLite's 'database or disk is full' into one clear DiskFullError."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if disk_full(exc, path) or (exc.__cause__ is not None and disk_full(exc.__cause__, path)):
            raise DiskFullError(disk_full_message(path)) from exc
        raise


def check_writable(path: Path, what: str, *, is_dir: bool = False) -> None:
    """Fail before anything expensive if ``path`` (a file, or a directory with ``is_dir``) cannot be
    created or written, naming the path."""
    from coder_index.core.errors import InputFormatError

    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == path:
        if is_dir and not path.is_dir():
            raise InputFormatError(f"{what} {path} exists and is not a directory")
        if not is_dir and path.is_dir():
            raise InputFormatError(f"{what} {path} is a directory; name a file")
        if not is_dir and not path.is_file():
            raise InputFormatError(f"{what} {path} exists and is not a regular file (a FIFO, socket or device); "
                                   "name a regular file")
        target = path if is_dir else path.parent
        ok = os.access(target, os.W_OK | os.X_OK) and (is_dir or os.access(path, os.W_OK))
    else:
        if not existing.is_dir():
            raise InputFormatError(f"{what} {path}: {existing} is not a directory")
        ok = os.access(existing, os.W_OK | os.X_OK) and _can_create_in(existing)
    if not ok:
        raise InputFormatError(f"{what} {path}: {existing} is not writable; choose a location you can write to")


def _can_create_in(directory: Path) -> bool:
    """Whether a file can really be created in ``directory`` (access() says yes to root in /proc, on a
    read-only bind mount's parent, and so on): create one and remove it."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".coder-index-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` that no other writer uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.match(name))


def remove_stale_temps(directory: Path, prefix: str = ".") -> list[str]:
    """Delete temp files and staged folders whose writer process is gone (call with the directory's
    lock held, or with a ``prefix`` naming what only one writer at a time may stage)."""
    import shutil

    removed = []
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if m and p.name.startswith(prefix) and not pid_alive(int(m.group(1))):
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                pass
    return removed


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Windows cannot open a directory to flush it (NTFS
    journals the rename itself): nothing to do there."""
    if os.name == "nt":
        return
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    from coder_index.core.faults import crash_point

    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("atomic.temp_written")  # a temp file left behind must never block a rerun
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_faiss_durably(index: Any, path: Path) -> None:
    """Write ``index`` to ``path`` (a fresh name) and fsync it; the caller renames it into place."""
    import faiss

    from coder_index.core.faults import armed

    tmp = temp_path(path)
    try:
        faiss.write_index(index, str(tmp))
        if armed("faiss.torn_write"):  # the machine dies with half of the file on disk
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), 9)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Build a new directory aside and rename it into place on success; on any failure nothing is
    left behind. ``out`` must not exist or be empty. Two builders of the same ``out`` cannot both
    win: the one that renames second finds ``out`` taken and fails cleanly."""
    import shutil

    from coder_index.core.faults import crash_point

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, prefix=f".{out.name}.")  # folders staged by killed builders of `out`
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        with translate_disk_full(out):
            yield tmp
        crash_point("staged.before_rename")
        if out.exists():
            try:
                out.rmdir()  # only an empty directory; a concurrent builder's result is never removed
            except OSError:
                raise FileExistsError(f"{out} was created by another process meanwhile; choose a new directory") \
                    from None
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{out} was created by another process meanwhile; choose a new directory") \
                    from None
            raise
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_dir() -> Path:
    """$CODER_INDEX_CACHE_DIR, else $XDG_CACHE_HOME/coder-index, else ~/.cache/coder-index."""
    base = os.environ.get("CODER_INDEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coder-index")
    return Path(base)
