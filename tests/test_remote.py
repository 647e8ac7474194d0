"""Data where it lives: webdataset shards by URL (a local HTTP server that misbehaves on purpose, an
S3-compatible server, pipe: commands) and compressed shards, classified as the same shards on the
local disk are; faults retried or reported; credentials never shown; embeddings written to the
object store; image URLs in a file list."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import run_cli as run
from http_server import Fault, FileServer, fast_retries
from s3_server import environ, s3_fs, s3_server, use_in_process
from scores import assert_same_ranking, csv_ranking
from test_shards import photos, read_saved, write_shards

PASSWORD = "pa55-Word-never-shown-7"




def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def errors(out: Path, retry: str | None = None) -> dict[str, str]:
    """path -> reason of OUT's errors file (``retry``: only the rows marked so, "yes" or "no")."""
    p = out.with_name(out.name + ".errors.csv")
    if not p.exists():
        return {}
    with open(p, newline="") as f:
        return {r["path"]: r["error"] for r in csv.DictReader(f) if retry is None or r["retry"] == retry}


def by_key(table: dict[str, dict]) -> dict[str, dict]:
    """Rows keyed by SHARD-FILE/KEY: the same sample, whatever the shard was called."""
    return {f"{p.rsplit('/', 2)[-2].split('.')[0]}/{p.rsplit('/', 1)[-1]}": r for p, r in table.items()}


def everything_written(tmp_path: Path, out: Path) -> str:
    """Every file a run wrote beside OUT, as text (for secrets)."""
    text = ""
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.name.startswith(out.name):
            text += p.read_text(errors="replace")
    return text


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar_index):
    """Three .tar shards, their .tar.gz twins, and the rows of the local .tar shards (the reference)."""
    root = tmp_path_factory.mktemp("remote-shards")
    tars = write_shards(root / "tar", photos(14), per_shard=6)
    (root / "gz").mkdir()
    for t in tars:
        (root / "gz" / (t.name + ".gz")).write_bytes(gzip.compress(t.read_bytes()))
    out = root / "local.csv"
    run("classify", root / "tar", "--index", cifar_index, "--out", out, "--workers", "0", "-q")
    return {"root": root, "tars": tars, "reference": by_key(rows(out))}


def assert_same_rows(got: dict[str, dict], reference: dict[str, dict]) -> None:
    assert by_key(got).keys() == reference.keys()
    for key, r in by_key(got).items():
        assert_same_ranking(*csv_ranking(r), *csv_ranking(reference[key]), what=key)


# ---------------------------------------------------------------------------------------------- equal rows
@pytest.mark.parametrize("workers", [0, 2])
def test_http_shards_and_compressed_shards_give_the_local_rows(cifar_index, shards, tmp_path, workers):
    root = shards["root"]
    with FileServer(root) as server:
        cases = {"http": [server.base_url + "/tar/{00000..00002}.tar"],
                 "http-gz": [server.base_url + "/gz/{00000..00002}.tar.gz"],
                 "local-gz": [str(root / "gz")],
                 "pipe": [f"pipe:cat {t}" for t in shards["tars"]]}
        for name, specs in cases.items():
            out = tmp_path / f"{name}.csv"
            res = run("classify", *specs, "--index", cifar_index, "--out", out, "--workers", workers, "--batch-size",
                      "4", "-q")
            assert out.exists(), (name, res.output)
            got = rows(out)
            assert errors(out) == {}, name
            if name == "pipe":
                assert all(p.startswith("pipe:cat ") for p in got)
                got = {p.replace("pipe:cat ", "").replace(str(root) + "/", ""): r for p, r in got.items()}
            assert_same_rows(got, shards["reference"])
            if name.startswith("http"):
                assert all(p.startswith(server.base_url + "/") for p in got)  # rows name URL/KEY
            done = out.with_name(out.name + ".units-done").read_text().splitlines()
            assert len(done) == 3
        # each shard read once, front to back, never whole before its first image (one request each)
        assert sum(1 for p, _, _ in server.requests if p.startswith("tar/")) == 3


