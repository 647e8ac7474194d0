"""The one file identity (core.file_identity) and the caches that trust it: an image rewritten in place
with its size and modification time kept, replaced by a rename or touched is never served stale, and
a file changed in the last moments is neither read from a cache nor stored in one."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from coder_index.core import file_identity
from coder_index.core.file_identity import identify, identify_open
from coder_index.model import fingerprint_cache
from coder_index.stores.embcache import EmbeddingCache

SETTLE = 0.3
_CLOCK: list = []


@pytest.fixture(autouse=True)
def movable_clock(settle_clock):
    """The settle rule's clock, moved by ``settle()`` instead of sleeping (conftest's ``settle_clock``)."""
    assert file_identity.SETTLE_SECONDS == SETTLE
    _CLOCK[:] = [settle_clock]


def settle() -> None:
    """As if the files just written had been left alone longer than the settle time."""
    _CLOCK[0].advance(SETTLE + 0.1)


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def rewrite_in_place_keeping_size_and_mtime(path):
    """What rsync -t, cp -p or an archive extraction leave: other bytes, the same size and mtime."""
    st = os.stat(path)
    other = png((0, 0, 255))
    assert len(other) <= st.st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(other + b"\0" * (st.st_size - len(other)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def replace_by_rename(path):
    tmp = path.with_name("new.tmp")
    shutil.copy2(path, tmp)  # the same bytes, size and mtime: only the inode (and ctime) differ
    os.replace(tmp, path)


def touch(path):
    t = os.stat(path).st_mtime_ns - 7 * 10**9  # another modification time (touch -d, or a copy's)
    os.utime(path, ns=(t, t))


CHANGES = [rewrite_in_place_keeping_size_and_mtime, replace_by_rename, touch]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_every_change_is_a_new_identity_and_every_cache_misses(tmp_path, change):
    image = tmp_path / "a.png"
    image.write_bytes(png((255, 0, 0)) + b"\0" * 64)  # room for the in-place rewrite
    cache = EmbeddingCache(tmp_path / "emb.sqlite", "w" * 64, 4)
    settle()
    before = identify(image)
    assert before is not None and before.path == os.path.realpath(image)
    hit, _, idents = cache.lookup([image])
    assert not hit[0] and idents[0] == before
    assert cache.store(idents, np.ones((1, 4), np.float32)) == 1
    weights_key = fingerprint_cache.identity_key([image], model="m", pretrained=None, reader="r")
    assert weights_key is not None
    assert cache.lookup([image])[0][0]  # unchanged: a hit

    change(image)
    settle()  # settled again: only the identity's fields can tell the change
    after = identify(image)
    assert after is not None and not after.same_file(before)
    hit, vectors, _ = cache.lookup([image])
    assert not hit[0] and not vectors.any()
    assert fingerprint_cache.identity_key([image], model="m", pretrained=None, reader="r") != weights_key


def test_a_file_changed_just_now_is_neither_trusted_nor_stored(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png((255, 0, 0)))
    assert identify(image) is None  # racy: within SETTLE_SECONDS of its change
    with open(image, "rb") as f:
        assert identify_open(f.fileno(), image) is None
    cache = EmbeddingCache(tmp_path / "emb.sqlite", "w" * 64, 4)
    hit, _, idents = cache.lookup([image])
    assert not hit[0] and idents == [None]
    assert cache.store(idents, np.ones((1, 4), np.float32)) == 0
    assert fingerprint_cache.identity_key([image], model="m", pretrained=None, reader="r") is None
    settle()
    assert not cache.lookup([image])[0][0]  # nothing was kept from the racy read
    with open(image, "rb") as f:
        assert identify_open(f.fileno(), image) == identify(image) is not None


def test_identity_follows_links_and_refuses_what_is_not_a_regular_file(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png((1, 2, 3)))
    link = tmp_path / "link.png"
    link.symlink_to(image)
    os.mkfifo(tmp_path / "fifo.png")
    settle()
    assert identify(link) == identify(image) is not None
    assert identify(tmp_path / "fifo.png") is None and identify(tmp_path) is None
    assert identify(tmp_path / "missing.png") is None


def test_old_cache_entries_are_misses(tmp_path):
    """An embedding cache written by 0.3 (path, size, mtime only) is never read."""
    import sqlite3

    image = tmp_path / "a.png"
    image.write_bytes(png((9, 9, 9)))
    settle()
    db = tmp_path / "emb.sqlite"
    st = os.stat(image)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE image_embeddings (path TEXT, model_sha VARCHAR(64), size INTEGER, mtime_ns INTEGER, "
                "vector BLOB, PRIMARY KEY (path, model_sha))")
    con.execute("INSERT INTO image_embeddings VALUES (?, ?, ?, ?, ?)",
                (str(image.resolve()), "w" * 64, st.st_size, st.st_mtime_ns, np.ones(4, np.float32).tobytes()))
    con.commit()
    con.close()
    assert not EmbeddingCache(db, "w" * 64, 4).lookup([image])[0][0]
