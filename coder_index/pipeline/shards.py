"""webdataset tar shards as an input, read in place (never unpacked).

A shard is an uncompressed tar whose members are grouped by key (img2dataset, LAION-style sets):
``00000.tar`` holds ``KEY.jpg`` (or another image extension) and optional ``KEY.txt`` (the caption)
and ``KEY.json`` sidecars. The key is a member's path up to the first dot of its file name, as
webdataset reads it. One image is one row, named ``SHARD/KEY``: the shard's path as given (a folder
of shards: the folder joined with the file name), a slash, then the key; e.g.
``data/00000.tar/000000123``. The row's image is read from its offset in the tar by the decoding
workers; captions and JSON sidecars travel with it (``--save-embeddings`` writes them).

What cannot be read is reported, never fatal: a sample without an image member, an image member
that is not a regular file, a member whose bytes run past the end of the shard, a truncated or
damaged tar (the samples before the damage are classified, then one error row names the shard),
a compressed shard named ``.tar`` (members of a compressed stream cannot be read in place; named
``.tar.gz`` or ``.tgz`` it is read as a stream, see ``shard_stream``).

Shards by URL (``https://``, ``s3://``, ``pipe:``, ...) and compressed shards are read as streams by
``shard_stream``; this module reads local uncompressed tars in place.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from coder_index.core.decode import IMAGE_EXTENSIONS, ImageDecodeError
from coder_index.core.errors import InputFormatError

SIDECAR_BYTES = 1 << 20  # a caption or JSON sidecar larger than this is not read (kept as missing)
_BRACES = re.compile(r"\{([^{}]*)\}")


class Member(str):
    """A row id ``SHARD/KEY`` that knows where its image bytes are in the shard, and its sidecars.

    A ``str`` so that the runner, the writers and resume treat it as any row path; it pickles with
    its fields, so decoding workers can read the bytes themselves."""

    __slots__ = ("shard", "offset", "size", "key", "ext", "caption", "meta", "data")

    def __new__(cls, row: str, shard: str, offset: int, size: int, key: str, ext: str,
                caption: str | None = None, meta: str | None = None, data: bytes | None = None) -> Member:
        self = super().__new__(cls, row)
        self.shard, self.offset, self.size, self.key, self.ext = shard, offset, size, key, ext
        self.caption, self.meta = caption, meta
        self.data = data  # a streamed shard's sample carries its bytes (no offset to read them at)
        return self

    def __reduce__(self) -> tuple:
        return (Member, (str(self), self.shard, self.offset, self.size, self.key, self.ext, self.caption, self.meta,
                         self.data))

    @property
    def shard_as_given(self) -> str:
        """The shard's path as the row names it (``shard`` is absolute: workers run elsewhere)."""
        return str(self)[: -len(self.key) - 1]

    def read(self) -> bytes:
        """The image member's bytes, read at its offset (ImageDecodeError when the shard ends first)."""
        if self.data is not None:
            return self.data
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise ImageDecodeError(f"could not read the shard: {exc.strerror or exc}") from None
        if len(data) < self.size:
            raise ImageDecodeError(f"truncated shard: it ends {self.size - len(data)} bytes inside this member "
                                   f"({len(data)} of {self.size} bytes)")
        return data


@dataclass
class ShardFiles:
    """webdataset shards to classify (``expand_shards`` gives the list from what the user typed)."""

    shards: list[str]