def test_a_rerun_opens_no_complete_shard_and_a_cut_run_resumes_at_the_image(cifar_index, shards, tmp_path):
    root = shards["root"]
    with FileServer(root) as server:
        url = server.base_url + "/tar/{00000..00002}.tar"
        out = tmp_path / "p.csv"
        run("classify", url, "--index", cifar_index, "--out", out, "--workers", "0", "-q")
        before = len(server.requests)
        res = run("classify", url, "--index", cifar_index, "--out", out, "--workers", "0", "-q")
        assert "classified 0 images" in res.output and len(server.requests) == before  # nothing re-read
        # forget that shard 1 was complete and drop two of its rows: only those two are classified again
        done_file = out.with_name(out.name + ".units-done")
        kept = [ln for ln in done_file.read_text().splitlines() if not ln.endswith("00001.tar")]
        done_file.write_text("\n".join(kept) + "\n")
        lines = out.read_text().splitlines()
        dropped = [ln for ln in lines if "/00001.tar/" in ln][:2]
        out.write_text("\n".join(ln for ln in lines if ln not in dropped) + "\n")
        res = run("classify", url, "--index", cifar_index, "--out", out, "--workers", "0", "-q")
        assert "classified 2 images" in res.output
        assert [p for p, _, _ in server.requests[before:]] == ["tar/00001.tar"]
    got = rows(out)
    assert len(got) == 14 == len(set(got)) and errors(out) == {}
    assert_same_rows(got, shards["reference"])


@pytest.mark.slow
def test_killed_mid_stream_and_rerun_every_image_once(cifar_index, shards, tmp_path):
    root = shards["root"]
    with FileServer(root) as server:
        url = server.base_url + "/gz/{00000..00002}.tar.gz"
        out = tmp_path / "k.csv"
        code = ("import sys; from coder_index_cli.main import cli; cli(sys.argv[1:])")
        env = {**os.environ, "CODER_INDEX_CRASH_AT": "classify.rows_written#2"}
        args = ["classify", url, "--index", str(cifar_index), "--out", str(out), "--workers", "0", "--batch-size", "3",
                "-q"]
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert 0 < len(rows(out)) < 14
        run(*args)
    got = rows(out)
    assert len(got) == 14 and errors(out) == {}
    assert_same_rows(got, shards["reference"])


# ---------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", [
    {"status": [503, 503]}, {"status": [429]}, {"reset_after": 0.5}, {"cut_after": 0.3},
    {"stall_after": 0.25, "stall": 4.0}, {"reset_after": 0.2, "times": 3},
], ids=["503x2", "429", "reset", "cut-body", "stall", "reset-thrice"])
@pytest.mark.parametrize("kind", ["tar", "gz"])
def test_transient_faults_are_retried_and_lose_nothing(cifar_index, shards, tmp_path, monkeypatch, fault, kind):
    """Byte faults strike at a fraction of the shard (compressed or not); the retry goes on from there."""
    fast_retries(monkeypatch)
    name = "00001.tar" + (".gz" if kind == "gz" else "")
    size = (shards["root"] / kind / name).stat().st_size
    fault = Fault(**{k: int(v * size) if k.endswith("_after") else list(v) if isinstance(v, list) else v
                     for k, v in fault.items()})
    byte_fault = not fault.status  # (the server consumes the statuses)
    with FileServer(shards["root"] / kind) as server:
        server.faults[name] = fault
        out = tmp_path / "f.csv"
        run("classify", server.base_url + "/{00000..00002}.tar" + (".gz" if kind == "gz" else ""), "--index",
            cifar_index, "--out", out, "--workers", "0", "-q")
        ranges = [r for p, r, _ in server.requests if p == name]
        assert len(ranges) >= 2  # retried
        if byte_fault:  # cut in the body: the retry goes on from the byte where the read stopped
            assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges[1:]), ranges
    assert errors(out) == {}
    assert_same_rows(rows(out), shards["reference"])


