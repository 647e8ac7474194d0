"""The one tar grouping stage, for local and streamed shards alike (webdataset's ``tar_file_expander
-> group_by_keys``): members are grouped into samples by key as they pass, and each sample becomes
one event.

The key is a member's path up to the first dot of its file name, as webdataset splits it
(``a/b/0001.seg.png`` -> key ``a/b/0001``, extension ``seg.png``). A sample's image is its first
member with an image extension; ``.txt`` is its caption, ``.json`` its metadata and ``.cls`` its
class (an integer id or a name), as webdataset and CLIP_benchmark write them.

What cannot be classified is a final error row (a sample without an image, a second image in a
sample, an image member that is not a regular file or is too large to read from a stream). What
cannot be *read* (not a tar, a corrupt compressed stream, a header damaged or a file cut short, a
read that fails for good) ends the shard with a ``ReadFailure`` naming it: the samples read whole
before are kept (the one being read is not: it may lack a member), and the shard is not marked
done, so a rerun reads it again (skipping what OUT holds).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from coder_index.core.choices import IMAGE_EXTENSIONS
from coder_index.core.remote import RemoteError
from coder_index.pipeline.sources.base import Event, ItemError, ReadFailure, Sample, UnitDone

SIDECAR_BYTES = 1 << 20          # a caption, JSON or class sidecar larger than this is not read
MAX_IMAGE_BYTES = 256 << 20      # an image member larger than this is reported, not read into memory
SIDECARS = ("txt", "json", "cls")


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as webdataset splits it: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def is_image_ext(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


class _RecordingInfo(tarfile.TarInfo):
    """A TarInfo that keeps the last header block read on its archive (``_last_block``), so that the
    end of the archive can be checked the same way for a file and for a stream: tarfile stops
    quietly at a damaged header after the first member."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # the standard library's, keeping the block
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
        tf._last_block = buf  # type: ignore[attr-defined]
        obj = cls.frombuf(buf, tf.encoding, tf.errors)
        obj.offset = tf.fileobj.tell() - tarfile.BLOCKSIZE  # type: ignore[union-attr]
        return obj._proc_member(tf)  # type: ignore[attr-defined]


def tar_samples(fileobj: BinaryIO, container: str, *, seekable: bool, skip: frozenset[str] = frozenset(),
                take: Callable[[int], bool] | None = None, part: int = 0, parts: int = 1,
                unit: str | None = None) -> Iterator[Event]:
    """The events of one shard read from ``fileobj`` (``seekable``: a local file, whose members not
    needed are skipped over; else a stream, read front to back once, gzip/bzip2/xz recognised by
    their bytes). Rows are ``CONTAINER/KEY``; ``skip``: keys OUT holds already; ``take``: which
    sample ordinals this part reads (the others are another part's). Ends with ``UnitDone`` (part
    ``part`` of ``parts`` of ``unit``) unless a ``ReadFailure`` ended it."""
    unit = unit or container
    counts = {"found": 0, "hidden": 0, "other": 0}
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:*" if seekable else "r|*", tarinfo=_RecordingInfo)
    except RemoteError as exc:
        if exc.everywhere:
            raise
        yield ReadFailure(unit, f"could not be read: {_short(exc)}")
        return
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield ReadFailure(unit, _not_a_tar(exc))
        return
    except Exception as exc:  # a decompressor's own error (zlib.error, lzma.LZMAError)
        yield ReadFailure(unit, _not_a_tar(exc))
        return
    grouper = _Grouper(container, skip, take, counts)
    seen = 0
    problem = None
    with tf:
        try:
            for info in tf:
                seen += 1
                tf.members = []  # nothing is kept per member: memory is one sample, whatever the shard holds
                if info.isdir():
                    continue
                key, ext = split_key(info.name)
                yield from grouper.start(key)
                grouper.add(info, ext, _member_bytes(tf, info, ext, grouper.wanted()))
            problem = _end_problem(tf)
            if not problem:
                yield from grouper.start(None)
        except RemoteError as exc:
            if exc.everywhere:
                raise
            problem = f"could not be read{_after(seen)}: {_short(exc)}"
        except _CutShort as exc:
            problem = str(exc)
        except Exception as exc:  # tarfile, EOF, OSError, zlib.error, lzma.LZMAError: the stream is damaged
            problem = f"the tar is truncated or damaged{_after(seen)} ({exc.__class__.__name__}: {exc})"
        if problem:  # the samples read whole before the damage are kept; the one being read is not (it may
            # lack a member): the unit is read again by the next run, which skips the others
            yield ReadFailure(unit, f"the rest of the shard could not be read: {problem}")
            return
    yield UnitDone(unit, part, parts, counts)


class _CutShort(Exception):
    pass