def _expand_braces(pattern: str) -> list[str]:
    """``data/{00000..00099}.tar`` (zero padding kept) and ``{a,b}`` lists, as webdataset expands them."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise InputFormatError(f"{pattern}: the range {{{body}}} runs backwards")
        if int(hi) - int(lo) > 10_000_000:
            raise InputFormatError(f"{pattern}: the range {{{body}}} is too large")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in _expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def is_shard_spec(arg: str) -> bool:
    """A tar file (``.tar``, ``.tar.gz``, ``.tgz``), a brace pattern of them, a shard URL, a ``pipe:``
    command, or a folder holding shards and no images at its top."""
    from coder_index.core.remote import is_remote, local_path, path_part

    if arg.startswith("pipe:"):
        return True
    if is_remote(arg):
        return is_shard_name(path_part(arg)) or path_part(arg).endswith("/")
    arg = local_path(arg)
    if _BRACES.search(arg) and is_shard_name(arg):
        return True
    if is_shard_name(arg) and os.path.isfile(arg):
        return True
    if os.path.isdir(arg):
        try:
            names = os.listdir(arg)
        except OSError:
            return False
        tars = [n for n in names if is_shard_name(n) and not n.startswith(".")]
        images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        subdirs = [n for n in names if os.path.isdir(os.path.join(arg, n)) and not n.startswith(".")]
        return bool(tars) and not images and not subdirs
    return False


def expand_shards(specs: Iterable[str]) -> list[str]:
    """The shards of shard files and URLs, folders of shards (sorted; a remote folder ending in '/'
    is listed too) and brace patterns, each once. Local paths are normalised; URLs and ``pipe:``
    commands are kept as given."""
    from coder_index.core.remote import is_remote, local_path

    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        if is_remote(spec):
            if _BRACES.search(spec) and not spec.startswith("pipe:"):
                out += _expand_braces(spec)
            elif spec.endswith("/") and not spec.startswith("pipe:"):
                out += _list_remote_folder(spec)
            else:
                out.append(spec)
            continue
        spec = local_path(spec)
        if os.path.isdir(spec):
            found = sorted(n for n in os.listdir(spec) if is_shard_name(n) and not n.startswith("."))
            if not found:
                raise InputFormatError(f"{spec} holds no shards (.tar, .tar.gz, .tgz)")
            out += [os.path.normpath(os.path.join(spec, n)) for n in found]
        elif _BRACES.search(spec):
            out += [os.path.normpath(s) for s in _expand_braces(spec)]
        else:
            out.append(os.path.normpath(spec))
    return list(dict.fromkeys(out))


def _list_remote_folder(spec: str) -> list[str]:
    """The shards directly under a remote folder (s3://bucket/prefix/ and the like)."""
    from coder_index.core.remote import RemoteError, filesystem, public_url, redacted

    fs, path = filesystem(spec)
    try:
        names = fs.ls(path, detail=False)
    except Exception as exc:
        raise RemoteError(f"cannot list {public_url(spec)}: {redacted(str(exc), spec)}") from None
    scheme = spec.split("://", 1)[0]
    found = sorted(n for n in names if is_shard_name(n) and not n.rsplit("/", 1)[-1].startswith("."))
    if not found:
        raise InputFormatError(f"{public_url(spec)} holds no shards (.tar, .tar.gz, .tgz)")
    return [f"{scheme}://{n.lstrip('/')}" for n in found]


def needs_streaming(shards: list[str]) -> bool:
    """Whether the shards are read as streams (remote or compressed); only local uncompressed tars are
    read in place, at their members' offsets."""
    from coder_index.core.remote import is_remote, local_path

    return any(is_remote(s) or local_path(s).lower().endswith(COMPRESSED_SUFFIXES) for s in shards)


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as webdataset splits it: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _sidecar(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    if not member.isreg() or member.size > SIDECAR_BYTES:
        return None
    f = tf.extractfile(member)
    if f is None:
        return None
    return f.read().decode("utf-8", "replace").strip()


def walk_shards(shards: Iterable[str], stats: object) -> Iterator[Member]:
    """The samples of each shard with an image, in tar order; what is not classifiable goes to
    ``stats.special`` (a ``Discovery``) as ``(row, reason)``, as discovery reports odd files."""
    for shard in shards:
        yield from _walk_one(shard, stats)


def _walk_one(shard: str, stats: object) -> Iterator[Member]:
    special = stats.special  # type: ignore[attr-defined]
    if not os.path.exists(shard):
        special.append((shard, "skipped: no such shard"))
        return
    if not os.path.isfile(shard):
        special.append((shard, "skipped: the shard is not a regular file"))
        return
    try:
        tf = tarfile.open(shard, mode="r:")  # uncompressed only: members are read in place at their offset
    except tarfile.ReadError as exc:
        with open(shard, "rb") as f:
            head = f.read(6)
        compressed = head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))
        special.append((shard, "skipped: a compressed shard named .tar (a .tar is read in place, at its members' "
                               "offsets); name it .tar.gz or .tgz to have it read as a stream"
                        if compressed else f"skipped: not a tar file ({exc})"))
        return
    except OSError as exc:
        special.append((shard, f"skipped: {exc.strerror or exc}"))
        return
    group_key: str | None = None
    group: list[tarfile.TarInfo] = []
    seen = 0
    with tf:
        try:
            for info in tf:
                seen += 1
                if info.isdir():
                    continue
                key, _ = split_key(info.name)
                if key != group_key and group:
                    yield from _sample(tf, shard, group_key, group, stats)  # type: ignore[arg-type]
                    group = []
                group_key = key
                group.append(info)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if group:
                yield from _sample(tf, shard, group_key, group, stats)  # type: ignore[arg-type]
                group = []
            special.append((shard, f"skipped the rest of the shard: the tar is truncated or damaged after {seen} "
                                   f"member(s) ({exc.__class__.__name__}: {exc})"))
            return
        if group:
            yield from _sample(tf, shard, group_key, group, stats)  # type: ignore[arg-type]
        damage = _end_of_archive_problem(shard, tf.offset)
        if damage:
            special.append((shard, f"skipped the rest of the shard: the tar is truncated or damaged after {seen} "
                                   f"member(s) ({damage})"))


