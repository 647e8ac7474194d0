"""One input model: every source (a folder, a file list, image URLs, local, compressed, HTTP and S3
shards, pipe: commands, parquet files local, by HTTP and in S3) gives the same rows for the same
images, and the same fault gets the same outcome wherever the data lives:

* a unit that cannot be read is one errors-file row marked ``retry``; the others are classified; the
  summary names it; the exit status is 3 (incomplete); a rerun reads only it;
* a refusal for every unit (no credentials, a bucket that does not exist, authentication) stops at
  once with one line, status 1;
* a run that read nothing never exits 0 and never blames the images;
* one retry layer: a dead unit costs at most the policy's attempts, counted at the server.

Parquet files are written by Hugging Face ``datasets`` itself and by pyarrow in img2dataset's layout;
labelled shards (``.cls``) and parquet (a label column) evaluate as the same images in class folders.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR_CLASSES as CLASSES
from conftest import run_cli as run
from http_server import Fault, FileServer, fast_retries
from s3_server import s3_fs, s3_server, use_in_process
from scores import assert_same_ranking, csv_ranking
from test_shards import photos

BUCKET = "sources-tests"




def rows(out: Path) -> dict[str, dict]:
    if not out.exists():
        return {}
    with open(out, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def errors(out: Path, retry: str | None = None) -> dict[str, str]:
    p = out.with_name(out.name + ".errors.csv")
    if not p.exists():
        return {}
    with open(p, newline="") as f:
        return {r["path"]: r["error"] for r in csv.DictReader(f) if retry is None or r["retry"] == retry}


def key_of(row: str) -> str:
    """The image a row names, whatever the source: its file stem or its container key."""
    return Path(row.rsplit("/", 1)[-1]).stem


# ---------------------------------------------------------------------------------------------- the data
def ext_of(blob: bytes) -> str:
    return "png" if blob.startswith(b"\x89PNG") else "jpg"


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[str, bytes]], labels: bool = False) -> None:
    with tarfile.open(path, "w") as tf:
        for key, data in samples:
            add(tf, f"{key}.{ext_of(data)}", data)
            add(tf, f"{key}.txt", f"a photo numbered {key}".encode())
            if labels:
                add(tf, f"{key}.cls", str(CLASSES.index(key.split("_")[0])).encode())


def write_img2dataset_parquet(path: Path, samples: list[tuple[str, bytes]], row_group: int = 3,
                              failed: bool = False, signed: bool = False) -> None:
    """img2dataset's parquet output: key, jpg (bytes), caption, url, status, width, height, ...
    (``signed``: the URLs carry credentials and a signature, which must never be written out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {"key": [], "jpg": [], "caption": [], "url": [], "status": [], "width": [],
                             "error_message": []}
    for key, data in samples:
        for name, value in (("key", key), ("jpg", data), ("caption", f"a photo numbered {key}"),
                            ("url", f"http://u:pw-SECRET@example.org/{key}.jpg?X-Amz-Signature=SECRET{key}"
                             if signed else f"http://example.org/{key}.jpg"), ("status", "success"), ("width", 32),
                            ("error_message", None)):
            cols[name].append(value)
    if failed:  # a failed download: img2dataset keeps the row, its image null
        for name, value in (("key", "zz_failed"), ("jpg", None), ("caption", "gone"), ("url", "http://x/y"),
                            ("status", "failed_to_download"), ("width", None), ("error_message", "404")):
            cols[name].append(value)
    table = pa.table({k: pa.array(v, type=pa.binary() if k == "jpg" else None) for k, v in cols.items()})
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture(scope="module")
def data(tmp_path_factory, cifar_index):
    """The same 11 images as a folder, shards (plain and gzip), img2dataset parquet, and the rows of the
    folder as the reference; plus 2 more images for the unit a fault test adds later."""
    root = tmp_path_factory.mktemp("sources-data")
    samples = photos(9)
    extra = [(f"cat_new{i}", d) for i, (_, d) in enumerate(photos(12)[9:11])]
    (root / "folder").mkdir()
    for key, blob in samples + extra:
        (root / "folder" / f"{key}.{ext_of(blob)}").write_bytes(blob)
    for sub in ("tar", "gz", "pq"):
        (root / sub).mkdir()
    import gzip

    for i in range(3):
        part = samples[i * 4:(i + 1) * 4]
        write_tar(root / "tar" / f"{i:05d}.tar", part)
        (root / "gz" / f"{i:05d}.tar.gz").write_bytes(gzip.compress((root / "tar" / f"{i:05d}.tar").read_bytes()))
    write_img2dataset_parquet(root / "pq" / "00000.parquet", samples[:6])
    write_img2dataset_parquet(root / "pq" / "00001.parquet", samples[6:])
    out = root / "reference.csv"
    run("classify", root / "folder", "--index", cifar_index, "--out", out, "--workers", "0", "-q")
    return {"root": root, "samples": samples, "extra": extra, "reference": {key_of(p): r for p, r in rows(out).items()}}


def assert_rows_are_the_images(got: dict[str, dict], reference: dict[str, dict], keys: set[str]) -> None:
    assert sorted(key_of(p) for p in got) == sorted(keys)  # each image once
    for p, r in got.items():
        assert_same_ranking(*csv_ranking(r), *csv_ranking(reference[key_of(p)]), what=p)


# ---------------------------------------------------------------------------------------------- every source
class Kinds:
    """Each source kind over the same images, with one unit that cannot be read and a way to mend it.

    ``make(kind)`` -> (args, the failing unit's row in the errors file, mend()): ``args`` classify the
    good units and the failing one; ``mend`` makes the failing unit readable (it then holds
    ``data["extra"]``)."""

    LOCAL = ("folder", "files", "local-shards", "gz-shards", "pipe", "parquet")
    REMOTE = ("url-list", "http-shards", "http-parquet", "s3-shards", "s3-parquet")

    def __init__(self, data: dict, tmp: Path, server: FileServer | None, s3: dict | None) -> None:
        self.data, self.tmp, self.server, self.s3 = data, tmp, server, s3
        self.root = data["root"]

    def make(self, kind: str):  # noqa: ANN201 - (args, unit, mend)
        root, tmp, extra = self.root, self.tmp, self.data["extra"]
        if kind == "folder":
            folder = tmp / "folder"
            folder.mkdir()
            for key, blob in self.data["samples"]:
                (folder / f"{key}.{ext_of(blob)}").write_bytes(blob)
            (folder / "cat_new0.jpg").symlink_to(tmp / "target-new0.jpg")  # a broken link: not read
            return [folder], f"{folder}/cat_new0.jpg", lambda: (tmp / "target-new0.jpg").write_bytes(extra[0][1])
        if kind == "files":
            listing = tmp / "list.txt"
            names = sorted(str(p) for p in (root / "folder").iterdir() if "new" not in p.name)
            gone = tmp / "cat_new0.jpg"
            listing.write_text("\n".join([*names, str(gone)]) + "\n")
            return ["--files-from", listing], str(gone), lambda: gone.write_bytes(extra[0][1])
        if kind == "url-list":
            assert self.server is not None
            served = Path(self.server.root)
            listing = tmp / "urls.txt"
            names = sorted(p.name for p in (root / "folder").iterdir() if "new" not in p.name)
            rel = root.relative_to(served)
            listing.write_text("\n".join(self.server.url(f"{rel}/folder/{n}") for n in names) + "\n" +
                               self.server.url(f"{tmp.name}/cat_new0.jpg") + "\n")
            (served / tmp.name).mkdir(exist_ok=True)
            return (["--files-from", listing], self.server.url(f"{tmp.name}/cat_new0.jpg"),
                    lambda: (served / tmp.name / "cat_new0.jpg").write_bytes(extra[0][1]))
        shards_ext = {"local-shards": ".tar", "gz-shards": ".tar.gz", "pipe": ".tar", "http-shards": ".tar",
                      "s3-shards": ".tar"}
        if kind in shards_ext:
            ext = shards_ext[kind]
            sub = tmp / "shards"
            sub.mkdir()
            for p in (root / ("gz" if ext == ".tar.gz" else "tar")).iterdir():
                (sub / p.name).write_bytes(p.read_bytes())
            missing = sub / f"00003{ext}"

            def mend() -> None:
                write_tar(tmp / "new.tar", extra)
                blob = (tmp / "new.tar").read_bytes()
                if ext == ".tar.gz":
                    import gzip

                    blob = gzip.compress(blob)
                if kind == "s3-shards":
                    s3_fs(self.s3).pipe_file(f"{BUCKET}/{tmp.name}/00003{ext}", blob)
                else:
                    missing.write_bytes(blob)

            if kind == "pipe":
                return [f"pipe:cat {sub}/{{00000..00003}}.tar"], f"pipe:cat {missing}", mend
            if kind == "http-shards":
                rel = sub.relative_to(self.server.root)
                return [self.server.url(f"{rel}/{{00000..00003}}.tar")], self.server.url(f"{rel}/00003.tar"), mend
            if kind == "s3-shards":
                fs = s3_fs(self.s3)
                for p in sorted(sub.iterdir()):
                    fs.put_file(str(p), f"{BUCKET}/{tmp.name}/{p.name}")
                return [f"s3://{BUCKET}/{tmp.name}/{{00000..00003}}.tar"], f"s3://{BUCKET}/{tmp.name}/00003.tar", mend
            return [f"{sub}/{{00000..00003}}{ext}"], str(missing), mend
        if kind in ("parquet", "http-parquet", "s3-parquet"):
            sub = tmp / "pq"
            sub.mkdir()
            for p in (root / "pq").iterdir():
                (sub / p.name).write_bytes(p.read_bytes())
            missing = sub / "00002.parquet"

            def mend_parquet() -> None:
                write_img2dataset_parquet(tmp / "new.parquet", extra)
                if kind == "s3-parquet":
                    s3_fs(self.s3).put_file(str(tmp / "new.parquet"), f"{BUCKET}/{tmp.name}/00002.parquet")
                else:
                    (tmp / "new.parquet").rename(missing)

            if kind == "http-parquet":
                rel = sub.relative_to(self.server.root)
                return ([self.server.url(f"{rel}/{{00000..00002}}.parquet")], self.server.url(f"{rel}/00002.parquet"),
                        mend_parquet)
            if kind == "s3-parquet":
                fs = s3_fs(self.s3)
                for p in sorted(sub.iterdir()):
                    fs.put_file(str(p), f"{BUCKET}/{tmp.name}/{p.name}")
                where = f"s3://{BUCKET}/{tmp.name}"
                return [f"{where}/{{00000..00002}}.parquet"], f"{where}/00002.parquet", mend_parquet
            return [f"{sub}/{{00000..00002}}.parquet"], str(missing), mend_parquet
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        s3_fs(env).mkdir(BUCKET)  # moto's buckets live as long as the process: a name of this module's own
        yield env


@pytest.fixture
def server(tmp_path):
    with FileServer(tmp_path.parent) as srv:
        yield srv


@pytest.mark.parametrize("kind", Kinds.LOCAL + Kinds.REMOTE)
def test_a_unit_that_cannot_be_read_is_one_row_to_retry_whatever_the_source(cifar_index, data, tmp_path, kind,
                                                                            server, s3, monkeypatch):
    fast_retries(monkeypatch)
    use_in_process(s3, monkeypatch)
    args, unit, mend = Kinds(data, tmp_path, server, s3).make(kind)
    out = tmp_path / "p.csv"
    res = run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "--batch-size", "3", "-q",
              code=3)
    good = {k for k, _ in data["samples"]}
    assert_rows_are_the_images(rows(out), data["reference"], good)
    assert list(errors(out, retry="yes")) == [unit] and not errors(out, retry="no")
    assert "1 input(s) could not be read" in res.output and unit.split("//")[-1] in res.output
    assert "hold no image" not in res.output and "holds no image" not in res.output
    # the same again: the unit is tried once more, nothing else is read, nothing doubled
    res = run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "-q", code=3)
    assert "classified 0 images" in res.output and list(errors(out, retry="yes")) == [unit]
    # mended: the rerun reads only it, the errors file no longer lists it, and the run is complete
    mend()
    res = run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "-q", code=0)
    added = {k for k, _ in data["extra"]} if kind not in ("folder", "files", "url-list") else {"cat_new0"}
    assert f"classified {len(added)} images" in res.output, res.output
    assert errors(out) == {}
    reference = {**data["reference"], **{key_of(p): r for p, r in rows(out).items() if key_of(p) in added}}
    assert_rows_are_the_images(rows(out), reference, good | added)