class _Grouper:
    """Consecutive members of one key, turned into a sample's events when the key changes."""

    def __init__(self, container: str, skip: frozenset[str], take: Callable[[int], bool] | None,
                 counts: dict[str, int]) -> None:
        self.container, self.skip, self.take, self.counts = container, skip, take, counts
        self.key: str | None = None
        self.ordinal = -1
        self.members: list[tuple[tarfile.TarInfo, str, bytes | None]] = []

    def wanted(self) -> bool:
        """Whether this part reads the current sample's bytes."""
        return (self.take is None or self.take(self.ordinal)) and self.key not in self.skip

    def start(self, key: str | None) -> Iterator[Event]:
        if key is not None and key == self.key:
            return
        if self.members:
            yield from self._sample()
        self.members = []
        self.key = key
        if key is not None:
            self.ordinal += 1

    def add(self, info: tarfile.TarInfo, ext: str, data: bytes | None) -> None:
        self.members.append((info, ext, data))

    def _sample(self) -> Iterator[Event]:
        if self.take is not None and not self.take(self.ordinal):
            return  # another part's sample
        key = self.key
        assert key is not None
        row = f"{self.container}/{key}"
        if key.rpartition("/")[2].startswith("."):  # ._ files of macOS, hidden samples: as hidden files
            self.counts["hidden"] += 1
            return
        image = next(((m, e, d) for m, e, d in self.members if is_image_ext(e)), None)
        if image is None:
            if key not in self.skip:
                have = ", ".join(sorted({e for _, e, _ in self.members if e})) or "nothing"
                yield ItemError(row, f"skipped: no image in this sample (it holds {have})",
                                "sample(s) without an image")
            return
        info, ext, data = image
        self.counts["found"] += 1
        for m, e, _ in self.members:
            if m is not info and is_image_ext(e) and f"{key}.{e}" not in self.skip:
                yield ItemError(f"{row}.{e}", f"skipped: a second image in sample {key} ({m.name}); one image per "
                                              f"sample is classified, {info.name}", "extra image(s) in a sample")
        if key in self.skip:
            return
        if not info.isreg():
            yield ItemError(row, "skipped: the image member is not a regular file (a link or a device entry)",
                            "image member(s) that are not files")
            return
        if data is None:
            yield ItemError(row, f"skipped: the image member is {info.size:,} bytes, more than the "
                                 f"{MAX_IMAGE_BYTES:,} read from a shard", "image member(s) too large")
            return
        side = {e: d for _, e, d in self.members if e in SIDECARS and d is not None}
        yield Sample(row, data=data, ext="." + ext.rsplit(".", 1)[-1], key=key, container=self.container,
                     caption=_text(side.get("txt")), meta=_text(side.get("json")), label=_label(side.get("cls")))


def _member_bytes(tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str, wanted: bool) -> bytes | None:
    """The member's bytes when they are needed (an image of a sample this part reads and OUT lacks, a
    small sidecar of one); what is not read is skipped (seeked over in a file, read past in a stream)."""
    if not wanted or not info.isreg():
        return None
    if is_image_ext(ext):
        if info.size > MAX_IMAGE_BYTES:
            return None
    elif ext not in SIDECARS or info.size > SIDECAR_BYTES:
        return None
    f = tf.extractfile(info)
    if f is None:
        return None
    data = f.read()
    if len(data) < info.size:
        raise _CutShort(f"the shard ends {info.size - len(data):,} byte(s) inside member {info.name}")
    return data


def _end_problem(tf: tarfile.TarFile) -> str | None:
    """Why the archive does not end as a complete tar does, or None: its last header block read is
    the first of the two zero blocks of the end-of-archive marker, and only zeros follow."""
    last = getattr(tf, "_last_block", b"")
    if len(last) < tarfile.BLOCKSIZE:
        return f"no end-of-archive marker after byte {tf.offset}: the shard was cut short"
    if any(last):
        return f"a damaged header at byte {tf.offset}"
    rest = 0
    while chunk := tf.fileobj.read(1 << 16):  # type: ignore[union-attr]
        if any(chunk):
            return f"a damaged header at byte {tf.offset}"
        rest += len(chunk)
    if rest < tarfile.BLOCKSIZE:
        return f"no end-of-archive marker after byte {tf.offset}: the shard was cut short"
    return None


def _after(members: int) -> str:
    """Where a shard broke, for its message (never "after 0 member(s)")."""
    return f" after {members} member(s)" if members else " from its first header"


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "replace").strip()


def _label(data: bytes | None) -> int | str | None:
    """A ``.cls`` member: the class id (an integer, as webdataset and CLIP_benchmark write it) or a name."""
    text = _text(data)
    if not text:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _not_a_tar(exc: BaseException) -> str:
    text = str(exc)
    if "empty file" in text:
        return "an empty shard (0 bytes)"
    return (f"not a tar file, or a compression other than gzip, bzip2 or xz ({exc.__class__.__name__}: "
            f"{text.splitlines()[0] if text else ''})")


def _short(exc: Any) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text and text.startswith(("http", "s3:", "gs:", "pipe:")) else text


def find_sample(fileobj: BinaryIO, key: str, *, seekable: bool) -> bytes | None:
    """The image of sample ``key`` (its first member with an image extension), read up to it; None
    when the shard has no such sample. Members of other samples are skipped over, never read."""
    mode = "r:*" if seekable else "r|*"
    with tarfile.open(fileobj=fileobj, mode=mode) as tf:
        for info in tf:
            tf.members = []
            k, ext = split_key(info.name)
            if k == key and info.isreg() and is_image_ext(ext):
                f = tf.extractfile(info)
                return f.read() if f is not None else b""
    return None
