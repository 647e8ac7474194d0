"""Prediction files: any file name round-trips, repair is right at every byte offset, only regular
files are read, one writer per --out, and a resumed output never mixes rows of different settings."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from coder_index.pipeline.output import ErrorWriter, ResultWriter, last_record_end
from coder_index_cli.main import cli

from conftest import run_cli

# names a file system allows and a CSV or JSON writer can get wrong
WEIRD = ["new\nline.png", "carriage\rreturn.png", "tab\there.png", 'quo"te.png', "comma,name.png",
         "both\r\n,\"all\".png", " leading space.png", "ünïcödé 猫.png", "trailing\n"]
NON_UTF8 = os.fsdecode(b"bytes-\xff\xfe-latin1-\xe9.png")


run = run_cli  # conftest's: the command line in this process, as a user types it


@pytest.fixture
def weird_folder(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for _i, name in enumerate([*WEIRD[:-1], NON_UTF8, "plain.jpg"]):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name, format="PNG")
    (folder / WEIRD[-1]).write_text("not an image, and a name ending in a newline")  # counted as a non-image
    return folder


def read_rows(out: Path) -> list[str]:
    if out.suffix == ".csv":
        with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.reader(f))
        assert all(len(r) == len(rows[0]) for r in rows)
        return [r[0] for r in rows[1:]]
    text = out.read_bytes().decode("utf-8")  # strictly valid UTF-8
    return [json.loads(line)["path"] for line in text.split("\n") if line]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_any_file_name_round_trips(built_index, weird_folder, tmp_path, fmt):
    out = tmp_path / f"p.{fmt}"
    run("classify", weird_folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    prefix = str(weird_folder) + "/"
    expected = {prefix + n for n in [*WEIRD[:-1], NON_UTF8, "plain.jpg"]}
    rows = read_rows(out)
    assert set(rows) == expected and len(rows) == len(expected)
    # a rerun finds every one of them done: nothing is appended
    size = out.stat().st_size
    res = run("classify", weird_folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    assert out.stat().st_size == size and "classified 0 images" in res.output


def _rows(n):
    names = [*WEIRD, NON_UTF8, "plain"]
    return [{"path": f"/data/{names[i % len(names)]}-{i}", "label": ["cat", 'd"og', "x,y"][i % 3],
             "score": 0.5 + i / 1000, "method": "coder",
             "top_k": [{"label": "cat", "score": 0.5}, {"label": "dog\nbreed", "score": 0.25}]} for i in range(n)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_repair_and_resume_at_every_byte_offset(tmp_path, fmt):
    """Cut a real output at every byte offset, resume, and get exactly the rows, once each."""
    rows = _rows(12)
    full = tmp_path / f"full.{fmt}"
    w = ResultWriter(full, 2)
    for i in range(0, len(rows), 5):
        w.write(rows[i:i + 5])
    w.close()
    data = full.read_bytes()
    expected = [r["path"] for r in rows]
    assert read_rows(full) == expected
    cut = tmp_path / f"cut.{fmt}"
    for k in range(len(data) + 1):
        cut.write_bytes(data[:k])
        w = ResultWriter(cut, 2)
        done = w.done_paths()                      # repairs the tail
        kept = read_rows(cut) if cut.stat().st_size else []
        assert kept == expected[:len(kept)], k     # a prefix of the rows, every one complete
        assert done == set(kept), k
        w.write([r for r in rows if r["path"] not in done])
        w.close()
        assert read_rows(cut) == expected, k       # resumed: every row exactly once


def test_errors_file_repair_at_every_offset(tmp_path):
    errors = [(f"/d/{n}", f"corrupt image: {n!r}") for n in [*WEIRD, NON_UTF8]]
    full = tmp_path / "e.errors.csv"
    w = ErrorWriter(full)
    w.write(errors)
    w.close()
    data = full.read_bytes()
    for k in range(len(data) + 1):
        part = tmp_path / "p.errors.csv"
        part.write_bytes(data[:k])
        w = ErrorWriter(part)
        done = w.done_paths()
        w.write([e for e in errors if e[0] not in done])
        w.close()
        with open(part, newline="", encoding="utf-8", errors="surrogateescape") as f:
            got = [tuple(r) for r in csv.reader(f)][1:]
        assert got == [(p, e, "no") for p, e in errors], k


def test_rows_to_retry_are_dropped_at_every_offset_and_final_rows_kept(tmp_path):
    """A rerun drops the rows marked retry (what could not be read) and keeps the final ones, whatever
    byte an earlier run was killed at; a file of coder-index 0.4 (two columns) is all final."""
    final = [(f"/d/{n}", f"corrupt image: {n!r}") for n in [*WEIRD, NON_UTF8]]
    retry = [(f"/s/{i}.tar", "not read: no such shard") for i in range(3)]
    full = tmp_path / "e.errors.csv"
    w = ErrorWriter(full)
    for a, b in zip(final, retry + [None] * len(final), strict=False):
        w.write([a])
        if b is not None:
            w.write([b], retry=True)
    w.close()
    data = full.read_bytes()
    for k in range(len(data) + 1):
        part = tmp_path / "p.errors.csv"
        part.write_bytes(data[:k])
        w = ErrorWriter(part)
        dropped = w.drop_retried()
        done = w.done_paths()
        assert set(dropped) <= {p for p, _ in retry} and not done & {p for p, _ in retry}, k
        with open(part, newline="", encoding="utf-8", errors="surrogateescape") as f:
            got = [tuple(r) for r in csv.reader(f)]
        if got:
            assert got[0] == ("path", "error", "retry") and all(r[2] == "no" for r in got[1:]), k
            assert [r[:2] for r in got[1:]] == final[:len(got) - 1], k  # a prefix of the final rows, complete
        w.close()
    legacy = tmp_path / "old.errors.csv"
    legacy.write_text('"path","error"\n"/x/a.jpg","not an image"\n')
    w = ErrorWriter(legacy)
    assert w.drop_retried() == [] and w.done_paths() == {"/x/a.jpg"}
    assert legacy.read_text().splitlines() == ['"path","error","retry"', '"/x/a.jpg","not an image","no"']


def test_last_record_end_on_large_files(tmp_path):
    """Quote parity is counted across the 1 MiB blocks the scan reads."""
    p = tmp_path / "big.csv"
    rows = _rows(40_000)
    w = ResultWriter(p, 2)
    w.write(rows)
    w.close()
    data = p.read_bytes()
    assert len(data) > 2 << 20  # several scan blocks
    for k in (len(data) - 1, len(data) // 2 + 7, (1 << 20) + 3):
        p.write_bytes(data[:k])
        end = last_record_end(p, quoted=True)
        assert data[:end].endswith(b"\n") and end <= k
        with open(p, "rb+") as f:
            f.truncate(end)
        assert read_rows(p) == [r["path"] for r in rows][:len(read_rows(p))]


def test_only_regular_files_are_read(built_index, tmp_path):
    folder = tmp_path / "special"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "real.jpg")
    os.mkfifo(folder / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    os.symlink("/dev/null", folder / "device.jpg")
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    os.symlink(folder / "real.jpg", folder / "link.jpg")
    os.symlink(folder / "fifo.jpg", folder / "link-to-fifo.png")
    (folder / "dir.jpg").mkdir()  # a folder with an image-like name is a folder: searched
    shutil.copy(folder / "real.jpg", folder / "dir.jpg" / "inner.jpg")
    (folder / ".hidden.jpg").write_bytes((folder / "real.jpg").read_bytes())
    (folder / ".cache").mkdir()
    out = tmp_path / "p.csv"
    try:
        proc = subprocess.run([sys.executable, "-m", "coder_index_cli.main", "classify", str(folder), "--index",
                               str(built_index.path), "--out", str(out), "--workers", "0", "-q"],
                              capture_output=True, text=True, timeout=300)  # a FIFO read would hang: timeout
    finally:
        sock.close()
    assert proc.returncode == 3, proc.stderr  # incomplete: the broken link is listed to retry
    assert sorted(Path(p).name for p in read_rows(out)) == ["inner.jpg", "link.jpg", "real.jpg"]
    with open(out.with_name("p.csv.errors.csv"), newline="") as f:
        errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(f)}
    assert set(errors) == {"fifo.jpg", "sock.png", "device.jpg", "dangling.jpg", "link-to-fifo.png"}
    assert "FIFO" in errors["fifo.jpg"] and "socket" in errors["sock.png"] and "device" in errors["device.jpg"]
    assert "broken symbolic link" in errors["dangling.jpg"] and "FIFO" in errors["link-to-fifo.png"]
    # the summary says what each skipped input was, not one catch-all phrase
    assert "skipped before decoding (listed as unreadable): 4 FIFO(s), socket(s) or device(s)" in proc.stderr
    assert "1 input(s) could not be read" in proc.stderr and "dangling.jpg" in proc.stderr and "2 hidden" in proc.stderr


def test_a_file_swapped_for_a_fifo_after_discovery_is_skipped(tmp_path):
    from coder_index.core.decode import ImageDecodeError, load_image

    os.mkfifo(tmp_path / "x.jpg")
    # no writer ever opens the FIFO: a read that waited for one would never return (the thread would stay)
    raised: list[BaseException] = []
    reader = threading.Thread(target=lambda: raised.append(_raised(load_image, tmp_path / "x.jpg")), daemon=True)
    reader.start()
    reader.join(300)
    assert not reader.is_alive(), "opening a FIFO named like an image blocked"
    assert isinstance(raised[0], ImageDecodeError) and "not a regular file" in str(raised[0])


def _raised(fn, *args):  # noqa: ANN001, ANN202 - the exception fn raises (None if none)
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None


SLOW_CLASSIFY = textwrap.dedent("""
    import sys
    from coder_index_cli.main import cli
    cli(["classify", sys.argv[1], "--index", sys.argv[2], "--out", sys.argv[3], "--workers", "0", "-q"])
