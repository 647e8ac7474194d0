"""Every summary line true: classify's closing line says what each skipped input was, never claims a
file it did not write or a rate of nothing, and refuses options that would be silently ignored."""

from __future__ import annotations

import io
import tarfile

from conftest import run_cli
from test_shards import photos

run = run_cli  # conftest's: the command line in this process, as a user types it


def test_what_was_skipped_is_named_by_kind(built_index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = photos(3)[0][1]
    (tmp_path / "ok.jpg").write_bytes(good)
    (tmp_path / "afolder").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("ok.jpg\nmissing.jpg\nafolder\n")
    res = run("classify", "--files-from", listing, "--index", built_index.path, "--out", "l.csv", "--workers", "0",
              "-q", ok=False)
    assert res.exit_code == 3  # the missing file is listed to retry
    assert "1 folder(s) named as image files" in res.output and "missing.jpg: not read: no such file" in res.output
    assert "FIFO" not in res.output
    # a sample without an image is one error row, not also a non-image file; a missing shard is named so
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("a.jpg", good), ("b.txt", b"caption only")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = run("classify", "{s,gone}.tar", "--index", built_index.path, "--out", "s.csv", "--workers", "0", "-q",
              ok=False)
    assert res.exit_code == 3
    assert "1 sample(s) without an image" in res.output and "gone.tar: not read: no such shard" in res.output
    assert "non-image file" not in res.output


def test_no_file_claimed_and_no_rate_of_nothing_when_everything_fails(built_index, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "none.csv"
    res = run("classify", bad, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    assert not out.exists()
    assert f"No {out} written: no image was classified" in res.output and "holds 0 row" not in res.output
    assert "img/s" not in res.output and "1 unreadable" in res.output


def test_null_separator_without_a_file_list_is_refused(built_index, tmp_path):
    (tmp_path / "ok.jpg").write_bytes(photos(3)[0][1])
    res = run("classify", tmp_path / "ok.jpg", "-0", "--index", built_index.path, "--out", tmp_path / "x.csv",
              ok=False)
    assert res.exit_code == 2 and "-0/--null applies to --files-from" in res.output
    res = run("classify", tmp_path, "-0", "--index", built_index.path, "--out", tmp_path / "x.csv", ok=False)
    assert res.exit_code == 2 and "-0/--null applies to --files-from" in res.output


def test_shards_hold_no_image_in_good_english(built_index, tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    res = run("classify", tmp_path / "t.tar", "--index", built_index.path, "--out", tmp_path / "t.csv", "-q")
    assert "the shards hold no image" in res.output and "shards holds" not in res.output


def test_generate_dry_run_loads_no_model_and_needs_no_key(built_index, tmp_path, monkeypatch):
    """--dry-run "sends none": it neither downloads CLIP weights nor asks for an API key."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a model load would fail: ViT-B-32's weights are not here
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    for extra in (["--model", "ViT-B-32", "--pretrained", "openai"], ["--index", str(built_index.path)]):
        res = run("generate", "--classes", classes, "--out", tmp_path / "k.json", "--kinds", "attribute",
                  "--cache", tmp_path / "c.sqlite", "--dry-run", *extra)
        assert "would send 2 prompt(s)" in res.output and not (tmp_path / "k.json").exists()


def test_explain_rerank_speaks_of_no_option_it_lacks(built_index, tmp_path):
    """explain has no --llm: its note about the rerank must not name one."""
    img = tmp_path / "a.jpg"
    img.write_bytes(photos(3)[0][1])
    res = run("explain", img, "--index", built_index.path, "--rerank")
    assert "--llm" not in res.output and "rerank unavailable" in res.output


def test_a_shard_in_a_file_list_is_named_as_such(built_index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        data = photos(3)[0][1]
        info = tarfile.TarInfo("a.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "list.txt").write_text("s.tar\n")
    res = run("classify", "--files-from", "list.txt", "--index", built_index.path, "--out", "l.csv", "-q")
    assert "1 shard(s) in a file list" in res.output
    errors = (tmp_path / "l.csv.errors.csv").read_text()
    assert "a webdataset shard or parquet file, not an image" in errors and "not an image (unrecognised" not in errors


def test_a_sample_with_two_images_never_drops_one_silently(built_index, tmp_path, monkeypatch):
    """webdataset classifies one image per sample; the other gets its own error row, in place and streamed."""
    import gzip

    monkeypatch.chdir(tmp_path)
    blobs = photos(6)
    jpg, png = blobs[0][1], next(b for k, b in blobs if k.startswith("png"))
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("k1.jpg", jpg), ("k1.png", png), ("k2.jpg", jpg)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "s2.tar.gz").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    for shard, out in (("s.tar", "a.csv"), ("s2.tar.gz", "b.csv")):
        res = run("classify", shard, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
        errors = (tmp_path / f"{out}.errors.csv").read_text()
        assert f"{shard}/k1.png" in errors and "a second image in sample k1" in errors, (shard, errors)
        assert "classified 2 images" in res.output
        # in place: a skipped input of its kind; streamed: one more unreadable row
        assert "1 extra image(s) in a sample" in res.output or "1 unreadable" in res.output
        again = run("classify", shard, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
        assert "classified 0 images" in again.output
        assert (tmp_path / f"{out}.errors.csv").read_text() == errors  # nothing written twice


def test_cvpr24_warns_when_the_llm_uses_other_bullets(tmp_path, tiny_model, monkeypatch, wordnet_reader):
    """The released reader splits on '_' only: an LLM answering with '- ' bullets gets one garbled text per
    class; generate says so (and not when the answers follow the released format)."""
    from llm_server import FakeLLMServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    from llm_server import default_answer

    def dashes(kind, names):  # what today's chat models write: '- ' bullets, whatever the prompt's format
        return default_answer(kind, names)

    with FakeLLMServer(answer=dashes) as server:
        args = ["generate", "--classes", classes, "--out", tmp_path / "k.json", "--kinds", "attribute",
                "--preset", "cvpr24", "--base-url", server.base_url, "--llm-model", "fake", "--model", tiny_model,
                "--cache", tmp_path / "c.sqlite", "-q"]
        res = run(*args)
        assert "answered 2 class(es) with '- ' or numbered bullets" in res.output
    with FakeLLMServer(answer=lambda kind, names: f"_ {names[0]} shape\n_ {names[0]} colour_") as server:
        args[args.index("--base-url") + 1] = server.base_url
        args[args.index("--cache") + 1] = tmp_path / "c2.sqlite"
        res = run(*args)
        assert "bullets" not in res.output


def test_foreign_bullets_are_told_from_the_released_format():
    from coder_index.textgen.released import foreign_bullets

    assert foreign_bullets("- a\n- b\n- c") and foreign_bullets("1. a\n2. b") and foreign_bullets("* a\n* b")
    assert not foreign_bullets("_ a_ b_") and not foreign_bullets("one line") and not foreign_bullets(None)
    assert not foreign_bullets("- only one bullet")
