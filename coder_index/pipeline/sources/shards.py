"""webdataset tar shards: local files, compressed or not, URLs (``https://``, ``s3://``, ``gs://``, ...)
and ``pipe:`` commands, each one unit, read front to back by ``tar_samples`` (the one grouping
stage). Rows are ``SHARD/KEY``: the shard as given (a local path normalised, a URL or command by its
public form: no credentials, no signing parameters, so a freshly signed URL names the same rows).

A local uncompressed shard is read in place: its members are seeked over, and it can be split
between decoding workers (each reads every n-th sample), so that one large shard keeps every worker
busy. A stream is read once, by one worker. A shard that cannot be opened or read to its end is a
read failure, retried by the next run; a refusal for every shard (credentials, a bucket) stops the
run at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from coder_index.core.remote import RemoteError, is_remote, local_path, open_stream, public_url
from coder_index.core.untrusted import NotARegularFile, open_regular_file
from coder_index.pipeline.sources.base import Event, ItemError, Listing, ReadFailure
from coder_index.pipeline.sources.files import file_kind
from coder_index.pipeline.sources.tar_samples import tar_samples

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class ShardUnit:
    name: str          # the row prefix: the shard as given, public
    spec: str          # how to open it (a local absolute path, a URL, a command)
    position: int = 0
    skip: frozenset[str] = frozenset()
    part: int = 0
    parts: int = 1
    single = False
    noun = "shard"

    @property
    def container(self) -> str:
        return self.name

    def read(self) -> Iterator[Event]:
        take = None if self.parts == 1 else (lambda ordinal: ordinal % self.parts == self.part)
        if is_remote(self.spec):
            try:
                stream = open_stream(self.spec)
            except RemoteError as exc:
                if exc.everywhere:
                    raise
                yield ReadFailure(self.name, f"not read: {_reason(exc)}")
                return
            with stream:
                yield from tar_samples(stream, self.name, seekable=False, skip=self.skip, unit=self.name)
            return
        try:
            st = os.stat(self.spec)
        except FileNotFoundError:
            yield ReadFailure(self.name, "not read: no such shard")
            return
        except OSError as exc:
            yield ReadFailure(self.name, f"not read: {exc.strerror or exc}")
            return
        try:
            f = open_regular_file(self.spec)  # a FIFO named like a shard never blocks the read
        except NotARegularFile:
            yield ItemError(self.name, f"skipped: {file_kind(st.st_mode)}, not a shard file",
                            "inputs that are not files")
            return
        except OSError as exc:
            yield ReadFailure(self.name, f"not read: {exc.strerror or exc}")
            return
        with f:
            yield from tar_samples(f, self.name, seekable=True, skip=self.skip, take=take, part=self.part,
                                   parts=self.parts, unit=self.name)

    def split(self, parts: int) -> list[ShardUnit]:
        """A local uncompressed tar read by ``parts`` workers, each taking every ``parts``-th sample
        (headers are cheap to skip over in a file); a stream or a compressed file stays whole."""
        if parts <= 1 or is_remote(self.spec):
            return [self]
        try:
            with open_regular_file(self.spec) as f:
                if f.read(6).startswith(_COMPRESSED):
                    return [self]
        except OSError:
            return [self]
        return [replace(self, part=i, parts=parts) for i in range(parts)]


def _reason(exc: RemoteError) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


def shard_unit(spec: str, position: int) -> ShardUnit:
    if is_remote(spec):
        return ShardUnit(public_url(spec), spec, position)
    path = os.path.normpath(local_path(spec))
    return ShardUnit(path, os.path.abspath(path), position)


class ShardSource:
    what = "the shards hold"
    units_per_task = 1

    def __init__(self, specs: list[str]) -> None:
        self.specs = specs
        self.listing = Listing()

    def units(self) -> Iterator[ShardUnit]:
        for position, spec in enumerate(self.specs):
            yield shard_unit(spec, position)

    def record(self) -> dict[str, Any]:
        return {"cwd": os.getcwd(), "kind": "shards",
                "shards": [shard_unit(s, 0).name for s in self.specs[:MAX_RECORDED]]}


MAX_RECORDED = 100_000
