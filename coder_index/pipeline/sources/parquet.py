"""Parquet files of images, local or by URL, read by row group: memory is bounded by a row group, not
the file. Each row group is one unit (``FILE#row-group-N``); rows are ``FILE/KEY``, the key taken from
the key column (img2dataset's ``key``) or, without one, the row's number in the file.

What a row holds is found from the schema, once per file (or named with the options):

* an image as bytes: a struct column with a ``bytes`` field (Hugging Face ``datasets``' ``Image``
  feature: ``{bytes, path}``), or a binary column (img2dataset's ``jpg``; ``png``, ``webp``,
  ``image``, ``img``);
* an image URL (img2dataset's input lists: ``url``): fetched with ``core.remote``'s retries; a URL
  that cannot be fetched is a read failure of that row, retried by the next run;
* a label (``label``, ``labels``, ``cls``): a class id, or a class name; ``datasets``' ``ClassLabel``
  names (from the schema's ``huggingface`` metadata) turn ids into names;
* a caption (``caption``, ``text``, ``txt``) and the other columns as the row's JSON metadata
  (img2dataset's ``url``, ``width``, ``status``, ...), kept by ``--save-embeddings``.

A row without an image (img2dataset keeps failed downloads, their ``jpg`` null) is a final error
row naming its ``status``. A file that cannot be opened, or a row group that cannot be read, is a
read failure, retried by the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from coder_index.core.errors import InputFormatError
from coder_index.core.remote import RemoteError, fetch_bytes, is_remote, local_path, open_random_access, public_url
from coder_index.core.untrusted import NotARegularFile
from coder_index.pipeline.sources.base import Event, ItemError, Listing, ReadFailure, Sample, UnitDone
from coder_index.pipeline.sources.files import MAX_REMOTE_IMAGE_BYTES

IMAGE_STRUCT_NAMES = ("image", "img", "jpg", "png", "webp", "picture")
IMAGE_BYTES_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
URL_NAMES = ("url", "URL", "image_url", "img_url", "image_uri")
KEY_NAMES = ("key", "__key__")
LABEL_NAMES = ("label", "labels", "cls", "class", "class_id")
CAPTION_NAMES = ("caption", "text", "txt", "TEXT", "Caption")
BATCH_ROWS = 64  # rows decoded from Arrow at a time, within a row group
META_BYTES = 1 << 16


@dataclass(frozen=True)
class Columns:
    """Which column holds what (``image_kind``: ``struct``, ``bytes`` or ``url``)."""

    image: str
    image_kind: str
    key: str | None = None
    label: str | None = None
    caption: str | None = None
    label_names: tuple[str, ...] = ()
    meta: tuple[str, ...] = ()

    def read(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.image, self.key, self.label, self.caption, *self.meta) if c))


@dataclass(frozen=True)
class ParquetOptions:
    """The columns named by the user (None: found from the schema)."""

    image_column: str | None = None
    key_column: str | None = None
    label_column: str | None = None


def find_columns(schema: Any, metadata: dict[bytes, bytes] | None, options: ParquetOptions, name: str) -> Columns:
    """The columns of a parquet file's schema, or a clear error naming the options."""
    import pyarrow as pa

    fields = {f.name: f for f in schema}

    def kind(f: Any) -> str | None:
        t = f.type
        if pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields)):
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "bytes"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "url"
        return None

    def pick(wanted: str | None, names: tuple[str, ...], what: str) -> str | None:
        if wanted is not None:
            if wanted not in fields:
                raise InputFormatError(f"{name} has no column {wanted!r} ({what}); its columns: {', '.join(fields)}")
            return wanted
        return next((n for n in names if n in fields), None)

    if options.image_column is not None:
        image = pick(options.image_column, (), "--image-column")
        assert image is not None
        image_kind = kind(fields[image])
        if image_kind is None:
            raise InputFormatError(f"{name}: column {image!r} holds {fields[image].type}, neither image bytes, a "
                                   "{bytes, path} struct nor URLs")
    else:
        by_kind = [(n, kind(fields[n])) for n in fields]
        image, image_kind = next(((n, k) for n, k in by_kind if k == "struct" and n.lower() in IMAGE_STRUCT_NAMES),
                                 next(((n, k) for n, k in by_kind if k == "struct"),
                                      next(((n, k) for n, k in by_kind if k == "bytes" and n.lower() in
                                            IMAGE_BYTES_NAMES),
                                           next(((n, k) for n, k in by_kind if k == "url" and n in URL_NAMES),
                                                (None, None)))))
        if image is None:
            raise InputFormatError(f"{name} has no image column (bytes, a {{bytes, path}} struct as Hugging Face "
                                   f"datasets writes, or image URLs); its columns: {', '.join(fields)}. Name it "
                                   "with --image-column")
    key = pick(options.key_column, KEY_NAMES, "--key-column")
    label = pick(options.label_column, LABEL_NAMES, "--label-column")
    caption = next((n for n in CAPTION_NAMES if n in fields and kind(fields[n]) == "url" and n != image), None)
    meta = tuple(n for n, f in fields.items() if n not in (image, key, label, caption) and kind(f) != "bytes"
                 and kind(f) != "struct")
    return Columns(image, image_kind or "bytes", key, label, caption, _class_label_names(metadata, label), meta)


