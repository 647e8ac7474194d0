"""One image of a container, by its row: what ``explain --predictions`` and ``serve`` read to show a
row of a shard (``SHARD/KEY``) or of a parquet file (``FILE.parquet/KEY``). A row is data: a
``pipe:`` command named by a row is never run again."""

from __future__ import annotations

from coder_index.core.decode import ImageDecodeError
from coder_index.core.remote import RemoteError, is_remote, local_path, open_stream
from coder_index.core.untrusted import open_regular_file
from coder_index.pipeline.sources.parquet import ParquetOptions, find_row, is_parquet_name
from coder_index.pipeline.sources.shards import is_shard_name
from coder_index.pipeline.sources.tar_samples import find_sample


def split_container_row(row: str) -> tuple[str, str] | None:
    """(container, key) of a ``CONTAINER/KEY`` row: the longest prefix named like a shard or a parquet
    file (a URL holds slashes, a key may too)."""
    at = len(row)
    while (at := row.rfind("/", 0, at)) > 0:
        container = row[:at]
        base = container.split("?", 1)[0]
        if is_shard_name(base) or is_parquet_name(base):
            return container, row[at + 1:]
    return None


def container_image(container: str, key: str, parquet: ParquetOptions | None = None) -> bytes:
    """The image bytes of sample ``key`` of a shard or parquet file (local path or URL), or
    ``ImageDecodeError`` saying why not."""
    if container.startswith("pipe:"):
        raise ImageDecodeError("read from a pipe: command, which is never run again from a row (a predictions "
                               "file is data); classify the image as a file to explain it")
    try:
        if is_parquet_name(container.split("?", 1)[0]):
            data = find_row(container, key, parquet or ParquetOptions())
        elif is_remote(container):
            with open_stream(container) as f:
                data = find_sample(f, key, seekable=False)
        else:
            with open_regular_file(local_path(container)) as f:
                data = find_sample(f, key, seekable=True)
    except RemoteError as exc:
        raise ImageDecodeError(str(exc)) from None
    except FileNotFoundError:
        raise ImageDecodeError(f"{container} does not exist any more") from None
    except Exception as exc:  # a damaged tar or parquet file
        raise ImageDecodeError(f"{container} cannot be read ({exc.__class__.__name__}: {exc})") from None
    if data is None:
        raise ImageDecodeError(f"no sample {key} with an image in {container}")
    return data

