"""The one file identity: when a cache may trust that a file still holds the bytes it once read.

Every cache keyed by a file's status (weights fingerprints, image embeddings, serve's thumbnails)
uses ``FileIdentity``: the real path, device, inode, size, and modification and status-change times
in nanoseconds.

* Rewritten in place, even to the same size with the old modification time put back (``rsync -t``,
  ``cp -p``, ``touch -r``, an archive extraction): the status-change time moves, and no user can
  set it back.
* Replaced by a rename: another inode. Touched: another modification time.
* **Racy files** are never trusted: a file changed less than ``SETTLE_SECONDS`` before it was
  identified could change again within the file system's timestamp granularity without any field
  moving (git guards its index against the same case). ``identify`` answers None for such a file,
  and the cache neither stores nor reads an entry for it; the next run, once it has settled, does.

Take the identity *before* reading the bytes a cache entry is made from: a change during the read
then moves the status-change time past the identity stored with it, and the entry never matches.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import astuple, dataclass
from pathlib import Path

SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class FileIdentity:
    path: str        # the real path (links resolved)
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def as_tuple(self) -> tuple[str, int, int, int, int, int]:
        return astuple(self)  # type: ignore[return-value]

    def same_file(self, other: FileIdentity | None) -> bool:
        return other is not None and self.as_tuple() == other.as_tuple()


# What "now" is for the settle rule: the system's clock. Tests replace it with a clock they move forward,
# instead of sleeping until a file counts as settled.
clock = time.time


def from_stat(path: str, st: os.stat_result, now: float | None = None) -> FileIdentity | None:
    """The identity of a regular file from its ``stat`` (None: not a regular file, or racy)."""
    if not stat.S_ISREG(st.st_mode):
        return None
    now = clock() if now is None else now
    if now - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < SETTLE_SECONDS:
        return None
    return FileIdentity(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identify(path: str | Path, now: float | None = None) -> FileIdentity | None:
    """The identity of the file at ``path`` (links followed), or None: missing, not a regular file,
    or changed in the last ``SETTLE_SECONDS`` (a cache must not trust it yet)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return from_stat(real, st, now)


def identify_open(fd: int, path: str | Path | None = None, now: float | None = None) -> FileIdentity | None:
    """The identity of an opened file (what was opened is what is identified, whatever the name
    leads to meanwhile); ``path`` (its name, if known) is recorded as its real path, else ''."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return from_stat(os.path.realpath(path) if isinstance(path, (str, Path)) else "", st, now)
