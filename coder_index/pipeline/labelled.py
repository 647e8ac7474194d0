"""Labelled data for `eval` and `fewshot fit`: a folder with one subfolder per class, or a CSV of
path,label (their image embeddings from the embedding cache or encoded in workers); and, for `eval`,
labelled shards (webdataset's ``.cls``: a class id, as webdataset and CLIP_benchmark write it, or a
name) and parquet files with a label column, read through the same sources as classify's."""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from coder_index.core.errors import InputFormatError
from coder_index.core.parallelism import parallel_encoding
from coder_index.core.remote import is_url, public_url
from coder_index.core.sources import match_classes
from coder_index.core.untrusted import MapOf, Text, check, read_json, read_text
from coder_index.pipeline.discover import discover_images
from coder_index.pipeline.encode_images import encoded_batches
from coder_index.pipeline.sources.files import units_of

if TYPE_CHECKING:
    from coder_index.stores.embcache import EmbeddingCache
    from coder_index.stores.text_index import TextStore


@dataclass
class LabelledSet:
    paths: list[Path | str]     # files (a CSV's may also be URLs, as str)
    labels: np.ndarray          # [N] class ids of the index
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def embed(self, index: TextStore, cache: EmbeddingCache, **kw: Any
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(embeddings, class ids, stats) of the decodable images (``embed_labelled``)."""
        x, keep, stats = embed_labelled(index, self, cache, **kw)
        return x, self.labels[keep], stats


@dataclass
class LabelledSource:
    """Labelled shards or parquet files: the labels come with the images (``Sample.label``), resolved
    to the index's classes once read (names matched as folder names are; ids taken as the index's
    class ids, or through ``mapping``)."""

    source: Any
    class_names: list[str]
    mapping: dict[str, str] | None = None

    def embed(self, index: TextStore, cache: EmbeddingCache, *, batch_size: int = 64, workers: int | None = None,
              threads: int | None = None, progress: bool = False, decode: str = "auto"
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from coder_index.pipeline.sources.base import ItemError, ReadFailure

        t0 = time.perf_counter()
        vecs: list[np.ndarray] = []
        raw: list[int | str] = []
        errors: list[tuple[str, str]] = []
        unread: list[tuple[str, str]] = []
        units = []
        for u in self.source.units():
            if isinstance(u, ItemError):
                errors.append((u.row, u.reason))
            elif isinstance(u, ReadFailure):
                unread.append((u.row, u.reason))
            else:
                units.append(u)
        encoder = index.encoder
        with tqdm(unit="img", desc="encoding images", disable=not progress) as bar, \
                parallel_encoding(encoder, threads=threads, workers=workers) as plan:
            for batch in encoded_batches(encoder, units, batch_size=batch_size, workers=plan.workers, decode=decode):
                errors += [(e.row, e.reason) for e in batch.errors]
                unread += [(f.row, f.reason) for f in batch.failures]
                if batch.embeddings is not None:
                    for sample, v in zip(batch.samples, batch.embeddings, strict=True):
                        if sample.label is None:
                            errors.append((sample.row, "no label (a .cls member, or the label column)"))
                            continue
                        raw.append(sample.label)
                        vecs.append(v)
                bar.update(len(batch.samples) + len(batch.errors))
        stats = {"encode_seconds": time.perf_counter() - t0, "embeddings_from_cache": 0, "encoded": len(vecs),
                 "skipped": len(errors) + len(unread), "errors": errors[:50], "unread": unread}
        if not vecs:
            return np.zeros((0, encoder.embed_dim), np.float32), np.zeros(0, np.int64), stats
        return np.stack(vecs), self._class_ids(raw), stats

    def _class_ids(self, raw: list[int | str]) -> np.ndarray:
        """Class ids of the index for the labels read: names matched (``--mapping`` first), ids as given."""
        names = sorted({str(r) for r in raw if isinstance(r, str)} |
                       {str(r) for r in raw if isinstance(r, int) and self.mapping and str(r) in self.mapping})
        by_name = _resolve(names, self.class_names, self.mapping, "label(s)") if names else {}
        n = len(self.class_names)
        bad = sorted({r for r in raw if isinstance(r, int) and str(r) not in by_name and not 0 <= r < n})
        if bad:
            raise InputFormatError(f"class id(s) {bad[:5]} are outside the index's {n} classes (ids count from 0 in "
                                   "the index's class order); pass --mapping FILE (CSV id,class) to name them")
        return np.asarray([by_name[str(r)] if str(r) in by_name else int(r) for r in raw], dtype=np.int64)


def read_mapping(path: str | Path) -> dict[str, str]:
    """``{folder or label: index class}`` from JSON or a two-column CSV."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = check(read_json(path), MapOf(Text(1000)), str(path))
        return {str(k): str(v) for k, v in data.items()}
    rows = [r for r in csv.reader(io.StringIO(read_text(path, "--mapping"), newline="")) if r]
    if rows and [c.lower() for c in rows[0][:2]] in (["label", "class"], ["folder", "class"]):
        rows = rows[1:]
    return {r[0]: r[1] for r in rows if len(r) >= 2}


