"""One-image units: a local file, or an image URL. Each is its own row, named as the source names it.

A file that is not there (removed since it was listed, never there, a broken link), cannot be
opened (permission), or a URL that cannot be fetched (404, retries spent) is a ``ReadFailure``: a
rerun retries it. A file that is there but is no image file (a FIFO, a socket, a device, a folder)
is a final ``ItemError``; so is an image that does not decode (found out later, by the feed).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from coder_index.pipeline.sources.base import Event, ItemError, ReadFailure, Sample

MAX_REMOTE_IMAGE_BYTES = 256 << 20


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


_KIND_OF = {"a directory": "folder(s) named as image files"}


@dataclass(frozen=True)
class FileUnit:
    """A local image file (``path``: absolute, so that a worker elsewhere reads the same file), its row
    named ``row``. The file is opened, checked and decoded by the feed, in the worker."""

    name: str
    path: str
    position: int = 0
    skip: frozenset[str] = frozenset()
    single = True
    noun = "file"
    container = None

    def read(self) -> Iterator[Event]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            why = "a broken symbolic link" if os.path.islink(self.path) else "no such file"
            yield ReadFailure(self.name, f"not read: {why}")
            return
        except OSError as exc:
            yield ReadFailure(self.name, f"not read: {exc.strerror or exc}")
            return
        if not stat.S_ISREG(st.st_mode):
            what = file_kind(st.st_mode)
            yield ItemError(self.name, f"skipped: {what}, not a regular file",
                            _KIND_OF.get(what, "FIFO(s), socket(s) or device(s)"))
            return
        if not os.access(self.path, os.R_OK):
            yield ReadFailure(self.name, "not read: permission denied")
            return
        yield Sample(self.name, path=self.path, ext=os.path.splitext(self.path)[1].lower(), position=self.position)

    def split(self, parts: int) -> list[FileUnit]:
        return [self]


@dataclass(frozen=True)
class UrlUnit:
    """An image URL (a file list's line, a labels CSV's path): its row is the URL's public form (no
    credentials); its bytes are fetched in the worker with ``core.remote``'s retries."""

    name: str
    url: str
    position: int = 0
    skip: frozenset[str] = frozenset()
    single = True
    noun = "URL"
    container = None

    def read(self) -> Iterator[Event]:
        from coder_index.core.remote import RemoteError, fetch_bytes, path_part

        try:
            data = fetch_bytes(self.url, max_bytes=MAX_REMOTE_IMAGE_BYTES)
        except RemoteError as exc:
            if exc.everywhere:
                raise
            yield ReadFailure(self.name, f"not read: {str(exc).split(': ', 1)[-1]}")
            return
        yield Sample(self.name, data=data, ext=os.path.splitext(path_part(self.url))[1].lower(),
                     position=self.position)

    def split(self, parts: int) -> list[UrlUnit]:
        return [self]


def url_unit(url: str, position: int = 0) -> UrlUnit:
    from coder_index.core.remote import public_url

    return UrlUnit(public_url(url), url, position)



def units_of(paths: list[Any]) -> list[FileUnit | UrlUnit]:
    """One-image units of local files (``Path`` or ``str``) and image URLs (``str``), each named as
    given (a URL by its public form), in order: ``position`` is the index in ``paths``."""
    from coder_index.core.remote import is_url

    out: list[FileUnit | UrlUnit] = []
    for i, p in enumerate(paths):
        if isinstance(p, str) and is_url(p):
            out.append(url_unit(p, i))
        else:
            out.append(FileUnit(str(p), os.path.abspath(p), i))
    return out