def _class_label_names(metadata: dict[bytes, bytes] | None, label: str | None) -> tuple[str, ...]:
    """``datasets``' ClassLabel names of the label column, from the schema's ``huggingface`` metadata."""
    if not metadata or label is None or b"huggingface" not in metadata:
        return ()
    try:
        info = json.loads(metadata[b"huggingface"])
        feature = info.get("info", {}).get("features", {}).get(label, {})
        names = feature.get("names") if isinstance(feature, dict) else None
    except (ValueError, AttributeError, RecursionError):
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


@dataclass(frozen=True)
class RowGroupUnit:
    name: str          # FILE#row-group-N
    container: str     # FILE as rows name it (public)
    spec: str          # how to open it
    group: int
    first_row: int     # the file's row number of the group's first row
    columns: Columns
    position: int = 0
    skip: frozenset[str] = frozenset()
    metadata: Any = field(default=None, compare=False, repr=False)  # the file's footer, read once by the source
    size: int | None = None  # the file's size in bytes (a remote file: no request spent on it)
    single = False
    noun = "row group"

    def read(self) -> Iterator[Event]:
        import pyarrow.parquet as pq

        counts = {"found": 0, "hidden": 0, "other": 0}
        failed = False
        row_number = self.first_row
        try:
            with open_random_access(self.spec, size=self.size) as f:
                # a remote file: the row group's column chunks coalesced into as few range requests as pyarrow
                # can (pre_buffer); a local one is read as pyarrow asks
                batches = pq.ParquetFile(f, metadata=self.metadata, pre_buffer=is_remote(self.spec)).iter_batches(
                    batch_size=BATCH_ROWS, row_groups=[self.group], columns=self.columns.read(), use_threads=False)
                for batch in batches:
                    for row in batch.to_pylist():
                        for event in self._row(row, row_number):
                            failed = failed or isinstance(event, ReadFailure)
                            if isinstance(event, Sample):
                                counts["found"] += 1
                            yield event
                        row_number += 1
                del batches
            _release_arrow_memory()
        except RemoteError as exc:
            if exc.everywhere:
                raise
            yield ReadFailure(self.name, f"not read{self._after(row_number)}: {str(exc).split(': ', 1)[-1]}")
            return
        except Exception as exc:  # pyarrow's errors of a damaged file, an OSError of the disk
            yield ReadFailure(self.name, f"not read{self._after(row_number)}: the parquet file is damaged or cannot be "
                                         f"read ({exc.__class__.__name__}: {str(exc)[:300]})")
            return
        if not failed:
            yield UnitDone(self.name, counts=counts)

    def _after(self, row_number: int) -> str:
        return f" after row {row_number}" if row_number > self.first_row else ""

    def _row(self, row: dict[str, Any], number: int) -> Iterator[Event]:
        c = self.columns
        key = str(row[c.key]) if c.key and row.get(c.key) is not None else str(number)
        if key in self.skip:
            return
        label = row.get(c.label) if c.label else None
        if isinstance(label, int) and c.label_names and 0 <= label < len(c.label_names):
            label = c.label_names[label]
        out = f"{self.container}/{key}"
        value = row.get(c.image)
        ext = ""
        if c.image_kind == "struct" and isinstance(value, dict):
            ext = os.path.splitext(str(value.get("path") or ""))[1].lower()
            value = value.get("bytes")
        if c.image_kind == "url" and isinstance(value, str) and value:
            try:
                data = fetch_bytes(value, max_bytes=MAX_REMOTE_IMAGE_BYTES)
            except RemoteError as exc:
                if exc.everywhere:
                    raise
                yield ReadFailure(out, f"not read: {str(exc).split(': ', 1)[-1]}")
                return
            ext = os.path.splitext(value.split("?", 1)[0])[1].lower()
            value = data
        if not isinstance(value, (bytes, bytearray)) or not value:
            status = row.get("status")
            why = f" (status: {status})" if isinstance(status, str) and status else ""
            yield ItemError(out, f"skipped: no image in this row{why}", "row(s) without an image")
            return
        caption = row.get(c.caption) if c.caption else None
        meta = {m: _shown(row.get(m)) for m in c.meta}
        meta_text = json.dumps(meta, default=str, ensure_ascii=False)[:META_BYTES] if meta else None
        yield Sample(out, data=bytes(value), ext=ext, key=key, container=self.container,
                     caption=str(caption) if caption is not None else None, meta=meta_text, label=label)

    def split(self, parts: int) -> list[RowGroupUnit]:
        return [self]


