"""The one lock helper: an exclusive lock on a file, portable, with a bounded wait, naming its owner.

Every writer that must not overlap another takes a ``FileLock``: an index's writers (``INDEX/.lock``),
the run on one ``--out`` (``OUT.lock``), a ``--save-embeddings`` folder, the weights-fingerprint cache.

* **Released when the process dies.** The lock is the kernel's (``flock`` on POSIX, ``msvcrt.locking``
  on Windows), held on an open descriptor: a killed writer leaves a lock file that holds no lock, so
  it can never go stale and is taken over silently.
* **Bounded waits.** ``wait`` seconds at most (0: refuse at once), polled with a growing pause;
  then ``BusyError`` names the owner. ``try_acquire`` answers False instead, for advisory writers
  (a cache that may skip a write).
* **The owner is named.** The holder writes ``pid N: command`` into the lock file; a refused process
  quotes it. ``remove=True`` deletes the file on release (``OUT.lock``: no trace after a run); a
  process that opened the file just before it was deleted notices (another inode) and opens again.
* **Where the kernel offers no lock** (neither ``fcntl`` nor ``msvcrt``; tested by making ``fcntl``
  unimportable), the lock file's existence is the lock: created with ``O_EXCL``, it names the holder's
  pid and host, is deleted on release, and is taken over once that process is gone from this host
  (the takeover itself under a second exclusive file, so two waiters never both take it).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from coder_index.core.errors import CoderIndexError
from coder_index.core.processes import pid_alive

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None  # type: ignore[assignment]
try:
    import msvcrt as _msvcrt  # type: ignore[import-not-found]
except ImportError:
    _msvcrt = None

# msvcrt locks byte ranges and a locked range cannot be read by others: lock one byte far past the
# owner's line, so that a refused process can still read who holds it.
_WINDOWS_LOCK_OFFSET = 1 << 30


# the kernel's locks, or lock files whose existence is the lock (see the module docstring)
KERNEL_LOCKS = _fcntl is not None or _msvcrt is not None
_OWNER = re.compile(r"pid (\d+) on (\S+):")
_ORPHAN_AGE = 10.0  # seconds after which a lock file that names no owner (its writer died at once) is stale


class BusyError(CoderIndexError):
    """Another process holds the lock of the file or directory."""


def _try_lock(fd: int) -> bool:
    if _fcntl is not None:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    if _msvcrt is not None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    raise OSError("this platform offers no file lock (neither fcntl nor msvcrt)")


def _unlock(fd: int) -> None:
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    elif _msvcrt is not None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        _msvcrt.locking(fd, _msvcrt.LK_UNLCK, 1)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


class FileLock:
    """An exclusive lock on ``path`` for ``what`` (named in refusals, e.g. ``--out preds.csv``).

    ``wait``: seconds to wait for a holder to finish before ``BusyError`` (0: refuse at once).
    ``remove``: delete the lock file on release. Usable as a context manager."""

    def __init__(self, path: str | Path, what: str, *, wait: float = 0.0, remove: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.wait = max(0.0, float(wait))
        self.remove = remove
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, wait: float | None = None) -> bool:
        """Take the lock within ``wait`` seconds (default: the lock's own); False if another holds it."""
        give_up = time.monotonic() + (self.wait if wait is None else max(0.0, wait))
        pause = 0.005
        while True:
            owner = self._attempt()
            if owner is None:
                return True
            if time.monotonic() + pause > give_up:
                self._last_owner = owner
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def acquire(self) -> FileLock:
        """Take the lock, or raise ``BusyError`` naming the holder once the wait is over."""
        if not self.try_acquire():
            waited = f"; waited {self.wait:.0f} s" if self.wait >= 1 else ""
            # without the kernel's lock a pid can outlive its holder (reused, or another host's): say the way out
            stale = "" if KERNEL_LOCKS else f" (if no such process runs any more, delete {self.path})"
            raise BusyError(f"{self.what} is in use by another coder-index process ({self._last_owner or 'starting'})"
                            f"{waited}; wait for it to finish, or write elsewhere{stale}")
        return self

    def _attempt(self) -> str | None:
        """One try: None when the lock is now ours, else the holder's line."""
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.what} is already held by this object")
        if not KERNEL_LOCKS:
            return self._attempt_exclusive_file()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                got = _try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not got:
                owner = _read_owner(fd)
                os.close(fd)
                return owner
            if _same_file(fd, self.path):  # not unlinked by its last holder between our open and lock
                break
            _unlock(fd)
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv[:6])}\n".encode("utf-8", "replace"))
        except OSError:
            pass  # the owner's line is a courtesy; the lock is what counts
        return None

    # ------------------------------------------------------------------ no kernel lock
    def _attempt_exclusive_file(self) -> str | None:
        for _ in range(100):  # a holder releasing between our tries: try again at once
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._holder()
                if owner is None:
                    continue  # released meanwhile
                if self._stale(owner):
                    self._take_over(owner)
                    continue
                return owner
            self._fd = fd
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv[:6])}\n"
                     .encode("utf-8", "replace"))
            return None
        return self._holder() or "unknown"

    def _holder(self) -> str | None:
        """The lock file's owner line ('' while its creator has not written it yet); None when gone."""
        try:
            with open(self.path, "rb") as f:
                return f.read(4096).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None

    def _stale(self, owner: str) -> bool:
        m = _OWNER.match(owner)
        if m is None:  # no owner line: stale only once its creator has long had the time to write it
            try:
                return time.time() - self.path.stat().st_mtime > _ORPHAN_AGE
            except FileNotFoundError:
                return False
        return m.group(2) == socket.gethostname() and not pid_alive(int(m.group(1)))

    def _take_over(self, owner: str) -> None:
        """Delete a dead holder's lock file, under an exclusive breaker file, after checking again that
        it still names that holder (another waiter may have taken it over and locked it since)."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:  # a breaker whose process died mid-way
                if time.time() - breaker.stat().st_mtime > _ORPHAN_AGE:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return
        try:
            if self._holder() == owner:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not KERNEL_LOCKS:  # the file is the lock
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)
            return
        try:
            if self.remove:
                self.path.unlink(missing_ok=True)  # while still holding it: waiters re-check the inode
            else:
                try:
                    os.ftruncate(fd, 0)  # no stale owner named by the next refusal
                except OSError:
                    pass
        finally:
            try:
                _unlock(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    _last_owner = "unknown"