@pytest.mark.parametrize("kind", ["local-shards", "gz-shards", "parquet", "http-parquet"])
def test_a_damaged_unit_keeps_what_was_read_before_and_is_retried(cifar_index, data, tmp_path, kind, server,
                                                                 monkeypatch):
    """A unit cut short (a tar cut in a member, a gzip stream cut, a parquet file truncated): its
    images read before the damage are kept, the unit is one row to retry, the others are classified."""
    fast_retries(monkeypatch)
    args, _, _ = Kinds(data, tmp_path, server, None).make(kind)
    sub = tmp_path / ("pq" if "parquet" in kind else "shards")
    victim = sorted(p for p in sub.iterdir())[1]
    blob = victim.read_bytes()
    if victim.name.endswith(".tar"):  # cut inside the last image's data (not in the record's zero padding)
        with tarfile.open(victim) as tf:
            last = [m for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))][-1]
        victim.write_bytes(blob[: last.offset_data + last.size // 2])
    else:
        victim.write_bytes(blob[: len(blob) * 2 // 3])
    out = tmp_path / "d.csv"
    res = run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "-q", code=3)
    retry = errors(out, retry="yes")
    assert len(retry) == 2, retry  # the damaged unit, and the one that does not exist (the fixture's)
    damaged = next(k for k in retry if "00003" not in k and "00002.parquet" not in k)
    assert victim.name in damaged and ("damaged" in retry[damaged] or "cut short" in retry[damaged]
                                       or "truncated" in retry[damaged] or "ends" in retry[damaged]), retry
    assert "could not be read" in res.output
    got = rows(out)
    assert len(got) == len(set(got)) and len(got) >= len(data["samples"]) - 5
    # the rerun reads it again and, still damaged, adds nothing twice
    run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "-q", code=3)
    assert rows(out) == got


@pytest.mark.parametrize("kind", ["http-shards", "url-list", "http-parquet"])
def test_nothing_read_never_exits_0_and_never_blames_the_images(cifar_index, tmp_path, kind, monkeypatch):
    fast_retries(monkeypatch)
    (tmp_path / "list.txt").write_text("http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b.jpg\n")
    args = {"http-shards": ["http://127.0.0.1:9/{0..1}.tar"], "url-list": ["--files-from", tmp_path / "list.txt"],
            "http-parquet": ["http://127.0.0.1:9/{0..1}.parquet"]}[kind]
    out = tmp_path / "n.csv"
    res = run("classify", *args, "--index", cifar_index, "--out", out, "-q", ok=False)
    assert res.exit_code == 1, res.output
    assert "nothing could be read" in res.output and "onnection" in res.output  # the real reason
    assert "no image" not in res.output and "unreadable file" not in res.output.split("nothing")[1]


@pytest.mark.parametrize("kind", ["s3-shards", "s3-parquet"])
def test_no_credentials_or_no_bucket_stop_at_once_with_one_line(cifar_index, tmp_path, s3, kind, monkeypatch):
    fast_retries(monkeypatch)
    use_in_process(s3, monkeypatch)
    ext = ".tar" if kind == "s3-shards" else ".parquet"
    out = tmp_path / "c.csv"
    res = run("classify", f"s3://no-such-bucket-here/{{0..3}}{ext}", "--index", cifar_index, "--out", out, "-q",
              code=1)
    assert "bucket does not exist" in res.output and "Traceback" not in res.output
    # no credentials anywhere the library looks: one line naming the cause and where to set them
    empty = tmp_path / "empty"
    empty.write_text("")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    res = run("classify", f"s3://{BUCKET}/x/{{0..3}}{ext}", "--index", cifar_index, "--out", out, "-q", code=1)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "no credentials" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], res.output
    assert not rows(out)


def test_one_retry_layer_a_dead_s3_unit_costs_the_policys_attempts(cifar_index, tmp_path, monkeypatch):
    """An S3 endpoint that answers 503 to everything: botocore and s3fs retry nothing of their own, so the
    requests the server sees are those of coder-index's policy (4 attempts here), not their product."""
    fast_retries(monkeypatch)
    import fsspec.config
    import s3fs

    from s3_server import FAKE_KEY

    with FileServer(tmp_path) as server:
        server.faults = _AlwaysFailing()
        for k, v in FAKE_KEY.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.base_url})
        s3fs.S3FileSystem.clear_instance_cache()
        res = run("classify", "s3://bucket/dead.tar", "--index", cifar_index, "--out", tmp_path / "r.csv", "-q",
                  code=1)
        assert "503" in res.output
        assert 1 <= len(server.requests) <= 4, server.requests  # the policy's attempts, no more