@dataclass
class ParquetSource:
    specs: list[str]
    options: ParquetOptions = field(default_factory=ParquetOptions)
    what: str = "the parquet files hold"
    units_per_task: int = 1
    listing: Listing = field(default_factory=Listing)

    def units(self) -> Iterator[RowGroupUnit | ItemError | ReadFailure]:
        position = 0
        for spec in self.specs:
            name = public_url(spec) if is_remote(spec) else os.path.normpath(local_path(spec))
            where = spec if is_remote(spec) else os.path.abspath(name)
            try:
                groups, columns, metadata, size = _layout(where, name, self.options)
            except RemoteError as exc:
                if exc.everywhere:
                    raise
                yield ReadFailure(name, f"not read: {str(exc).split(': ', 1)[-1]}")
                continue
            except FileNotFoundError:
                yield ReadFailure(name, "not read: no such file")
                continue
            except NotARegularFile:
                yield ItemError(name, "skipped: not a regular file (a FIFO, socket, device or directory)",
                                "inputs that are not files")
                continue
            except InputFormatError:
                raise
            except Exception as exc:
                yield ReadFailure(name, f"not read: not a parquet file, or a damaged one ({exc.__class__.__name__}: "
                                        f"{str(exc)[:300]})")
                continue
            first = 0
            for i, rows in enumerate(groups):
                yield RowGroupUnit(f"{name}#row-group-{i}", name, where, i, first, columns, position,
                                   metadata=metadata, size=size)
                position += 1
                first += rows

    def record(self) -> dict[str, Any]:
        names = [public_url(s) if is_remote(s) else os.path.normpath(local_path(s)) for s in self.specs]
        return {"cwd": os.getcwd(), "kind": "parquet", "files": names[:100_000],
                **{k: v for k, v in vars(self.options).items() if v is not None}}


def _layout(spec: str, name: str, options: ParquetOptions) -> tuple[list[int], Columns, Any, int | None]:
    """The row counts of a file's row groups, its columns, its footer and its size (the footer only is
    read; the units carry it, so that no worker reads it again)."""
    import pyarrow.parquet as pq

    from coder_index.core.remote import RangeReader

    with open_random_access(spec) as f:
        meta = pq.ParquetFile(f).metadata
        raw = getattr(f, "raw", None)
        size = raw.size if isinstance(raw, RangeReader) else os.fstat(f.fileno()).st_size
        schema = meta.schema.to_arrow_schema()
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return groups, find_columns(schema, schema.metadata, options, name), meta, size


def _release_arrow_memory() -> None:
    """Hand the row group's buffers back to the system (Arrow's allocator keeps them otherwise): a
    worker's memory is one row group at a time, not its largest so far times the groups it read."""
    import pyarrow as pa

    try:
        pa.default_memory_pool().release_unused()
    except AttributeError:  # pyarrow before 9
        pass


def _shown(value: Any) -> Any:
    """A metadata value as it may be written: a URL without its credentials or signing parameters."""
    from coder_index.core.remote import is_url

    return public_url(value) if isinstance(value, str) and is_url(value) else value


def is_parquet_name(name: str) -> bool:
    return name.lower().endswith(".parquet")


def find_row(spec: str, key: str, options: ParquetOptions) -> bytes | None:
    """The image bytes of the row named ``key`` (its key column's value, or its row number) of a parquet
    file, read row group by row group (the key column first, the image only of the group that holds it)."""
    import pyarrow.parquet as pq

    name = public_url(spec) if is_remote(spec) else spec
    groups, columns, metadata, size = _layout(spec, name, options)
    with open_random_access(spec, size=size) as f:
        pf = pq.ParquetFile(f, metadata=metadata)
        first = 0
        for i, rows in enumerate(groups):
            if columns.key is None:
                if not key.isdigit() or not first <= int(key) < first + rows:
                    first += rows
                    continue
                at = int(key) - first
            else:
                keys = pf.read_row_group(i, columns=[columns.key]).column(0).to_pylist()
                at = next((j for j, k in enumerate(keys) if k is not None and str(k) == key), None)
                if at is None:
                    first += rows
                    continue
            unit = RowGroupUnit(f"{name}#row-group-{i}", name, spec, i, first, columns, size=size)
            row = pf.read_row_group(i, columns=columns.read()).slice(at, 1).to_pylist()[0]
            for event in unit._row(row, first + at):
                if isinstance(event, Sample):
                    return event.data
                if isinstance(event, (ItemError, ReadFailure)):
                    return None
            return None
    return None
