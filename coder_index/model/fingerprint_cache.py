"""Weights fingerprints remembered per weights file, so that reloading the same file skips hashing it.

``weights_checksum`` reads every byte of the loaded weights (0.55 s for ViT-B-32 on a 2-core machine,
seconds for larger models) on every command. The result only depends on the bytes of the files the
weights were read from and on how they were read (the model's name and tag, open_clip's version). So
it is kept in ``CACHE_DIR/weights-fingerprints.json`` under a key made of those and of each file's
identity (``core.file_identity``: real path, device, inode, size, modification and status-change
times; a file changed in the last ``SETTLE_SECONDS`` is never cached). ``--pretrained random``
weights come from no file: they are keyed by the model's config and the versions of torch and open_clip that seed them.

The cache is advisory: unreadable, damaged or unwritable means hashing again, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from coder_index.core import file_identity
from coder_index.core.atomic import atomic_write_json, cache_dir, remove_stale_temps
from coder_index.core.file_identity import identify
from coder_index.core.locking import FileLock

log = logging.getLogger(__name__)

CACHE_NAME = "weights-fingerprints.json"
MAX_ENTRIES = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ALGORITHM = 1  # weights_checksum's definition; a change makes every cached value stale


def identity_key(files: Sequence[Path], *, model: str, pretrained: str | None, reader: str) -> str | None:
    """The cache key of weights read from ``files`` (None: not cacheable - a file missing, not regular,
    or changed too recently: ``file_identity``'s rule)."""
    if not files:
        return None
    now = file_identity.clock()  # one clock for every file of the key (the settle rule's)
    parts = []
    for path in sorted({os.path.realpath(p) for p in files}):
        ident = identify(path, now)
        if ident is None:
            return None
        parts.append(list(ident.as_tuple()))
    blob = json.dumps([_ALGORITHM, model, pretrained, reader, parts], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def seeded_key(*, model: str, config: dict | None, reader: str) -> str | None:
    """The cache key of ``--pretrained random`` weights: seeded, so fixed by the model's config and the
    code that initialises them (torch's and open_clip's versions, in ``reader``). Every index built with
    random weights already relies on this (its fingerprint is checked when it is opened again)."""
    if not config:
        return None
    blob = json.dumps([_ALGORITHM, model, "random", reader, config], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _path() -> Path:
    return cache_dir() / CACHE_NAME


def _read() -> dict[str, dict]:
    try:
        with open(_path(), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and _SHA256.fullmatch(v["sha256"]) and isinstance(v.get("used"), (int, float))}


def lookup(key: str | None) -> str | None:
    """The remembered fingerprint for ``key``, if any."""
    if key is None:
        return None
    entry = _read().get(key)
    return entry["sha256"] if entry else None


def remember(key: str | None, sha256: str) -> None:
    """Keep ``sha256`` for ``key`` (the most recently used ``MAX_ENTRIES`` are kept). Writers take turns
    (a lock beside the file, waited on for at most ``LOCK_WAIT`` seconds, else the entry is not kept),
    so that concurrent commands add to the entries rather than replace each other's."""
    if key is None or not _SHA256.fullmatch(sha256):
        return
    try:
        _path().parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(_path().with_name(CACHE_NAME + ".lock"), "the weights-fingerprint cache")
        if not lock.try_acquire(LOCK_WAIT):
            return
        try:
            entries = _read()
            entries[key] = {"sha256": sha256, "used": time.time()}
            if len(entries) > MAX_ENTRIES:
                keep = sorted(entries, key=lambda k: entries[k]["used"], reverse=True)[:MAX_ENTRIES]
                entries = {k: entries[k] for k in keep}
            # a writer killed between its temp file and the rename left the temp behind: its pid is gone
            remove_stale_temps(_path().parent, prefix=f".{CACHE_NAME}.")
            atomic_write_json(_path(), entries)  # a temp file renamed over the cache: readers see old or new
        finally:
            lock.release()
    except OSError as exc:  # a read-only home: hash again next time
        log.debug("weights fingerprint not cached (%s)", exc)


LOCK_WAIT = 2.0