def _resolve(labels: list[str], class_names: list[str], mapping: dict[str, str] | None,
             what: str) -> dict[str, int]:
    ids = {c: i for i, c in enumerate(class_names)}
    mapped = {lab: mapping[lab] for lab in labels if mapping and lab in mapping}
    bad = sorted({c for c in mapped.values() if c not in ids})
    if bad:
        raise InputFormatError(f"the mapping names classes that are not in the index: {bad[:5]}")
    rest = [lab for lab in labels if lab not in mapped]
    loose, unmatched = match_classes(rest, class_names)
    if unmatched:
        raise InputFormatError(
            f"{len(unmatched)} {what} match no class of the index (first: {sorted(unmatched)[:5]}); pass "
            "--mapping FILE (CSV label,class or JSON {label: class}) to name their classes")
    return {lab: ids[c] for lab, c in {**mapped, **loose}.items()}


def load_labelled(data: str | Path, class_names: list[str], mapping: str | Path | None = None,
                  parquet: Any = None) -> LabelledSet | LabelledSource:
    """A folder with one subfolder per class (local, or a URL of an object store: ``s3://bucket/test/``),
    a CSV of path,label (paths relative to the CSV, or image URLs), or labelled webdataset shards or
    parquet files (``parquet``: a ``sources.parquet.ParquetOptions`` naming their columns)."""
    from coder_index.pipeline.sources.resolve import labelled_source

    table = read_mapping(mapping) if mapping else None
    source = labelled_source(str(data), parquet)
    if source is not None:
        return LabelledSource(source, class_names, table)
    if is_url(str(data)):
        return _remote_folder(str(data), class_names, table)
    data = Path(data)
    if not data.exists():
        raise InputFormatError(f"{data} does not exist: pass a folder with one subfolder per class, a CSV of "
                               "path,label, or a folder's URL (s3://bucket/test/)")
    if data.is_dir():
        folders = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise InputFormatError(f"{data} has no class subfolders; eval wants DATA/<class>/<image> or a CSV")
        ids = _resolve(folders, class_names, table, "folder(s)")
        paths, labels = [], []
        for folder in folders:
            found = discover_images(data / folder)
            paths += [data / folder / p for p in found.images]
            labels += [ids[folder]] * len(found.images)
    elif data.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(data, "labels CSV"), newline=""))
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise InputFormatError(f"{data}: a labels CSV needs the columns path,label")
        rows = list(reader)
        ids = _resolve(sorted({r["label"] for r in rows}), class_names, table, "label(s)")
        # a path relative to the CSV's folder, or a URL (read where it lives, never cached)
        paths = [r["path"] if is_url(r["path"]) else (data.parent / r["path"]) for r in rows]  # pipe: never runs
        labels = [ids[r["label"]] for r in rows]
    else:
        raise InputFormatError(f"{data}: pass a folder with one subfolder per class, or a CSV of path,label")
    if not paths:
        raise InputFormatError(f"{data} holds no images")
    return LabelledSet(paths, np.asarray(labels, dtype=np.int64), class_names)