""")


def test_one_writer_per_out(built_index, weird_folder, tmp_path):
    out = tmp_path / "p.csv"
    env = {**os.environ, "CODER_INDEX_PAUSE_AT": "classify.locked:8"}
    first = subprocess.Popen([sys.executable, "-c", SLOW_CLASSIFY, str(weird_folder), str(built_index.path), str(out)],
                             env=env, stderr=subprocess.PIPE, text=True)
    lock = out.with_name("p.csv.lock")
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.time() < deadline:
        time.sleep(0.2)
    second = run("classify", weird_folder, "--index", built_index.path, "--out", out, "--workers", "0", ok=False)
    assert second.exit_code == 1 and first.poll() is None  # refused while the first still runs: it did not wait
    assert f"pid {first.pid}" in second.output and "in use" in second.output
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert len(read_rows(out)) == len(set(read_rows(out))) == len(WEIRD) + 1
    assert not lock.exists()
    # a lock file left by a dead process holds no lock
    lock.write_text("pid 999999: coder-index classify (killed)\n")
    run("classify", weird_folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")


def test_resume_refuses_other_settings(built_index, weird_folder, tmp_path, encoder, classes_file, other_tiny_model):
    from coder_index.pipeline.build import build_index

    out = tmp_path / "p.csv"
    base = ["classify", weird_folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q"]
    run(*base)
    side = json.loads(out.with_name("p.csv.run.json").read_text())["provenance"]
    assert side["method"] == "coder" and side["top_k"] == 5 and side["index"]["index_id"] == built_index.index_id
    # another index (same classes, same model)
    build_index(tmp_path / "idx2", classes_file, encoder=encoder, dataset="oxford_pets")
    res = run(*base[:2], "--index", tmp_path / "idx2", *base[4:], ok=False)
    assert res.exit_code == 1 and "--index" in res.output and "--overwrite" in res.output
    # another model
    build_index(tmp_path / "idx3", classes_file, model=other_tiny_model, dataset="oxford_pets")
    assert "model" in run(*base[:2], "--index", tmp_path / "idx3", *base[4:], ok=False).output
    # the same index with more texts (a new text generation)
    from coder_index import TextIndex, TextItem

    TextIndex.open(built_index.path, encoder=encoder).add_texts([TextItem("pug", "attribute", "pug which has a cape")])
    assert "generation" in run(*base, ok=False).output
    res = run(*base, "--top-k", "3", "--overwrite")
    assert f"classified {len(WEIRD) + 1} images" in res.output
    TextIndex.open(built_index.path, encoder=encoder).add_pair_texts({("pug", "beagle"): ["a flat face"],
                                                                      ("beagle", "pug"): ["long ears"]})
    res = run(*base, "--top-k", "3", "--rerank", "--llm", "none", ok=False)
    assert res.exit_code == 1 and "the method" in res.output and "'coder*'" in res.output
    # the index moved elsewhere is still the same index: resuming is fine
    moved = tmp_path / "moved-index"
    shutil.copytree(built_index.path, moved)
    res = run(*base[:2], "--index", moved, *base[4:], "--top-k", "3")
    assert "classified 0 images" in res.output
    # rows of an unknown run are not resumed
    out.with_name("p.csv.run.json").unlink()
    assert "unknown run" in run(*base, "--top-k", "3", ok=False).output


def test_unwritable_out_fails_before_any_model_loads(built_index, weird_folder, tmp_path, monkeypatch):
    from coder_index.model import encoder as encoder_module

    def no_model(*a, **k):
        raise AssertionError("the model must not load before the output is checked")

    monkeypatch.setattr(encoder_module.ClipEncoder, "__init__", no_model)
    (tmp_path / "file").write_text("x")
    res = run("classify", weird_folder, "--index", built_index.path, "--out", tmp_path / "file" / "p.csv", ok=False)
    assert res.exit_code == 1 and "is not a directory" in res.output
    res = run("classify", weird_folder, "--index", built_index.path, "--out", tmp_path / "p.txt", ok=False)
    assert res.exit_code == 1 and ".csv or .jsonl" in res.output


def test_special_files_as_inputs_and_outputs_never_hang(built_index, tmp_path, tiny_model):
    """A FIFO given where a file is expected (--out, its errors file, a class list, a descriptor or
    knowledge file, a labels CSV, a caption sidecar) is refused at once, naming it."""
    folder = tmp_path / "imgs"
    (folder / "pug").mkdir(parents=True)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder / "pug" / "a.png")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name in ("out.csv", "out2.csv.errors.csv", "classes.txt", "desc.json", "labels.csv"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "real-classes.txt").write_text("pug\n")
    cases = [
        (["classify", folder, "--index", built_index.path, "--out", tmp_path / "out.csv"], "out.csv"),
        (["classify", folder, "--index", built_index.path, "--out", tmp_path / "out2.csv"], "out2.csv.errors.csv"),
        (["build", tmp_path / "i1", "--classes", tmp_path / "classes.txt", "--model", tiny_model], "classes.txt"),
        (["build", tmp_path / "i2", "--classes", tmp_path / "real-classes.txt", "--model", tiny_model,
          "--descriptors", tmp_path / "desc.json"], "desc.json"),
        (["eval", tmp_path / "labels.csv", "--index", built_index.path, "--out", tmp_path / "rep", "--llm", "none"],
         "labels.csv"),
    ]
    for args, culprit in cases:
        proc = subprocess.run([sys.executable, "-m", "coder_index_cli.main", *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and culprit in proc.stderr and "regular file" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    (folder / "pug" / "a.txt").unlink(missing_ok=True)
    os.mkfifo(folder / "pug" / "a.txt")  # an img2dataset-style caption sidecar that is a FIFO: no caption
    from coder_index.pipeline.ingest_corpus import folder_captions

    with pytest.raises(Exception, match="no captions"):
        folder_captions(folder, None)


def _messy(tmp_path):
    from images import make_messy_folder

    return make_messy_folder(tmp_path / "messy")


def test_outputs_that_differ_by_extension_share_no_file(built_index, tmp_path):
    """p.csv and p.jsonl in one folder: two runs, two errors files, two run records; removing one
    output's files (rm p.csv*) leaves the other resumable and a fresh run of the first possible."""
    from images import BAD, GOOD

    folder = _messy(tmp_path)
    outs = {fmt: tmp_path / f"p.{fmt}" for fmt in ("csv", "jsonl")}
    for out in outs.values():
        run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    for fmt, out in outs.items():
        assert len(read_rows(out)) == len(GOOD)
        with open(tmp_path / f"p.{fmt}.errors.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == len(BAD)
        assert (tmp_path / f"p.{fmt}.run.json").is_file()
    assert not (tmp_path / "p.errors.csv").exists()
    for p in tmp_path.glob("p.csv*"):
        p.unlink()
    res = run("classify", folder, "--index", built_index.path, "--out", outs["csv"], "--workers", "0", "-q")
    assert "done in earlier runs" not in res.output and len(read_rows(outs["csv"])) == len(GOOD)
    res = run("classify", folder, "--index", built_index.path, "--out", outs["jsonl"], "--workers", "0", "-q")
    assert f"{len(GOOD) + len(BAD)} done in earlier runs" in res.output


@pytest.mark.parametrize("holder", ["p.csv", "p.csv.errors.csv", "both"])
def test_a_refusal_names_the_file_that_holds_the_rows(built_index, tmp_path, holder):
    folder = _messy(tmp_path)
    out = tmp_path / "p.csv"
    run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    (tmp_path / "p.csv.run.json").unlink()
    if holder != "both":
        other = ({"p.csv", "p.csv.errors.csv"} - {holder}).pop()
        (tmp_path / other).unlink()
    res = run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q", ok=False)
    assert res.exit_code == 1
    names = ["p.csv", "p.csv.errors.csv"] if holder == "both" else [holder]
    message = res.output.replace(str(tmp_path) + "/", "")
    assert f"{' and '.join(names)} hold" in message and "--overwrite" in message, res.output
    res = run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q", "--overwrite")
    assert not (tmp_path / "p.errors.csv").exists()


def test_an_errors_file_of_an_older_version_is_taken_over_on_resume(built_index, tmp_path):
    """Runs begun by coder-index 0.2 listed errors in p.errors.csv: resuming keeps them (the bad
    files are not read again) and moves them to p.csv.errors.csv."""
    from images import BAD, GOOD

    folder = _messy(tmp_path)
    out = tmp_path / "p.csv"
    run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0", "-q")
    (tmp_path / "p.csv.errors.csv").rename(tmp_path / "p.errors.csv")
    res = run("classify", folder, "--index", built_index.path, "--out", out, "--workers", "0")
    assert f"{len(GOOD) + len(BAD)} done in earlier runs" in res.output
    assert (tmp_path / "p.csv.errors.csv").is_file() and not (tmp_path / "p.errors.csv").exists()


# ---------------------------------------------------------------------------------------------- listed files
def test_single_files_and_file_lists_classify_like_the_folder(built_index, weird_folder, tmp_path, monkeypatch):
    """An image file, several, or a --files-from list (newline- or NUL-separated, from a file or
    stdin, names with newlines and bytes that are not UTF-8): rows name the files as listed and
    equal the folder's rows; a listed path that is missing, a folder or a FIFO is an error row;
    a rerun resumes."""
    from scores import assert_same_ranking

    monkeypatch.chdir(weird_folder)
    names = sorted(p.name for p in weird_folder.iterdir() if p.name != WEIRD[-1])
    folder_out = tmp_path / "folder.jsonl"
    run("classify", ".", "--index", built_index.path, "--out", folder_out, "--workers", "0", "-q")
    by_name = {Path(r["path"]).name: r for r in map(json.loads, folder_out.read_text().splitlines())}

    def rows_of(out):
        return {r["path"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}

    one = tmp_path / "one.jsonl"
    run("classify", "plain.jpg", "--index", built_index.path, "--out", one, "--workers", "0", "-q")
    assert list(rows_of(one)) == ["plain.jpg"]
    os.mkfifo(tmp_path / "fifo.jpg")
    listing = b"\0".join([os.fsencode(n) for n in names] + [b"missing.png", b"..", os.fsencode(tmp_path / "fifo.jpg"),
                                                             os.fsencode(names[0])])  # a repeat: one row
    (tmp_path / "list0").write_bytes(listing + b"\0")
    for how, out in (("file", tmp_path / "l.jsonl"), ("stdin", tmp_path / "s.jsonl")):
        args = ["classify", "--files-from", str(tmp_path / "list0") if how == "file" else "-", "-0", "--index",
                str(built_index.path), "--out", str(out), "--workers", "0", "-q"]
        res = CliRunner().invoke(cli, args, input=listing if how == "stdin" else None, catch_exceptions=False)
        assert res.exit_code == 3, res.output  # incomplete: missing.png is listed to retry
        got = rows_of(out)
        assert sorted(got) == names
        for n in names:
            a, b = got[n], by_name[n]
            assert_same_ranking([t["label"] for t in a["top_k"]], [t["score"] for t in a["top_k"]],
                                [t["label"] for t in b["top_k"]], [t["score"] for t in b["top_k"]])
        with open(out.with_name(out.name + ".errors.csv"), newline="") as f:
            errors = {r["path"]: r["error"] for r in csv.DictReader(f)}
        assert set(errors) == {"missing.png", "..", str(tmp_path / "fifo.jpg")}
        assert "no such file" in errors["missing.png"] and "directory" in errors[".."] and "FIFO" in errors[
            str(tmp_path / "fifo.jpg")]
    # newline-separated lists (names without newlines) and a resumed run
    plain = [n for n in names if "\n" not in n and "\r" not in n]
    (tmp_path / "list").write_bytes(b"\n".join(os.fsencode(n) for n in plain) + b"\n")
    out = tmp_path / "nl.csv"
    run("classify", "--files-from", tmp_path / "list", "--index", built_index.path, "--out", out, "--workers", "0",
        "-q")
    assert sorted(read_rows(out)) == sorted(plain)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:5])  # interrupted: rows lost, one torn
    res = run("classify", "--files-from", tmp_path / "list", "--index", built_index.path, "--out", out, "--workers",
              "0")
    assert "2 done in earlier runs" in res.output
    assert sorted(read_rows(out)) == sorted(plain)