class _AlwaysFailing(dict):
    def get(self, path, default=None):  # noqa: ANN001, ANN201 - the FileServer's fault lookup
        return Fault(status=[503])


# ---------------------------------------------------------------------------------------------- pipe:
def test_braces_inside_pipe_are_one_command_per_shard_as_webdataset_expands_them(cifar_index, data, tmp_path):
    import braceexpand

    spec = f"pipe:cat {data['root']}/tar/{{00000..00002}}.tar"
    out = tmp_path / "p.csv"
    run("classify", spec, "--index", cifar_index, "--out", out, "--workers", "2", "-q")
    got = rows(out)
    commands = {p.rsplit("/", 1)[0] for p in got}
    assert commands == set(braceexpand.braceexpand(spec)) and len(commands) == 3
    assert_rows_are_the_images(got, data["reference"], {k for k, _ in data["samples"]})
    # a command that fails mid-shard fails that shard: the others are classified
    broken = tmp_path / "broken.sh"
    broken.write_text(f"head -c 3000 {data['root']}/tar/00001.tar; exit 7\n")
    out = tmp_path / "q.csv"
    res = run("classify", f"pipe:cat {data['root']}/tar/00000.tar", f"pipe:sh {broken}", "--index", cifar_index,
              "--out", out, "--workers", "0", "-q", code=3)
    assert list(errors(out, "yes")) == [f"pipe:sh {broken}"] and "status 7" in res.output
    assert {key_of(p) for p in rows(out)} >= {k for k, _ in data["samples"][:4]}


