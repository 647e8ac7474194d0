"""webdataset shards read as a stream: remote ones (``https://``, ``s3://``, ``gs://``, ``pipe:``, ...) and
compressed ones (``.tar.gz``, ``.tgz``), read front to back once, as webdataset reads them.

A shard is opened through ``core.remote`` (bounded retries that go on from the byte where a read
failed; refusals stop the run), decompressed on the fly when it is compressed, and its members are
grouped into samples by key as they pass. Nothing is written to the local disk and nothing is held
but the sample being read: memory is bounded by the batches in flight, not by the shard.

The decoding workers each stream whole shards (worker w of W takes shards w, w + W, ...), so shards
are read in parallel and every sample is read once. A resumed run skips the shards the run record
says are complete without opening them, and the samples OUT already holds without decoding them.

Rows are named ``SHARD/KEY`` with the shard's public form (``core.remote.public_url``: no
credentials, no signing parameters), so a rerun with a freshly signed URL names the same rows.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from coder_index.core.decode import IMAGE_EXTENSIONS
from coder_index.core.remote import RemoteError, open_stream, public_url
from coder_index.pipeline.shards import SIDECAR_BYTES, Member, extra_image_row, extra_images, split_key

MAX_IMAGE_BYTES = 256 << 20  # an image member larger than this is reported, not read into memory


@dataclass
class ShardPlan:
    """The shards of a streamed run: each spec with its public name, the keys OUT already holds per
    shard (skipped, not decoded) and the shards the run record lists as complete (not opened)."""

    specs: list[str]
    done_keys: dict[str, set[str]] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)

    def names(self) -> list[str]:
        return [public_url(s) for s in self.specs]

    def __len__(self) -> int:  # unknown until read: the progress bar counts as samples arrive
        return 0


@dataclass
class Event:
    """What the stream of one shard gives: a ``sample`` (row, bytes and sidecars), an ``error`` row
    (a sample or the shard that cannot be read), the shard ``done`` (with its ``counts``: samples
    found, hidden, without an image), or ``fatal`` (a refusal: the run stops)."""

    kind: str
    row: str = ""
    sample: Member | None = None
    reason: str = ""
    counts: dict[str, int] | None = None


def stream_events(spec: str, done_keys: set[str] | None = None) -> Iterator[Event]:
    """The events of one shard, in tar order; a failure of the shard after some samples is an error
    row naming it (the samples before are kept), a refusal a ``fatal`` event."""
    name = public_url(spec)
    done_keys = done_keys or set()
    seen = 0
    counts = {"found": 0, "hidden": 0, "other": 0}
    try:
        reader = open_stream(spec)
    except RemoteError as exc:
        yield Event("fatal" if exc.fatal else "error", name, reason=str(exc))
        return
    try:
        try:
            tf = tarfile.open(fileobj=reader, mode="r|*")  # gzip, bzip2 and xz recognised by their bytes
        except RemoteError as exc:
            yield Event("fatal" if exc.fatal else "error", name, reason=_shard_reason(exc, 0))
            return
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Event("error", name, reason=_not_a_tar(exc))
            return
        group_key: str | None = None
        group: list[tuple[tarfile.TarInfo, bytes | None]] = []
        with tf:
            try:
                for info in tf:
                    seen += 1
                    if info.isdir():
                        continue
                    key, _ = split_key(info.name)
                    if key != group_key and group:
                        yield from _sample(name, group_key, group, done_keys, counts)  # type: ignore[arg-type]
                        group = []
                    group_key = key
                    group.append((info, _member_bytes(tf, info, key in done_keys)))
                if group:
                    yield from _sample(name, group_key, group, done_keys, counts)  # type: ignore[arg-type]
                    group = []
                problem = _end_problem(tf)
            except RemoteError as exc:
                if exc.fatal:
                    yield Event("fatal", name, reason=str(exc))
                    return
                problem = _shard_reason(exc, seen)
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # zlib.error is an Exception too
                problem = f"the tar is truncated or damaged after {seen} member(s) ({exc.__class__.__name__}: {exc})"
            except Exception as exc:  # a decompressor's own error (zlib.error, lzma.LZMAError)
                problem = f"the tar is truncated or damaged after {seen} member(s) ({exc.__class__.__name__}: {exc})"
            if group:
                yield from _sample(name, group_key, group, done_keys, counts)  # type: ignore[arg-type]
            if problem:
                yield Event("error", name, reason=f"skipped the rest of the shard: {problem}")
    finally:
        reader.close()
    yield Event("done", name, counts=counts)


def _member_bytes(tf: tarfile.TarFile, info: tarfile.TarInfo, skip: bool) -> bytes | None:
    """The member's bytes when they are needed: an image of a sample not yet done, a small sidecar.
    What is not read here is skipped over by the stream."""
    if skip or not info.isreg():
        return None
    ext = split_key(info.name)[1]
    last = "." + ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        if info.size > MAX_IMAGE_BYTES:
            return None
    elif ext not in ("txt", "json") or info.size > SIDECAR_BYTES:
        return None
    f = tf.extractfile(info)
    return f.read() if f is not None else None


def _sample(shard: str, key: str, members: list[tuple[tarfile.TarInfo, bytes | None]], done_keys: set[str],
            counts: dict[str, int]) -> Iterator[Event]:
    row = f"{shard}/{key}"
    if key.rpartition("/")[2].startswith("."):  # ._ files of macOS, hidden samples
        counts["hidden"] += 1
        return
    by_ext = {split_key(m.name)[1]: (m, data) for m, data in members}
    image = next(((m, d) for m, d in members if "." + split_key(m.name)[1].rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
                 None)
    if image is None:
        have = ", ".join(sorted(e for e in by_ext if e)) or "nothing"
        if key not in done_keys:  # one error row (not also counted as a non-image file)
            yield Event("error", row, reason=f"skipped: no image in this sample (it holds {have})")
        return
    info, data = image
    counts["found"] += 1
    for extra in extra_images([m for m, _ in members], info, lambda m: m.name):
        extra_row, reason = extra_image_row(row, key, extra, info.name)
        if extra_row[len(shard) + 1:] not in done_keys:  # its own row: never dropped, never written twice
            yield Event("error", extra_row, reason=reason)
    if key in done_keys:
        return
    if not info.isreg():
        yield Event("error", row, reason="skipped: the image member is not a regular file (a link or a device entry)")
        return
    if data is None:
        yield Event("error", row, reason=f"skipped: the image member is {info.size:,} bytes, more than the "
                                         f"{MAX_IMAGE_BYTES:,} read from a stream")
        return
    caption = _text(by_ext.get("txt"))
    meta = _text(by_ext.get("json"))
    ext = "." + split_key(info.name)[1].rsplit(".", 1)[-1]
    yield Event("sample", row, Member(row, shard, 0, len(data), key, ext, caption, meta, data=data))


def _text(member: tuple[tarfile.TarInfo, bytes | None] | None) -> str | None:
    if member is None or member[1] is None:
        return None
    return member[1].decode("utf-8", "replace").strip()


def _end_problem(tf: tarfile.TarFile) -> str | None:
    """Why the stream does not end as a complete tar does (tarfile stops quietly at a damaged or cut
    header after the first member): after the last member, only zero blocks, at least two of them
    (the first of which tarfile has already read)."""
    rest = 0
    while chunk := tf.fileobj.read(1 << 16):  # type: ignore[union-attr]
        if any(chunk):
            return f"a damaged header at byte {tf.offset}"
        rest += len(chunk)
    if 512 + rest < 1024:
        return f"no end-of-archive marker after byte {tf.offset}: the shard was cut short"
    return None


def _not_a_tar(exc: BaseException) -> str:
    text = str(exc)
    if "empty file" in text:
        return "skipped: an empty shard (0 bytes)"
    return f"skipped: not a tar file, or a compression other than gzip, bzip2 or xz ({exc.__class__.__name__}: {exc})"


def _shard_reason(exc: RemoteError, seen: int) -> str:
    return f"could not be read after {seen} member(s): {exc}"


def done_keys_by_shard(names: list[str], done: set[str]) -> dict[str, set[str]]:
    """The keys of each shard that rows (or errors) of OUT already name: ``SHARD/KEY`` split at the
    shard's name (a URL holds slashes, a key may too)."""
    wanted = set(names)
    out: dict[str, set[str]] = {}
    for row in done:
        at = row.find("/")
        while at != -1:
            if row[:at] in wanted:
                out.setdefault(row[:at], set()).add(row[at + 1:])
                break
            at = row.find("/", at + 1)
    return out


def stream_worker_events(plan: ShardPlan, worker: int, workers: int) -> Iterator[Event]:
    """The events of the shards worker ``worker`` of ``workers`` reads (every ``workers``-th, from its
    own), skipping complete shards."""
    for i, spec in enumerate(plan.specs):
        if i % workers != worker:
            continue
        name = public_url(spec)
        if name in plan.complete:
            continue
        yield from stream_events(spec, plan.done_keys.get(name))
