"""Image files named one by one (command-line arguments, ``--files-from``): local paths, read
relative to the working directory, and image URLs. A row names a file as given (normalised), a URL
by its public form (no credentials). The list is a stream: it is read once, as the run goes.

A list is data: a ``pipe:`` command in it is never run (a final error row says so); a shard in it is
not an image (shards are given as arguments). Each file or URL is its own unit: a missing one is a
read failure that a rerun retries, as a missing shard is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from coder_index.core.remote import is_url, local_path, public_url
from coder_index.pipeline.sources.base import ItemError, Listing
from coder_index.pipeline.sources.files import FileUnit, UrlUnit

SHARD_NAMES = (".tar", ".tar.gz", ".tgz", ".parquet")


class ListSource:
    what = "the listed files hold"
    units_per_task = 64

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = paths
        self.listing = Listing()

    def units(self) -> Iterator[FileUnit | UrlUnit | ItemError]:
        seen: set[str] = set()
        position = 0
        for given in self.paths:
            if not given:
                continue
            if given.startswith("pipe:"):  # a list is data: a command in it is never run
                if given not in seen:
                    seen.add(given)
                    yield ItemError(public_url(given), "skipped: a pipe: command runs only when given as a shard on "
                                                       "the command line, never from a file list",
                                    "pipe: command(s) in a file list")
                continue
            if is_url(given):
                name = public_url(given)
                if name not in seen:
                    seen.add(name)
                    yield UrlUnit(name, given, position)
                    position += 1
                continue
            path = os.path.normpath(local_path(given))
            if path in seen:
                continue
            seen.add(path)
            if path.lower().endswith(SHARD_NAMES) and os.path.isfile(path):
                yield ItemError(path, "skipped: a webdataset shard or parquet file, not an image; classify those "
                                      "given as arguments (classify SHARD.tar ...), not listed in --files-from",
                                "shard(s) in a file list")
                continue
            yield FileUnit(path, os.path.abspath(path), position)
            position += 1

    def record(self) -> dict[str, Any]:
        return {"cwd": os.getcwd(), "kind": "files"}