# ---------------------------------------------------------------------------------------------- parquet
def test_parquet_written_by_hugging_face_datasets_gives_the_folder_rows(cifar_index, data, tmp_path):
    import datasets

    samples = data["samples"]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["truck", "cat", "ship"])})
    images = [{"bytes": blob, "path": f"{key}.jpg"} for key, blob in samples]
    labels = [["truck", "cat", "ship"].index(k.split("_")[0]) if k.split("_")[0] in CLASSES else 0 for k, _ in samples]
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)
    ds.to_parquet(str(tmp_path / "hf.parquet"), batch_size=4)
    out = tmp_path / "hf.csv"
    run("classify", tmp_path / "hf.parquet", "--index", cifar_index, "--out", out, "--workers", "2", "-q")
    got = rows(out)
    # rows are FILE/ROW-NUMBER (a datasets file has no key column): the row numbers are the samples' order
    assert sorted(int(p.rsplit("/", 1)[1]) for p in got) == list(range(len(samples)))
    for p, r in got.items():
        key = samples[int(p.rsplit("/", 1)[1])][0]
        assert p.startswith(f"{tmp_path}/hf.parquet/")
        assert_same_ranking(*csv_ranking(r), *csv_ranking(data["reference"][key]), what=p)


def test_img2dataset_parquet_rows_are_keys_and_a_failed_download_is_named(cifar_index, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_img2dataset_parquet(tmp_path / "x.parquet", data["samples"], row_group=2, failed=True, signed=True)
    out = tmp_path / "x.csv"
    emb = tmp_path / "emb"
    run("classify", "x.parquet", "--index", cifar_index, "--out", out, "--workers", "2", "--save-embeddings", emb, "-q")
    got = rows(out)
    assert_rows_are_the_images(got, data["reference"], {k for k, _ in data["samples"]})
    assert all(p == f"x.parquet/{key_of(p)}" for p in got)
    assert errors(out, "no") == {"x.parquet/zz_failed": "skipped: no image in this row (status: failed_to_download)"}
    # the caption and the other columns travel to --save-embeddings' metadata
    import pyarrow.parquet as pq

    meta = [m for part in sorted((emb / "metadata").glob("*.parquet")) for m in pq.read_table(part).to_pylist()]
    assert sorted(m["key"] for m in meta) == sorted(k for k, _ in data["samples"])
    assert all(m["caption"] == f"a photo numbered {m['key']}" and json.loads(m["json"])["status"] == "success"
               and m["shard"] == "x.parquet" for m in meta)
    assert all(json.loads(m["json"])["url"] == f"http://example.org/{m['key']}.jpg" for m in meta)  # shown, no secret
    assert "SECRET" not in json.dumps(meta)
    # every row explains from the predictions file (the parquet row found by its key)
    res = run("explain", "--index", cifar_index, "--predictions", out, "--row", "1", "--row", str(len(got)), "--json")
    assert [r["path"] for r in json.loads(res.output)] == [list(got)[0], list(got)[-1]]


def test_parquet_columns_named_by_options_and_refused_clearly(cifar_index, data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = data["samples"][:4]
    table = pa.table({"id": [f"n{i}" for i in range(4)], "pixels": pa.array([b for _, b in samples], pa.binary())})
    pq.write_table(table, tmp_path / "o.parquet")
    out = tmp_path / "o.csv"
    res = run("classify", tmp_path / "o.parquet", "--index", cifar_index, "--out", out, "-q", code=1)
    assert "no image column" in res.output and "--image-column" in res.output and "pixels" in res.output
    assert not out.exists()
    res = run("classify", tmp_path / "o.parquet", "--image-column", "nope", "--index", cifar_index, "--out", out, "-q",
              code=1)
    assert "no column 'nope'" in res.output
    run("classify", tmp_path / "o.parquet", "--image-column", "pixels", "--key-column", "id", "--index", cifar_index,
        "--out", out, "-q")
    assert sorted(p.rsplit("/", 1)[1] for p in rows(out)) == ["n0", "n1", "n2", "n3"]


def test_a_parquet_of_image_urls_fetches_them_and_a_dead_url_is_retried(cifar_index, data, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fast_retries(monkeypatch)
    with FileServer(data["root"]) as server:
        names = sorted(p.name for p in (data["root"] / "folder").iterdir() if "new" not in p.name)
        urls = [server.url(f"folder/{n}") for n in names] + [server.url("folder/gone.jpg")]
        keys = [Path(n).stem for n in names] + ["gone"]
        pq.write_table(pa.table({"url": urls, "caption": keys, "key": keys}), tmp_path / "urls.parquet",
                       row_group_size=4)
        out = tmp_path / "u.csv"
        run("classify", tmp_path / "urls.parquet", "--index", cifar_index, "--out", out, "--workers", "2", "-q", code=3)
        assert_rows_are_the_images(rows(out), data["reference"], {k for k, _ in data["samples"]})
        assert list(errors(out, "yes")) == [f"{tmp_path}/urls.parquet/gone"]
        (data["root"] / "folder" / "gone.jpg").write_bytes(data["samples"][0][1])
        try:
            n = len(server.requests)
            res = run("classify", tmp_path / "urls.parquet", "--index", cifar_index, "--out", out, "-q")
            assert "classified 1 images" in res.output and errors(out) == {}
            assert [p for p, _, _ in server.requests[n:]] == ["folder/gone.jpg"]  # only the row that failed
        finally:
            (data["root"] / "folder" / "gone.jpg").unlink()


# ---------------------------------------------------------------------------------------------- killed runs
KILLED = ["folder", "files", "local-shards", "gz-shards", "pipe", "parquet", "http-parquet"]


@pytest.mark.parametrize("kind", KILLED)
@pytest.mark.parametrize("point", ["classify.rows_written#2"])
def test_killed_and_rerun_every_image_exactly_once_whatever_the_source(cifar_index, data, tmp_path, kind, point,
                                                                       server):
    args, _, mend = Kinds(data, tmp_path, server, None).make(kind)
    mend()  # every unit readable: the run completes after its rerun
    out = tmp_path / "k.csv"
    cmd = ["classify", *map(str, args), "--index", str(cifar_index), "--out", str(out), "--workers", "0",
           "--batch-size", "2", "-q"]
    env = {**os.environ, "CODER_INDEX_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", "import sys; from coder_index_cli.main import cli; cli(sys.argv[1:])",
                           *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert 0 < len(rows(out)) < len(data["samples"])
    run(*cmd)
    got = rows(out)
    added = {k for k, _ in data["extra"]} if kind not in ("folder", "files") else {"cat_new0"}
    reference = {**data["reference"], **{key_of(p): r for p, r in got.items() if key_of(p) in added}}
    assert_rows_are_the_images(got, reference, {k for k, _ in data["samples"]} | added)
    with open(out, newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == len(set(paths)) and errors(out) == {}


# ---------------------------------------------------------------------------------------------- eval
def test_labelled_shards_and_parquet_evaluate_as_the_same_images_in_class_folders(cifar_index, data, tmp_path):
    import datasets

    labelled = [(k, b) for k, b in data["samples"] if k.split("_")[0] in CLASSES]
    folder = tmp_path / "classes"
    for key, blob in labelled:
        (folder / key.split("_")[0]).mkdir(parents=True, exist_ok=True)
        (folder / key.split("_")[0] / f"{key}.jpg").write_bytes(blob)
    (tmp_path / "wds").mkdir()
    write_tar(tmp_path / "wds" / "0.tar", labelled[:4], labels=True)
    write_tar(tmp_path / "wds" / "1.tar", labelled[4:], labels=True)
    names = ["truck", "cat", "ship"]  # another order than the index's: ClassLabel names are what count
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"img": [{"bytes": b, "path": f"{k}.jpg"} for k, b in labelled],
                                "label": [names.index(k.split("_")[0]) for k, _ in labelled]},
                               features=feats).to_parquet(str(tmp_path / "hf.parquet"))
    reports = {}
    for name, spec in (("folder", folder), ("shards", f"{tmp_path}/wds/{{0..1}}.tar"), ("parquet",
                                                                                        tmp_path / "hf.parquet")):
        out = tmp_path / f"report-{name}"
        run("eval", spec, "--index", cifar_index, "--out", out, "--methods", "clip,coder", "--llm", "none",
            "--tsne-samples", "0", "--workers", "0", "-q")
        reports[name] = json.loads((out / "report.json").read_text())
    ref = reports["folder"]
    assert ref["images"] == len(labelled)
    for name in ("shards", "parquet"):
        got = reports[name]
        assert got["images"] == ref["images"] and got["per_class"] == ref["per_class"], name
        for a, b in zip(got["methods"], ref["methods"], strict=True):
            assert a["name"] == b["name"]
            np.testing.assert_allclose([a["top1"], a["mean_per_class_recall"]], [b["top1"], b["mean_per_class_recall"]],
                                       atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------- every offset
def _tiny_samples() -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        buf = io.BytesIO()
        Image.new("RGB", (4, 3), color).save(buf, "PNG")
        out.append((f"k{i}", buf.getvalue()))
    return out


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "stream"])
@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "gz"])
def test_a_shard_cut_at_every_byte_keeps_whole_samples_before_the_cut_and_says_so(seekable, compressed):
    """The one grouping stage, on a shard cut at every byte offset (a file or a stream, plain or
    gzip): nothing escapes as an exception; the samples it gives are the first ones, whole; it ends
    with the shard done only when nothing was lost, else with one read failure naming the shard."""
    import gzip

    from coder_index.pipeline.sources.base import ReadFailure, Sample, UnitDone
    from coder_index.pipeline.sources.tar_samples import tar_samples

    samples = _tiny_samples()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, blob in samples:
            add(tf, f"{key}.png", blob)
            add(tf, f"{key}.txt", key.encode())
    blob = gzip.compress(buf.getvalue()) if compressed else buf.getvalue()
    complete_from = None
    for cut in range(len(blob) + 1):
        events = list(tar_samples(io.BytesIO(blob[:cut]), "s.tar", seekable=seekable))
        got = [e for e in events if isinstance(e, Sample)]
        assert [(s.key, s.data, s.caption) for s in got] == [(k, b, k) for k, b in samples[:len(got)]], cut
        assert isinstance(events[-1], (UnitDone, ReadFailure)), cut
        assert sum(isinstance(e, (UnitDone, ReadFailure)) for e in events) == 1, cut
        if isinstance(events[-1], UnitDone):
            assert len(got) == len(samples), cut
            complete_from = cut if complete_from is None else complete_from
        else:
            assert events[-1].row == "s.tar" and complete_from is None, cut  # once complete, always complete
    assert complete_from is not None and complete_from <= len(blob)