def test_file_inputs_are_checked_before_work(built_index, weird_folder, tmp_path):
    res = run("classify", weird_folder, weird_folder / "plain.jpg", "--index", built_index.path, "--out",
              tmp_path / "p.csv", ok=False)
    assert res.exit_code == 2 and "one folder" in res.output
    res = run("classify", "--index", built_index.path, "--out", tmp_path / "p.csv", ok=False)
    assert res.exit_code == 2 and "--files-from" in res.output
    os.mkfifo(tmp_path / "list.fifo")
    res = run("classify", "--files-from", tmp_path / "list.fifo", "--index", built_index.path, "--out",
              tmp_path / "p.csv", ok=False)
    assert res.exit_code == 1 and "not a regular file" in res.output and "--files-from -" in res.output


@pytest.mark.parametrize("extra", [[], ["--rerank", "--llm", "none"]], ids=["coder", "coder*"])
def test_scores_do_not_depend_on_the_batch_beyond_the_stated_tolerance(built_index, tmp_path, extra):
    """The promise of tests/scores.py and the README: batch sizes 1, 3 and 64 give every image the
    same ranking, scores within SCORE_ATOL."""
    from images import make_messy_folder
    from scores import assert_same_ranking, csv_ranking

    folder = make_messy_folder(tmp_path / "messy")
    results = {}
    for bs in ("1", "3", "64"):
        out = tmp_path / f"b{bs}.csv"
        run("classify", folder, "--index", built_index.path, "--out", out, "--batch-size", bs, "--workers", "0",
            "--top-k", "3", "-q", *extra)
        with open(out, newline="") as f:
            results[bs] = {r["path"]: csv_ranking(r) for r in csv.DictReader(f)}
    for bs in ("1", "3"):
        assert results[bs].keys() == results["64"].keys()
        for path, (labels, scores) in results[bs].items():
            assert_same_ranking(labels, scores, *results["64"][path], what=(bs, path))


def test_the_writer_thread_writes_in_order_and_hands_back_a_failed_write():
    import errno

    from coder_index.pipeline.local_engine import WriterThread as _WriterThread

    seen = []
    w = _WriterThread(lambda *a: seen.append(a), depth=2)
    for i in range(50):
        w.put(i)
    w.close()
    assert seen == [(i,) for i in range(50)]

    def full(i):
        if i == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        seen.append(i)

    seen.clear()
    w = _WriterThread(full, depth=1)
    with pytest.raises(OSError) as err:
        for i in range(100):
            w.put(i)
        w.close()
    assert err.value.errno == errno.ENOSPC and seen == [0, 1, 2]