def _remote_folder(url: str, class_names: list[str], table: dict[str, str] | None) -> LabelledSet:
    """DATA/<class>/<image> in an object store: listed through ``core.remote`` (fsspec), the images
    read where they live."""
    from coder_index.core.choices import IMAGE_EXTENSIONS
    from coder_index.core.remote import RemoteError, filesystem, redacted

    fs, root = filesystem(url)
    root = root.rstrip("/")
    prefix = url.split("://", 1)[0] + "://"  # fsspec lists paths without their scheme
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise InputFormatError(f"{public_url(url)} does not exist") from None
    except Exception as exc:
        raise RemoteError(f"cannot list {public_url(url)}: {redacted(str(exc), url)}") from None
    folders = sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
    folders = [f for f in folders if not f.startswith(".")]
    if not folders:
        raise InputFormatError(f"{public_url(url)} has no class subfolders; eval wants DATA/<class>/<image> or a CSV")
    ids = _resolve(folders, class_names, table, "folder(s)")
    paths: list[Path | str] = []
    labels: list[int] = []
    for folder in folders:
        try:
            found = sorted(fs.find(f"{root}/{folder}"))
        except Exception as exc:
            raise RemoteError(f"cannot list {public_url(url)}/{folder}: {redacted(str(exc), url)}") from None
        images = [f for f in found if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                  and not f.rsplit("/", 1)[-1].startswith(".")]
        paths += [prefix + f.lstrip("/") for f in images]
        labels += [ids[folder]] * len(images)
    if not paths:
        raise InputFormatError(f"{public_url(url)} holds no images")
    return LabelledSet(paths, np.asarray(labels, dtype=np.int64), class_names)


def embed_labelled(index: TextStore, data: LabelledSet, cache: EmbeddingCache, *, batch_size: int = 64,
                   workers: int | None = None, threads: int | None = None, progress: bool = False,
                   decode: str = "auto") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings of the decodable images (cache first, then the one feed: ``encode_images``), a
    keep-mask over ``data``, and stats (``unread``: what could not be read, a missing file, a URL
    that failed). ``decode`` as classify's ``--decode`` (auto: the tensor decoder on a CUDA device,
    the reference elsewhere)."""
    t0 = time.perf_counter()
    hit, emb, identities = cache.lookup(data.paths)
    keep = np.ones(len(data), bool)
    misses = np.flatnonzero(~hit)
    errors: list[tuple[str, str]] = []
    unread: list[tuple[str, str]] = []
    if misses.size:
        encoder = index.encoder
        where: dict[str, list[int]] = {}  # resolved file -> rows of data (a CSV may list a file twice)
        items: dict[str, Any] = {}        # the item to read of each: a path, or a URL
        for i in misses:
            p = data.paths[i]
            key = public_url(p) if isinstance(p, str) else str(p.resolve())
            where.setdefault(key, []).append(int(i))
            items.setdefault(key, p if isinstance(p, str) else key)
        done_ids, done_vecs = [], []
        with tqdm(total=len(where), unit="img", desc="encoding images", disable=not progress) as bar, \
                parallel_encoding(encoder, threads=threads, workers=workers) as plan:
            for batch in encoded_batches(encoder, units_of(list(items.values())), batch_size=batch_size,
                                         workers=plan.workers, decode=decode):
                if batch.embeddings is not None:
                    for p, v in zip(batch.items, batch.embeddings, strict=True):
                        emb[where[p]] = v
                        done_ids.append(identities[where[p][0]])  # the identity taken before the read
                        done_vecs.append(v)
                for e in batch.errors:
                    keep[where[e.row]] = False
                    errors.append((e.row, e.reason))
                for f in batch.failures:
                    keep[where[f.row]] = False
                    unread.append((f.row, f.reason))
                bar.update(len(batch.items) + len(batch.errors) + len(batch.failures))
        if done_vecs:
            cache.store(done_ids, np.stack(done_vecs))
    stats = {"encode_seconds": time.perf_counter() - t0, "embeddings_from_cache": int(hit.sum()),
             "encoded": int((~hit).sum() - (~keep).sum()), "skipped": int((~keep).sum()), "errors": errors[:50],
             "unread": unread}
    return emb[keep], keep, stats
