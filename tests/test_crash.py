"""Writers killed (SIGKILL) at deterministic points leave consistent files, readers change nothing, and
the next run finishes the job: index writes, adapter and corpus builds, and output rows."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex, TextItem
from coder_index.stores.verify import verify_index
from coder_index_cli.main import cli

from images import make_messy_folder

ADD = textwrap.dedent("""
    import sys
    from coder_index import ClipEncoder, TextIndex, TextItem
    path, model = sys.argv[1:3]
    index = TextIndex.open(path, encoder=ClipEncoder(model, device="cpu"))
    index.add_texts([TextItem("pug", "attribute", f"pug which has trait {i}") for i in range(20)])
    print("survived")
""")


def run_killed(code: str, args: list[str], point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CODER_INDEX_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL at the point, not a clean exit
    assert "survived" not in proc.stdout
    return proc


@pytest.mark.parametrize("hook", ["CODER_INDEX_CRASH_AT=index.committed", "CODER_INDEX_CRASH_ONCE=index.committed:{m}",
                                  "CODER_INDEX_PAUSE_AT=index.write_locked:600"])
def test_fault_hooks_are_inert_outside_a_test_run(built_index, tiny_model, tmp_path, hook):
    """A hook variable left in a user's environment changes nothing: without CODER_INDEX_TEST_RUN the
    writer neither dies nor sleeps, and Ray's workers are not handed the hook."""
    from coder_index.engines.ray_common import worker_env

    name, value = hook.split("=", 1)
    env = {k: v for k, v in os.environ.items() if k != "CODER_INDEX_TEST_RUN"}
    env[name] = value.format(m=tmp_path / "marker")
    before = built_index.counts()["texts"]["attribute"]
    proc = subprocess.run([sys.executable, "-c", ADD, str(built_index.path), tiny_model], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]
    assert TextIndex.open(built_index.path).counts()["texts"]["attribute"] == before + 20
    probe = "import json; from coder_index.engines.ray_common import worker_env; print(json.dumps(worker_env()))"
    out = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                                    check=True).stdout)
    assert name not in out and "CODER_INDEX_CACHE_DIR" in out
    assert worker_env().get("CODER_INDEX_TEST_RUN") == os.environ["CODER_INDEX_TEST_RUN"]  # a test run forwards it


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("point, expect_new", [
    ("faiss.torn_write", False),       # half of the pending FAISS file on disk
    ("index.faiss_written", False),    # FAISS written aside, SQLite not committed: previous state
    ("index.committed", True),         # SQLite committed, FAISS not renamed: new state
    ("index.renamed", True),           # renamed, manifest counts not yet updated
    ("atomic.temp_written", True),     # the manifest's temp file written, not renamed
])
def test_killed_index_writer(built_index, tiny_model, encoder, point, expect_new):
    before = built_index.counts()["texts"]["attribute"]
    run_killed(ADD, [built_index.path, tiny_model], point)
    files = snapshot(built_index.path)

    index = TextIndex.open(built_index.path, encoder=encoder)   # a reader: checks pass, nothing changes
    assert index.counts()["texts"]["attribute"] == before + (20 if expect_new else 0)
    table = index.text_table()
    assert len(table) == sum(index.counts()["texts"].values())
    hits = index.nearest_texts(table.embeddings[-1:], k=1)
    assert hits[0][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert snapshot(built_index.path) == files

    # the next writer finishes or discards the interrupted write, and a retried write lands exactly once
    res = index.add_texts([TextItem("pug", "attribute", f"pug which has trait {i}") for i in range(20)])
    assert res.added == (0 if expect_new else 20)
    assert index.add_texts([TextItem("pug", "attribute", "pug which has a new trait")]).added == 1
    assert not [p.name for p in index.path.iterdir() if ".faiss.g" in p.name or p.name.endswith(".tmp")]
    ids = index.text_table().ids
    assert len(ids) == len(np.unique(ids))  # every text once (the file is class-ordered, not id-ordered)
    rep = verify_index(index.path, check_model=False)
    assert rep.ok, rep.problems


CREATE = textwrap.dedent("""
    import sys
    from coder_index import ClipEncoder, TextIndex
    TextIndex.create(sys.argv[1], ClipEncoder(sys.argv[2], device="cpu"))
    print("survived")
""")


@pytest.mark.parametrize("point", ["faiss.torn_write", "atomic.temp_written"])
def test_killed_creator_never_blocks_a_rerun(tmp_path, tiny_model, encoder, point):
    run_killed(CREATE, [tmp_path / "idx", tiny_model], point)
    with pytest.raises(Exception, match="is not a coder-index index"):
        TextIndex.open(tmp_path / "idx")
    index = TextIndex.create(tmp_path / "idx", encoder)   # the leftovers of the dead creator are cleared
    assert verify_index(index.path, check_model=False).ok
    assert sorted(p.name for p in index.path.iterdir()) == [".lock", "manifest.json", "meta.sqlite", "pairs.faiss",
                                                             "texts.faiss"]


def _write_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("red", "green"):
        for j in range(n):
            (folder / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / c / f"{j}.png")


FIT = textwrap.dedent("""
    import sys
    from coder_index_cli.main import cli
    cli(["fewshot", "fit", sys.argv[1], "--index", sys.argv[2], "--shots", "2", "--out", sys.argv[3],
         "--augment-epochs", "1", "--workers", "0", "--search", "fast"], standalone_mode=False)
    print("survived")
""")


@pytest.mark.slow  # 20 s: opt in with -m slow (the default run stays under 10 minutes on 2 cores)
def test_killed_adapter_and_corpus_builds(tmp_path, tiny_model):
    (tmp_path / "classes.txt").write_text("red\ngreen\n")
    assert CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(tmp_path / "classes.txt"),
                                    "--model", tiny_model]).exit_code == 0
    _write_images(tmp_path / "train", 4)
    run_killed(FIT, [tmp_path / "train", tmp_path / "idx", tmp_path / "ad"], "staged.before_rename")
    assert not (tmp_path / "ad").exists()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ad.")]
    assert left  # a dead builder's staging folder: harmless, and removed by the next build
    res = CliRunner().invoke(cli, ["fewshot", "fit", str(tmp_path / "train"), "--index", str(tmp_path / "idx"),
                                   "--shots", "2", "--out", str(tmp_path / "ad"), "--augment-epochs", "1",
                                   "--workers", "0", "--search", "fast"])
    assert res.exit_code == 0, res.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ad.")]

    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\n" + "".join(f"{c}/{j}.png,a {c} thing\n" for c in ("red", "green")
                                               for j in range(4)))
    corpus = textwrap.dedent("""
        import sys
        from coder_index_cli.main import cli
        cli(["corpus", "build", sys.argv[1], "--images", sys.argv[2], "--captions", sys.argv[3], "--index",
             sys.argv[4], "--workers", "0", "--batch-size", "2"], standalone_mode=False)
        print("survived")
    """)
    for point in ("corpus.ingesting", "staged.before_rename"):
        run_killed(corpus, [tmp_path / "corpus", tmp_path / "train", caps, tmp_path / "idx"], point)
        assert not (tmp_path / "corpus").exists()
    res = CliRunner().invoke(cli, ["corpus", "build", str(tmp_path / "corpus"), "--images", str(tmp_path / "train"),
                                   "--captions", str(caps), "--index", str(tmp_path / "idx"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["rows"] == 8


CLASSIFY = textwrap.dedent("""
    import sys
    from coder_index_cli.main import cli
    cli(["classify", sys.argv[1], "--index", sys.argv[2], "--out", sys.argv[3], "--workers", "0",
         "--batch-size", "3", "-q"], standalone_mode=False)
    print("survived")
""")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_killed_mid_record_resumes_exactly_once(built_index, tiny_model, tmp_path, fmt):
    folder = make_messy_folder(tmp_path / "messy")
    weird = folder / "a" / "line\nbreak,\"quoted\"\r.png"
    os.link(folder / "a" / "red_0.jpg", weird)
    out = tmp_path / f"p.{fmt}"
    run_killed(CLASSIFY, [folder, built_index.path, out], "output.mid_record")
    assert out.exists() and out.stat().st_size > 0
    res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(built_index.path), "--out", str(out),
                                   "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    if fmt == "csv":
        with open(out, newline="", encoding="utf-8") as f:
            rows = [r["path"] for r in csv.DictReader(f)]
    else:
        rows = [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(set(rows)) and str(folder) + "/a/line\nbreak,\"quoted\"\r.png" in rows