def test_a_parquet_file_cut_at_every_offset_is_a_read_failure_never_a_crash(tmp_path):
    from coder_index.pipeline.sources.base import ReadFailure, Sample
    from coder_index.pipeline.sources.parquet import ParquetSource

    whole = tmp_path / "whole.parquet"
    write_img2dataset_parquet(whole, _tiny_samples(), row_group=1)
    blob = whole.read_bytes()
    cut_file = tmp_path / "cut.parquet"
    for cut in range(0, len(blob), 7):
        cut_file.write_bytes(blob[:cut])
        events = []
        for unit in ParquetSource([str(cut_file)]).units():
            events += [unit] if isinstance(unit, ReadFailure) else list(unit.read())
        assert any(isinstance(e, ReadFailure) for e in events), cut  # the footer is at the end: never whole
        assert not any(isinstance(e, Sample) for e in events), cut


@pytest.mark.parametrize("name", ["x.tar", "x.tar.gz", "x.parquet"])
def test_a_fifo_named_as_a_unit_is_skipped_never_read(cifar_index, data, tmp_path, name):
    """A FIFO would block a reader forever: it is named in the errors file, the other units are read."""
    good = tmp_path / f"good{name[1:]}"
    if name.endswith(".parquet"):
        write_img2dataset_parquet(good, data["samples"][:3])
    else:
        write_tar(tmp_path / "good.tar", data["samples"][:3])
        if name.endswith(".gz"):
            import gzip

            good.write_bytes(gzip.compress((tmp_path / "good.tar").read_bytes()))
    odd = tmp_path / name
    os.mkfifo(odd)
    out = tmp_path / "f.csv"
    cmd = [sys.executable, "-m", "coder_index_cli.main", "classify", str(good), str(odd), "--index", str(cifar_index),
           "--out", str(out), "--workers", "0", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a read of the FIFO would hang
    assert proc.returncode == 0, proc.stderr  # final: a FIFO is no shard, and no retry can make it one
    assert len(rows(out)) == 3
    assert list(errors(out, "no")) == [str(odd)] and "not a" in errors(out)[str(odd)]
    # a folder named like a shard or parquet file is a folder of them: one that holds none is a usage error
    odd.unlink()
    odd.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{odd} holds no" in proc.stderr, proc.stderr


def test_gcs_keeps_its_own_retries_and_coder_index_adds_none():
    """gcsfs retries each request 6 times and cannot be told not to: for gs:// its layer is the one."""
    from coder_index.core.remote import RetryPolicy, _one_layer

    assert _one_layer("gs", RetryPolicy(attempts=6)).attempts == 1
    assert _one_layer("s3", RetryPolicy(attempts=6)).attempts == 6 and _one_layer(None, RetryPolicy()).attempts == 6


# ---------------------------------------------------------------------------------------------- workers
@dataclasses.dataclass(frozen=True)
class _WhoReads:
    """A unit of one sample that says which decoding worker read it (in its caption)."""

    name: str
    position: int = 0
    skip: frozenset = frozenset()
    single = False
    noun = "unit"
    container = "c"

    def read(self):  # noqa: ANN201 - events
        from torch.utils.data import get_worker_info

        from coder_index.pipeline.sources.base import Sample, UnitDone

        info = get_worker_info()
        yield Sample(f"c/{self.name}", data=_tiny_samples()[0][1], key=self.name, container="c",
                     caption=str(info.id if info is not None else -1))
        yield UnitDone(self.name)

    def split(self, parts):  # noqa: ANN001, ANN201
        return [self]


def test_units_of_many_images_keep_every_worker_busy_and_files_keep_their_order(data):
    import open_clip
    import torch

    from coder_index.pipeline.feed import ReferenceFeed
    from coder_index.pipeline.sources.files import FileUnit

    feed = ReferenceFeed(open_clip.image_transform(32, is_train=False), torch.device("cpu"))
    readers = {s.key: s.caption for b in feed.batches([_WhoReads(f"u{i}", i) for i in range(6)], batch_size=64,
                                                       workers=2) for s in b.samples}
    assert sorted(readers) == [f"u{i}" for i in range(6)] and set(readers.values()) == {"0", "1"}
    files = sorted((data["root"] / "folder").iterdir())
    units = [FileUnit(p.name, str(p), i) for i, p in enumerate(files)]
    got = [s.row for b in feed.batches(units, batch_size=3, workers=2) for s in b.samples]
    assert got == [p.name for p in files]  # one-image units come back in the order given


def test_a_local_tar_split_between_workers_gives_each_sample_once(data):
    from coder_index.pipeline.sources.base import Sample, UnitDone
    from coder_index.pipeline.sources.shards import shard_unit

    unit = shard_unit(str(data["root"] / "tar" / "00000.tar"), 0)
    parts = unit.split(3)
    assert len(parts) == 3
    events = [e for p in parts for e in p.read()]
    keys = sorted(e.key for e in events if isinstance(e, Sample))
    assert keys == sorted(k for k, _ in data["samples"][:4])
    assert sorted((e.part, e.parts) for e in events if isinstance(e, UnitDone)) == [(0, 3), (1, 3), (2, 3)]
    assert shard_unit(str(data["root"] / "gz" / "00000.tar.gz"), 0).split(3) == [
        shard_unit(str(data["root"] / "gz" / "00000.tar.gz"), 0)]  # a stream is read once, whole
