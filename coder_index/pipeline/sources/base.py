"""What every input source gives the runner: units, and the events of reading one.

A **source** (a folder, a file list, webdataset shards, parquet files) lists its **units** in a
stable order: the pieces it is read and resumed by (one image file or URL; one shard; one parquet
row group). A unit is small and picklable: it is read where the work happens (a decoding worker, a
Ray actor), and reading it yields **events**:

* ``Sample``: an image to classify, with its one stable row name (``FOLDER/rel``, a listed path or
  URL as given, ``SHARD/KEY``, ``FILE.parquet/KEY``) and what travels with it (caption, JSON
  sidecar, label);
* ``ItemError``: this image cannot be classified, for good (not an image, no image in a sample, a
  second image in a sample): one final row of ``OUT.errors.csv``;
* ``ReadFailure``: something could not be *read* (a missing file or shard, a 404, a command that
  exits non-zero, a corrupt stream, retries spent): one row of ``OUT.errors.csv`` that a rerun
  retries, named by what failed (a unit, or one item of a unit);
* ``UnitDone``: a part of a multi-image unit was read to its end with no read failure (its counts
  for the summary). The runner marks the unit done (``OUT.units-done``) once every part is.

A refusal that no retry can fix and that applies to every unit (no credentials, authentication
refused, a bucket that does not exist) is raised as ``RemoteError(fatal=True)``: the run stops at
once with that one line.

The runner decides nothing by kind: a unit is done when OUT holds a row (or a final error) named as
the unit (a one-image unit) or ``OUT.units-done`` names it (a unit of many images, whose images
already in OUT are passed to it as ``skip``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Protocol

_JPEG_NAMES = (".jpg", ".jpeg", ".jpe", ".jfif")


@dataclass
class Sample:
    """One image to classify. ``data`` holds its bytes, or ``path`` names a local file that is read
    when it is decoded (a large file is never read into memory twice)."""

    row: str
    data: bytes | None = None
    path: str | None = None
    ext: str = ""                   # the image's extension as named ('.jpg'), '' when unknown
    key: str | None = None          # the sample's key in its container (shards, parquet)
    container: str | None = None    # the container as the row names it (``SHARD`` of ``SHARD/KEY``)
    caption: str | None = None
    meta: str | None = None         # a JSON sidecar, as text
    label: int | str | None = None  # labelled sources: a class id or a class name
    position: int = 0               # the unit's place in the list it was given in

    def open(self) -> BinaryIO:
        """The image's bytes as a file (a local file opened only if it is a regular file)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        from coder_index.core.untrusted import open_regular_file

        assert self.path is not None
        return open_regular_file(self.path)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with self.open() as f:
            return f.read()

    def jpeg_named(self) -> bool:
        """Whether the image says it is a JPEG (by name, or by its first bytes when it has no name)."""
        if self.ext:
            return self.ext.lower().endswith(_JPEG_NAMES)
        return self.data is not None and self.data[:3] == b"\xff\xd8\xff"

    def without_bytes(self) -> Sample:
        """The sample once decoded: only its pixels travel on."""
        return replace(self, data=None) if self.data is not None else self


@dataclass
class ItemError:
    """An image that cannot be classified, for good: a final row of the errors file. ``kind`` names
    the category of an input skipped before decoding, for the summary (None: a decoding failure)."""

    row: str
    reason: str
    kind: str | None = None


@dataclass
class ReadFailure:
    """A unit, or one item of a unit, that could not be read: an errors-file row a rerun retries."""

    row: str
    reason: str


@dataclass
class UnitDone:
    """Part ``part`` of ``parts`` of unit ``unit`` read to its end, with nothing left unread."""

    unit: str
    part: int = 0
    parts: int = 1
    counts: dict[str, int] = field(default_factory=dict)  # found, hidden, other


Event = Sample | ItemError | ReadFailure | UnitDone


class Unit(Protocol):
    """A piece of a source, read in one go where the work happens (picklable, holds no handle)."""

    name: str        # stable: a one-image unit's row name, a shard's public name, FILE#row-group-N
    single: bool     # one image named ``name`` (its row marks it done), or many (``UnitDone`` does)
    position: int    # its place in the source's order
    skip: frozenset[str]  # keys of its images already in OUT (units of many images)
    noun: str        # what it is, for messages: "file", "URL", "shard", "row group"
    container: str | None  # the row prefix of its images (``CONTAINER/KEY``); None for a one-image unit

    def read(self) -> Iterator[Event]: ...

    def split(self, parts: int) -> list[Unit]:
        """The unit as ``parts`` units that each read a share of its images, where that costs little
        more than reading it once (a local tar: headers are skipped over); else ``[self]``."""
        ...


@dataclass
class Listing:
    """What a source saw while listing, for the summary: files that are not images, hidden entries."""

    other_files: int = 0
    hidden: int = 0


class Source(Protocol):
    """An input: its units in order, what a run record keeps of it, and how it is named."""

    listing: Listing
    what: str          # "the folder photos/", "the listed files", "the shards", "the parquet files"
    units_per_task: int  # units handed to one remote task (Ray): many small ones, or one large one

    def units(self) -> Iterator[Unit | ItemError | ReadFailure]:
        """Its units in a stable order, streamed; what fails while listing comes in between."""
        ...

    def record(self) -> dict[str, Any]:
        """What the run record keeps of this input (explain and serve find rows' images from it)."""
        ...


def with_skip(unit: Any, skip: set[str] | frozenset[str]) -> Any:
    """The unit, told which of its images OUT already holds."""
    return replace(unit, skip=frozenset(skip)) if skip else unit