def test_retries_spent_report_the_shard_and_keep_the_rest(cifar_index, shards, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    with FileServer(shards["root"] / "tar") as server:
        server.faults["00001.tar"] = Fault(status=[503] * 50)
        out = tmp_path / "r.csv"
        res = run("classify", server.base_url + "/{00000..00002}.tar", "--index", cifar_index, "--out", out,
                  "--workers", "0", "-q", ok=False)
        assert res.exit_code == 3, res.output  # incomplete: the rest is classified, the shard named
        errs = errors(out, retry="yes")
        bad = server.base_url + "/00001.tar"
        assert list(errs) == [bad] and "HTTP 503" in errs[bad] and "4 tries" in errs[bad] and not errors(out, "no")
        assert {k.split("/")[0] for k in by_key(rows(out))} == {"00000", "00002"}
        assert "1 input(s) could not be read" in res.output and bad in res.output and "hold no image" not in res.output
        # the server recovers: the rerun reads only the shard that failed, and its row leaves the errors file
        server.faults.clear()
        n = len(server.requests)
        res = run("classify", server.base_url + "/{00000..00002}.tar", "--index", cifar_index, "--out", out,
                  "--workers", "0", "-q")
        assert [p for p, _, _ in server.requests[n:]] == ["00001.tar"] and errors(out) == {}
        assert "1 input(s) earlier runs could not read tried again" in res.output
    assert_same_rows(rows(out), shards["reference"])


def test_a_missing_shard_by_url_is_one_row_to_retry_and_the_rest_is_classified(cifar_index, shards, tmp_path,
                                                                                 monkeypatch):
    fast_retries(monkeypatch)
    with FileServer(shards["root"] / "tar") as server:
        server.faults["00001.tar"] = Fault(status=[404] * 50)
        out = tmp_path / "m.csv"
        for _ in range(2):  # every rerun reads the others' rows from OUT, and tries the missing shard once more
            n = len(server.requests)
            res = run("classify", server.url("{00000..00002}.tar"), "--index", cifar_index, "--out", out, "--workers",
                      "0", "-q", ok=False)
            assert res.exit_code == 3 and "not found (HTTP 404)" in res.output and "Traceback" not in res.output
            assert sum(1 for p, _, _ in server.requests[n:] if p == "00001.tar") == 1  # not retried within a run
        assert list(errors(out, retry="yes")) == [server.url("00001.tar")]
        assert {k.split("/")[0] for k in by_key(rows(out))} == {"00000", "00002"}


@pytest.mark.parametrize("status, says", [(403, "forbidden (HTTP 403)"), (401, "not authorised (HTTP 401)")])
def test_refusals_stop_at_once_with_one_line(cifar_index, shards, tmp_path, monkeypatch, status, says):
    fast_retries(monkeypatch)
    with FileServer(shards["root"] / "tar") as server:
        server.faults["00001.tar"] = Fault(status=[status] * 50)
        out = tmp_path / "s.csv"
        res = run("classify", server.url("{00000..00002}.tar", "user", PASSWORD), "--index", cifar_index, "--out",
                  out, "--workers", "0", "-q", ok=False)
        assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output
        assert len([ln for ln in res.output.splitlines() if ln.startswith("Error")]) == 1
        assert sum(1 for p, _, _ in server.requests if p == "00001.tar") == 1  # not retried
    assert PASSWORD not in res.output + everything_written(tmp_path, out)


def test_credentials_never_shown_anywhere(cifar_index, shards, tmp_path, monkeypatch, caplog):
    fast_retries(monkeypatch)
    with FileServer(shards["root"] / "tar", auth=("user", PASSWORD)) as server:
        server.faults["00002.tar"] = Fault(status=[503] * 50)   # an error row, naming the shard
        url = server.url("{00000..00002}.tar", "user", PASSWORD)
        signed = url + f"?X-Amz-Signature=sig{PASSWORD}&X-Amz-Credential=cred{PASSWORD}&keep=1"
        out = tmp_path / "c.csv"
        res = CliRunner().invoke(cli, ["-v", "classify", signed, "--index", str(cifar_index), "--out", str(out),
                                       "--workers", "0", "--save-embeddings", str(tmp_path / "emb"), "-q"])
        assert res.exit_code == 3, res.output  # incomplete: one shard could not be read
        assert all(auth for _, _, auth in server.requests)  # the credentials were used
    got = rows(out)
    assert len(got) == 12 and all(p.startswith(server.base_url + "/") and "keep=1" in p for p in got)
    written = everything_written(tmp_path, out) + res.output + caplog.text
    written += "".join(p.read_text(errors="replace") for p in (tmp_path / "emb").rglob("*.json*"))
    import pyarrow.parquet as pq

    for part in (tmp_path / "emb" / "metadata").glob("*.parquet"):
        written += json.dumps(pq.read_table(part).to_pylist())
    assert PASSWORD not in written and "user:" not in written and "Signature" not in written
    assert "00002.tar" in next(iter(errors(out)))


def test_a_refusal_names_the_url_without_its_password(cifar_index, shards, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    with FileServer(shards["root"] / "tar", auth=("user", PASSWORD)) as server:
        for url in (server.url("nope-{0..1}.tar", "user", PASSWORD),
                    server.url("00000.tar", "user", "wrong" + PASSWORD)):
            res = run("classify", url, "--index", cifar_index, "--out", tmp_path / "d.csv", ok=False)
            assert res.exit_code == 1 and PASSWORD not in res.output and "127.0.0.1" in res.output


def test_pipe_commands_that_fail_stop_the_run_clearly(cifar_index, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    res = run("classify", "pipe:exit 3", "--index", cifar_index, "--out", tmp_path / "p.csv", ok=False)
    assert res.exit_code == 1 and "exited with status 3" in res.output and "Traceback" not in res.output, res.output


# ---------------------------------------------------------------------------------------------- object store
@pytest.fixture(scope="module")
def s3(shards):
    with s3_server() as env:
        fs = s3_fs(env)
        fs.mkdir("data")
        for t in shards["tars"]:
            fs.put_file(str(t), f"data/tar/{t.name}")
        yield env


def test_s3_shards_and_embeddings_to_s3(cifar_index, shards, tmp_path, s3, monkeypatch):
    use_in_process(s3, monkeypatch)
    out = tmp_path / "s3.csv"
    run("classify", "s3://data/tar/{00000..00002}.tar", "--index", cifar_index, "--out", out, "--workers", "2",
        "--save-embeddings", "s3://data/emb/", "--embeddings-part-rows", "5", "-q")
    got = rows(out)
    assert all(p.startswith("s3://data/tar/") for p in got)
    assert_same_rows(got, shards["reference"])
    # the embeddings live in the bucket, in clip-retrieval's layout, row for row with OUT
    local = tmp_path / "emb"
    s3_fs(s3).get("data/emb/", str(local), recursive=True)
    emb, meta = read_saved(local)
    assert [m["image_path"] for m in meta] == list(got) or sorted(m["image_path"] for m in meta) == sorted(got)
    assert emb.shape == (14, 32) and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    assert json.loads((local / "embeddings.json").read_text())["out"] == str(out.resolve())
    assert not (tmp_path / "s3.csv.embeddings-staging").exists() or \
        not any((tmp_path / "s3.csv.embeddings-staging").iterdir())
    # a folder of shards in the bucket, listed
    out2 = tmp_path / "s3-folder.csv"
    run("classify", "s3://data/tar/", "--index", cifar_index, "--out", out2, "--workers", "0", "-q")
    assert by_key(rows(out2)).keys() == shards["reference"].keys()
    # a missing object stops at once
    res = run("classify", "s3://data/tar/missing.tar", "--index", cifar_index, "--out", tmp_path / "m.csv", ok=False)
    assert res.exit_code == 1 and "not found" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("point", ["embeddings.staged", "classify.rows_written", "embeddings.metadata_written",
                                   "embeddings.part_written"])
def test_embeddings_to_s3_killed_anywhere_one_per_row_after_the_rerun(cifar_index, shards, tmp_path, s3, point):
    out = tmp_path / "k.csv"
    prefix = f"data/emb-{point}/"
    args = ["classify", "s3://data/tar/{00000..00002}.tar", "--index", str(cifar_index), "--out", str(out),
            "--workers", "0", "--batch-size", "3", "--save-embeddings", f"s3://{prefix}", "--embeddings-part-rows",
            "4", "-q"]
    code = "import sys; from coder_index_cli.main import cli; cli(sys.argv[1:])"
    env = {**environ(s3), "CODER_INDEX_CRASH_AT": f"{point}#2"}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=environ(s3), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    local = tmp_path / "emb"
    s3_fs(s3).get(prefix, str(local), recursive=True)
    _, meta = read_saved(local)
    assert sorted(m["image_path"] for m in meta) == sorted(rows(out)) and len(rows(out)) == 14


def test_a_scheme_whose_package_is_missing_names_the_extra(cifar_index, tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from coder_index_cli.main import cli; cli(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "classify", "s3://bucket/{0..1}.tar", "--index",
                           str(cifar_index), "--out", str(tmp_path / "x.csv")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "pip install 'coder-index[cloud]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- listed URLs
def test_image_urls_in_a_file_list(cifar_index, shards, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    samples = photos(6)
    for key, data in samples:
        (folder / f"{key}.img").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with FileServer(folder, auth=("u", PASSWORD)) as server:
        listing = tmp_path / "list.txt"
        urls = [server.url(f"{k}.img", "u", PASSWORD) for k, _ in samples]
        listing.write_text("\n".join([*urls, server.url("broken.jpg", "u", PASSWORD),
                                      server.url("missing.jpg", "u", PASSWORD)]) + "\n")
        out = tmp_path / "l.csv"
        res = run("classify", "--files-from", listing, "--index", cifar_index, "--out", out, "--workers", "2", "-q",
                  ok=False)
        assert res.exit_code == 3, res.output  # the missing URL is to retry, as a missing file or shard is
        got, errs = rows(out), errors(out)
        assert len(got) == len(samples) and all(p.startswith(server.base_url + "/") for p in got)
        # the reason a local file with these bytes gets (core.decode reads it from the bytes)
        assert errs[server.base_url + "/broken.jpg"] == \
            "truncated JPEG image (the file ends before the image data does)"
        assert "not found" in errors(out, retry="yes")[server.base_url + "/missing.jpg"]
    assert PASSWORD not in res.output + everything_written(tmp_path, out)
    # the same images read from the disk give the same scores
    local = tmp_path / "local.csv"
    run("classify", *[folder / f"{k}.img" for k, _ in samples], "--index", cifar_index, "--out", local, "--workers",
        "0", "-q")
    ref = {Path(p).name: r for p, r in rows(local).items()}
    for p, r in got.items():
        assert_same_ranking(*csv_ranking(r), *csv_ranking(ref[p.rsplit("/", 1)[-1]]), what=p)


def test_shards_copy(tmp_path):
    """The server fixture serves what it is given (a check of the test's own server)."""
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 10)
    from coder_index.core.remote import fetch_bytes

    with FileServer(tmp_path) as server:
        assert fetch_bytes(server.url("a.bin")) == (tmp_path / "a.bin").read_bytes()
    shutil.rmtree(tmp_path / "a.bin", ignore_errors=True)


# ---------------------------------------------------------------------------------------------- corpus, eval
def test_corpus_from_shards_local_compressed_and_by_url(cifar_index, shards, tmp_path):
    """corpus build --images SHARDS: each sample's image with its KEY.txt caption, whatever the shards are."""
    from coder_index.stores.corpus import Corpus

    root = shards["root"]
    with FileServer(root) as server:
        specs = {"tar": [str(root / "tar")], "gz": [str(root / "gz" / "{00000..00002}.tar.gz")],
                 "http": [server.base_url + "/gz/{00000..00002}.tar.gz"]}
        built = {}
        for name, args in specs.items():
            out = tmp_path / f"corpus-{name}"
            res = run("corpus", "build", out, *[a for s in args for a in ("--images", s)], "--index", cifar_index,
                      "--workers", "0", "-q")
            assert "14 rows" in res.output, res.output
            c = Corpus(out)
            assert c.manifest["rows"] == 14
            built[name] = c
    import sqlite3

    def captions(c: Corpus) -> list[str]:
        con = sqlite3.connect(c.path / "meta.sqlite")
        return sorted(r[0] for r in con.execute("select caption from rows"))

    assert captions(built["tar"]) == captions(built["gz"]) == captions(built["http"])
    assert all(c.startswith("a photo numbered ") for c in captions(built["tar"]))


def test_corpus_from_shards_without_captions_leaves_nothing(cifar_index, tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        for key, data in photos(3)[:2]:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = run("corpus", "build", tmp_path / "c", "--images", tmp_path / "x.tar", "--index", cifar_index, "--workers",
              "0", "-q", ok=False)
    assert res.exit_code == 1 and "no captioned image" in res.output and not (tmp_path / "c").exists()


def test_eval_reads_image_urls_from_a_labels_csv(cifar_index, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    samples = photos(9)[:9]
    for key, data in samples:
        (folder / f"{key}.jpg").write_bytes(data)
    local_csv = tmp_path / "local.csv"
    local_csv.write_text("path,label\n" + "".join(f"imgs/{k}.jpg,{k.split('_')[0]}\n" for k, _ in samples))
    with FileServer(folder, auth=("u", PASSWORD)) as server:
        url_csv = tmp_path / "urls.csv"
        url_csv.write_text("path,label\n" + "".join(f"{server.url(k + '.jpg', 'u', PASSWORD)},{k.split('_')[0]}\n"
                                                    for k, _ in samples))
        reps = {}
        for name, data in (("local", local_csv), ("urls", url_csv)):
            out = tmp_path / f"rep-{name}"
            run("eval", data, "--index", cifar_index, "--out", out, "--methods", "clip,coder", "--llm", "none",
                "--workers", "0", "--tsne-samples", "0", "-q")
            reps[name] = json.loads((out / "report.json").read_text())
    assert reps["urls"]["images"] == reps["local"]["images"] == 9
    for a, b in zip(reps["urls"]["methods"], reps["local"]["methods"], strict=True):
        assert a["name"] == b["name"] and abs(a["top1"] - b["top1"]) < 1e-9
    assert PASSWORD not in (tmp_path / "rep-urls" / "report.json").read_text()


def test_pipe_reads_in_a_process_with_many_open_files():
    """select() refuses descriptors past 1,023: a process holding many files must still read a command."""
    import resource

    from coder_index.core.remote import open_stream

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} open files; the case needs more than 1,100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with open_stream("pipe:printf 'a%.0s' $(seq 1 5000)") as stream:  # as a shard given on the command line
            assert stream.read() == b"a" * 5000
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_command_in_a_file_list_or_a_labels_csv_is_never_run(cifar_index, tmp_path):
    """pipe: runs only when the user types it as a shard; lists and CSVs are data, maybe someone else's."""
    marker = tmp_path / "ran"
    listing = tmp_path / "list.txt"
    listing.write_text(f"pipe:touch {marker}\n")
    out = tmp_path / "l.csv"
    run("classify", "--files-from", listing, "--index", cifar_index, "--out", out, "--workers", "0", "-q")
    assert not marker.exists() and "never from a file list" in errors(out)[f"pipe:touch {marker}"]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\npipe:touch {marker},cat\n")
    res = run("eval", labels, "--index", cifar_index, "--out", tmp_path / "rep", "--methods", "coder", "--llm",
              "none", "--workers", "0", "--tsne-samples", "0", "-q", ok=False)
    assert not marker.exists()
    if res.exit_code == 0:  # the line is a (missing) file relative to the CSV: skipped, never run
        assert json.loads((tmp_path / "rep" / "report.json").read_text())["skipped"] == 1


def test_eval_of_a_class_folder_in_an_object_store(cifar_index, tmp_path, s3, monkeypatch):
    """DATA/<class>/<image> in a bucket: listed there, read there; the same report as from the disk."""
    use_in_process(s3, monkeypatch)
    local = tmp_path / "data"
    for key, blob in [p for p in photos(9) if not p[0].startswith("png")]:
        cls = key.split("_")[0]
        (local / cls).mkdir(parents=True, exist_ok=True)
        (local / cls / f"{key}.jpg").write_bytes(blob)
    fs = s3_fs(s3)
    fs.put(str(local) + "/", "data/labelled/", recursive=True)
    reps = {}
    for name, data in (("local", local), ("s3", "s3://data/labelled/")):
        out = tmp_path / f"rep-{name}"
        run("eval", data, "--index", cifar_index, "--out", out, "--methods", "clip,coder", "--llm", "none", "--workers",
            "0", "--tsne-samples", "0", "-q")
        reps[name] = json.loads((out / "report.json").read_text())
    assert reps["s3"]["images"] == reps["local"]["images"] == 9 and reps["s3"]["data"] == "s3://data/labelled/"
    for a, b in zip(reps["s3"]["methods"], reps["local"]["methods"], strict=True):
        assert a["name"] == b["name"] and abs(a["top1"] - b["top1"]) < 1e-9
    res = run("eval", tmp_path / "nope", "--index", cifar_index, "--out", tmp_path / "x", ok=False)
    assert res.exit_code == 2 and "does not exist" in res.output


def test_fetching_an_object_whole_never_runs_a_command(tmp_path):
    """What is fetched whole is named by data (lists, CSVs, rows): a pipe: there is refused, not run."""
    from coder_index.core.remote import RemoteError, fetch_bytes

    marker = tmp_path / "ran"
    with pytest.raises(RemoteError, match="only when given as a shard on the command line"):
        fetch_bytes(f"pipe:touch {marker}")
    assert not marker.exists()
