"""A writer killed at any point of a write leaves a consistent index (previous or new state)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from coder_index import TextIndex, TextItem

KILLER = textwrap.dedent("""
    import os, signal, sys
    import faiss
    from coder_index import ClipEncoder, TextIndex, TextItem
    from coder_index.index import atomic, text_index

    path, model, stage = sys.argv[1:4]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "during_faiss_write":
        real_write = faiss.write_index
        def half_write(index, fname):
            real_write(index, fname)
            with open(fname, "r+b") as f:  # a torn file, as if the machine died mid-write
                f.truncate(1000)
            die()
        atomic.faiss.write_index = half_write
    else:
        setattr(text_index.TextIndex, stage, die)  # the process dies just before this step
    index = TextIndex.open(path, encoder=ClipEncoder(model, device="cpu"))
    index.add_texts([TextItem("pug", "attribute", f"pug which has trait {i}") for i in range(20)])
    print("survived")
""")


@pytest.mark.parametrize("stage, expect_new", [
    ("during_faiss_write", False),
    ("_commit_rows", False),              # FAISS written aside, SQLite not committed: roll back
    ("_promote_pending_faiss", True),     # SQLite committed, FAISS not renamed: roll forward
])
def test_killed_writer_leaves_consistent_index(built_index, tiny_model, encoder, stage, expect_new):
    before = built_index.counts()["texts"]["attribute"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(built_index.path), tiny_model, stage],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # SIGKILL, not a clean exit
    assert "survived" not in proc.stdout

    index = TextIndex.open(built_index.path, encoder=encoder)
    after = index.counts()["texts"]["attribute"]
    assert after == before + (20 if expect_new else 0)
    table = index.text_table()  # raises if FAISS and SQLite disagree
    assert len(table) == sum(index.counts()["texts"].values())
    assert not list(index.path.glob("texts.faiss.*"))  # pending files resolved
    hits = index.nearest_texts(table.embeddings[-1:], k=1)
    assert hits[0][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    # the index stays writable, and a retried write lands exactly once
    res = index.add_texts([TextItem("pug", "attribute", f"pug which has trait {i}") for i in range(20)])
    assert res.added == (0 if expect_new else 20)
    assert np.array_equal(index.text_table().ids, np.unique(index.text_table().ids))
