"""A full disk: a clear message, whatever was written before stays consistent, and the rerun after
freeing space completes. Runs on a real, small tmpfs mounted by the test (CI runs as root)."""

import csv
import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from coder_index import TextIndex
from coder_index.stores.verify import verify_index
from coder_index_cli.main import cli

from conftest import shared_path


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}): the full-disk tests need root and "
                    "mount permission")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Occupy the file system so that about ``leave`` bytes stay free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


@pytest.mark.parametrize("leave", [8_000, 40_000, 90_000, 200_000])
def test_build_on_a_full_disk(small_fs, tiny_model, tmp_path, leave):
    classes = tmp_path / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    desc = shared_path("data", "descriptors", "descriptors_pets.json")
    args = ["build", small_fs / "idx", "--classes", classes, "--model", tiny_model, "--dataset", "oxford_pets",
            "--descriptors", desc]
    filler = fill(small_fs, leave)
    res = invoke(*args)
    if res.exit_code != 0:
        assert res.exit_code == 1 and "no space left" in res.output and "rerun the same command" in res.output
        assert "Traceback" not in res.output
        if (small_fs / "idx" / "manifest.json").exists():   # what was written before is consistent
            assert verify_index(small_fs / "idx", check_model=False).ok
    filler.unlink()
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    index = TextIndex.open(small_fs / "idx")
    assert index.counts()["texts"]["name"] == 5 and index.counts()["texts"]["attribute"] > 0
    assert verify_index(small_fs / "idx", check_model=False).ok
    assert not [p.name for p in (small_fs / "idx").iterdir() if p.name.endswith(".tmp") or ".faiss.g" in p.name]


def _images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_classify_output_on_a_full_disk(small_fs, built_index, tmp_path, fmt):
    _images(tmp_path / "imgs", 300)
    out = small_fs / f"p.{fmt}"
    args = ["classify", tmp_path / "imgs", "--index", built_index.path, "--out", out, "--workers", "0",
            "--batch-size", "16", "-q"]
    filler = fill(small_fs, 20_000)
    res = invoke(*args)
    assert res.exit_code == 1 and "no space left" in res.output, res.output
    filler.unlink()
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    if fmt == "csv":
        with open(out, newline="") as f:
            paths = [r["path"] for r in csv.DictReader(f)]
    else:
        paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == len(set(paths)) == 300


def test_adapter_corpus_and_embedding_cache_on_a_full_disk(small_fs, tiny_model, tmp_path, monkeypatch):
    classes = tmp_path / "classes.txt"
    classes.write_text("c0\nc1\n")
    assert invoke("build", tmp_path / "idx", "--classes", classes, "--model", tiny_model).exit_code == 0
    _images(tmp_path / "train", 40)
    fit = ["fewshot", "fit", tmp_path / "train", "--index", tmp_path / "idx", "--shots", "4", "--out",
           small_fs / "ad", "--augment-epochs", "1", "--workers", "0", "--search", "fast"]
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    filler = fill(small_fs, 10_000)
    res = invoke(*fit)
    assert res.exit_code == 1 and "no space left" in res.output, res.output
    assert not (small_fs / "ad").exists()
    filler.unlink()
    assert invoke(*fit).exit_code == 0

    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\n" + "".join(f"c{i % 2}/{i}.png,thing {i}\n" for i in range(40)))
    corpus = ["corpus", "build", small_fs / "corpus", "--images", tmp_path / "train", "--captions", caps,
              "--index", tmp_path / "idx", "--workers", "0"]
    filler = fill(small_fs, 10_000)
    res = invoke(*corpus)
    assert res.exit_code == 1 and "no space left" in res.output, res.output
    assert not (small_fs / "corpus").exists()
    filler.unlink()
    assert invoke(*corpus).exit_code == 0

    ev = ["eval", tmp_path / "train", "--index", tmp_path / "idx", "--methods", "coder", "--out", tmp_path / "rep",
          "--embedding-cache", small_fs / "emb.sqlite", "--workers", "0", "--tsne-samples", "0", "-q"]
    filler = fill(small_fs, 30_000)
    res = invoke(*ev)
    assert res.exit_code == 1 and "no space left" in res.output, res.output
    filler.unlink()
    res = invoke(*ev)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["images"] == 40


def test_unwritable_locations_fail_before_any_model_loads(tmp_path, built_index, tiny_model, monkeypatch):
    """Root may write anywhere except on a read-only mount: the errors name the path, and come
    before the model loads."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip()})")
    try:
        from coder_index.model import encoder as encoder_module

        def no_model(*a, **k):
            raise AssertionError("the model must not load before the output is checked")

        monkeypatch.setattr(encoder_module.ClipEncoder, "__init__", no_model)
        _images(tmp_path / "imgs", 4)
        classes = tmp_path / "classes.txt"
        classes.write_text("a\nb\n")
        for args, where in [
            (["classify", tmp_path / "imgs", "--index", built_index.path, "--out", ro / "p.csv"], ro),
            (["build", ro / "idx", "--classes", classes, "--model", tiny_model], ro),
            (["eval", tmp_path / "imgs", "--index", built_index.path, "--out", ro / "rep"], ro),
            (["fewshot", "fit", tmp_path / "imgs", "--index", built_index.path, "--out", ro / "ad"], ro),
            (["corpus", "build", ro / "c", "--images", tmp_path / "imgs", "--index", built_index.path], ro),
            (["generate", "--classes", classes, "--out", ro / "k.json", "--llm", "none", "--model", tiny_model], ro),
        ]:
            res = invoke(*args)
            assert res.exit_code == 1 and str(where) in res.output and "not writable" in res.output, (args, res.output)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
