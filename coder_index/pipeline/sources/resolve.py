"""The one place where what the user typed becomes a source: a folder, image files (arguments,
``--files-from``; paths or URLs), webdataset shards, or parquet files.

Brace patterns expand exactly as webdataset expands them (the ``braceexpand`` package), inside
``pipe:`` commands too: ``'pipe:aws s3 cp s3://bucket/shard-{000..099}.tar -'`` is one hundred
commands, one per shard, each its own unit with its own rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from coder_index.core.choices import IMAGE_EXTENSIONS
from coder_index.core.errors import InputFormatError
from coder_index.core.remote import (
    RemoteError,
    check_reachable,
    filesystem,
    is_remote,
    local_path,
    path_part,
    public_url,
    redacted,
)
from coder_index.pipeline.sources.file_list import ListSource
from coder_index.pipeline.sources.folder import FolderSource
from coder_index.pipeline.sources.parquet import ParquetOptions, ParquetSource, is_parquet_name
from coder_index.pipeline.sources.shards import ShardSource, is_shard_name

MAX_EXPANDED = 1_000_000  # names one brace pattern may expand to (LAION-5B is about 230,000 shards)


class UsageError(InputFormatError):
    """What was typed does not name an input coder-index can read (the CLI shows it as a usage error)."""


def has_braces(spec: str) -> bool:
    return "{" in spec and "}" in spec


def expand_braces(spec: str) -> list[str]:
    """``data/{00000..00099}.tar`` (zero padding kept), ``{a,b}`` lists, nested, as webdataset expands
    them; a name without braces is itself."""
    import braceexpand

    out: list[str] = []
    for name in braceexpand.braceexpand(spec):
        out.append(name)
        if len(out) > MAX_EXPANDED:
            raise UsageError(f"{public_url(spec)} expands to more than {MAX_EXPANDED:,} names; split it into "
                             "several runs")
    return out


def container_kind(spec: str) -> str | None:
    """``shards`` or ``parquet`` for a name that says so (a ``pipe:`` command is a shard), else None."""
    if spec.startswith("pipe:"):
        return "shards"
    name = path_part(spec) if is_remote(spec) else local_path(spec)
    if is_shard_name(name):
        return "shards"
    if is_parquet_name(name):
        return "parquet"
    return None


def _folder_kind(path: str) -> str | None:
    """``shards`` or ``parquet`` for a local folder holding only those (no images, no subfolders)."""
    try:
        names = [n for n in os.listdir(path) if not n.startswith(".")]
    except OSError:
        return None
    if any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names) or \
            any(os.path.isdir(os.path.join(path, n)) for n in names):
        return None
    kinds = {container_kind(n) for n in names} - {None}
    return kinds.pop() if len(kinds) == 1 else None


def _list_folder(spec: str, kind: str) -> list[str]:
    """The shards or parquet files directly in a folder (local, or remote: ``s3://bucket/prefix/``), sorted."""
    if is_remote(spec):
        fs, path = filesystem(spec)
        try:
            names = fs.ls(path, detail=False)
        except Exception as exc:
            raise RemoteError(f"cannot list {public_url(spec)}: {redacted(str(exc), spec)}", fatal=True) from None
        scheme = spec.split("://", 1)[0]
        found = sorted(f"{scheme}://{n.lstrip('/')}" for n in names
                       if container_kind(n) == kind and not n.rsplit("/", 1)[-1].startswith("."))
    else:
        path = local_path(spec)
        found = [os.path.normpath(os.path.join(path, n)) for n in sorted(os.listdir(path))
                 if container_kind(n) == kind and not n.startswith(".")]
    if not found:
        what = "shards (.tar, .tar.gz, .tgz)" if kind == "shards" else "parquet files"
        raise UsageError(f"{public_url(spec)} holds no {what}")
    return found


def classify_input(spec: str) -> str:
    """What one argument is: ``shards``, ``parquet``, ``folder`` or ``files`` (an image file or URL)."""
    kind = container_kind(spec)
    if kind is not None:
        return kind
    if is_remote(spec):
        return "remote-folder" if path_part(spec).endswith("/") else "files"
    path = local_path(spec)
    if os.path.isdir(path):
        return _folder_kind(path) or "folder"
    return "files"


def open_source(inputs: Iterable[str], files_from: Iterable[str] | None = None, *,
                parquet: ParquetOptions | None = None) -> Any:
    """The source of classify's arguments and ``--files-from`` lines (a stream, read as the run goes)."""
    inputs = [str(i) for i in inputs]
    check_reachable([i for i in inputs if is_remote(i)])  # a missing driver is one line, before the model loads
    specs: list[tuple[str, str]] = []  # (kind, spec)
    for given in inputs:
        expanded = expand_braces(given) if has_braces(given) else [given]
        for spec in expanded:
            kind = classify_input(spec)
            if kind == "remote-folder":
                kinds = [k for k in ("shards", "parquet") if _has(spec, k)]
                kind = kinds[0] if kinds else "shards"
                specs += [(kind, s) for s in _list_folder(spec, kind)]
            elif kind in ("shards", "parquet") and not is_remote(spec) and os.path.isdir(local_path(spec)):
                specs += [(kind, s) for s in _list_folder(spec, kind)]
            else:
                specs.append((kind, spec))
    kinds = {k for k, _ in specs} | ({"files"} if files_from is not None else set())
    if len(kinds) > 1:
        odd = next(s for k, s in specs if k != specs[0][0]) if len({k for k, _ in specs}) > 1 else "--files-from"
        raise UsageError(f"{public_url(odd)} is not like the other inputs: classify one folder, image files "
                         "(arguments and/or --files-from), webdataset shards, or parquet files, in one run")
    if not kinds:
        raise UsageError("name a FOLDER, image files, shards, parquet files, or --files-from LIST")
    kind = kinds.pop()
    names = [s for _, s in specs]
    if kind == "folder":
        if len(names) > 1 or files_from is not None:
            raise UsageError(f"{names[0]} is a folder: classify one folder, or image files (arguments and/or "
                             "--files-from), in one run")
        return FolderSource(local_path(names[0]))
    if kind in ("shards", "parquet"):
        names = list(dict.fromkeys(names))
        local = [n for n in names if not is_remote(n)]
        missing = [n for n in local if not os.path.exists(local_path(n))]
        if missing and len(missing) == len(names):  # nothing at all to read: a typo, not a missing unit
            raise UsageError(f"no such {'shard' if kind == 'shards' else 'parquet file'}: {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if kind == "shards":
            return ShardSource(names)
        source = ParquetSource(names, parquet or ParquetOptions())
        _check_first_parquet(source)
        return source
    absent = [n for n in names if not is_remote(n) and not os.path.lexists(local_path(n))]
    if absent and files_from is None and len(absent) == len(names):
        raise UsageError(f"{absent[0]}: no such file or folder")
    return ListSource(_chain(names, files_from))


def _has(spec: str, kind: str) -> bool:
    try:
        _list_folder(spec, kind)
        return True
    except UsageError:
        return False


def _check_first_parquet(source: ParquetSource) -> None:
    """The first readable file's columns, before the run starts: a wrong --image-column is one line now."""
    from coder_index.pipeline.sources.parquet import _layout

    for spec in source.specs[:1]:
        where = spec if is_remote(spec) else os.path.abspath(local_path(spec))
        if not is_remote(spec) and not os.path.exists(where):
            return
        try:
            _layout(where, public_url(spec), source.options)
        except (InputFormatError, RemoteError) as exc:
            if isinstance(exc, RemoteError) and not exc.everywhere:
                return  # that file's own failure: its row of the errors file says it
            raise


def _chain(names: list[str], more: Iterable[str] | None) -> Iterator[str]:
    yield from names
    if more is not None:
        yield from more


def input_kind(spec: str) -> str:
    """``classify_input`` of what a brace pattern names (its first name)."""
    return classify_input(expand_braces(spec)[0] if has_braces(spec) else spec)


def labelled_source(data: str, parquet: ParquetOptions | None = None) -> Any:
    """The source of ``eval``'s DATA when it is labelled shards or parquet files (a file, a brace
    pattern, a folder of them, local or remote), else None (a class folder or a labels CSV)."""
    kind = input_kind(data)
    if kind == "remote-folder":
        kind = next((k for k in ("shards", "parquet") if _has(data, k)), "folder")
    if kind not in ("shards", "parquet"):
        return None
    return open_source([data], parquet=parquet)