def _end_of_archive_problem(shard: str, end: int) -> str | None:
    """Why the tar does not end where a complete one does, or None. tarfile stops quietly at a
    damaged or cut header after the first member, so the end is checked: a complete tar has its
    end-of-archive marker (two zero blocks) right after the last member."""
    size = os.path.getsize(shard)
    if end > size:
        return f"the file ends inside the data of its last member, {end - size} byte(s) short"
    with open(shard, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
    if len(tail) < 1024 and not any(tail):
        return f"no end-of-archive marker at byte {end}: the file was cut short"
    if any(tail):
        return f"a damaged header at byte {end}"
    return None


def extra_images(members: list[Any], chosen: Any, name: Any) -> list[str]:
    """The names of a sample's image members other than the one classified (webdataset reads one
    image per sample: the first)."""
    return [name(m) for m in members if m is not chosen
            and "." + split_key(name(m))[1].rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]


def extra_image_row(row: str, key: str, member: str, chosen: str) -> tuple[str, str]:
    """An error row for an image member a sample holds besides its classified one: named by its
    extension (``SHARD/KEY.png``), so that it is never silently dropped."""
    ext = split_key(member)[1]
    return (f"{row}.{ext}", f"skipped: a second image in sample {key} ({member}); one image per sample is "
                            f"classified, {chosen}")


def _sample(tf: tarfile.TarFile, shard: str, key: str, members: list[tarfile.TarInfo], stats: object
            ) -> Iterator[Member]:
    row = f"{shard}/{key}"
    if key.rpartition("/")[2].startswith("."):  # ._ files of macOS, hidden samples: as hidden files in a folder
        stats.hidden += 1  # type: ignore[attr-defined]
        return
    by_ext = {split_key(m.name)[1]: m for m in members}
    image = next((m for m in members if "." + split_key(m.name)[1].rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image is None:
        have = ", ".join(sorted(e for e in by_ext if e)) or "nothing"
        stats.special.append((row, f"skipped: no image in this sample (it holds {have})"))  # type: ignore[attr-defined]
        return
    for extra in extra_images(members, image, lambda m: m.name):
        stats.special.append(extra_image_row(row, key, extra, image.name))  # type: ignore[attr-defined]
    if not image.isreg():
        stats.special.append((row, "skipped: the image member is not a regular file "  # type: ignore[attr-defined]
                                   "(a link or a device entry)"))
        return
    caption = _sidecar(tf, by_ext["txt"]) if "txt" in by_ext else None
    meta = _sidecar(tf, by_ext["json"]) if "json" in by_ext else None
    stats.found += 1  # type: ignore[attr-defined]
    ext = "." + split_key(image.name)[1].rsplit(".", 1)[-1]
    yield Member(row, os.path.abspath(shard), image.offset_data, image.size, key, ext, caption, meta)
