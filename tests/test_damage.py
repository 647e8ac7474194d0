"""Damaged indexes give one clear line naming the file and the fix (never a traceback, never a
silently different answer), opening never writes, `verify` finds every damage, and concurrent
writers never corrupt each other."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex
from coder_index.core.errors import IndexFormatError
from coder_index.stores.faissfile import read_info
from coder_index.stores.verify import verify_index
from coder_index_cli.main import cli


def snapshot(d):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def cli_error(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    return res.output


def _truncate(n):
    def damage(p):
        data = (p / "texts.faiss").read_bytes()
        (p / "texts.faiss").write_bytes(data[:n if n >= 0 else len(data) + n])
    return damage


def _faiss_of(index_factory):
    def damage(p):
        info = read_info(p / "texts.faiss")
        faiss.write_index(index_factory(info), str(p / "texts.faiss"))
    return damage


def _flat_l2(info):
    ix = faiss.IndexIDMap2(faiss.IndexFlatL2(info.dim))
    ix.add_with_ids(np.ones((info.ntotal, info.dim), np.float32), np.arange(1, info.ntotal + 1))
    return ix


def _wider(info):
    ix = faiss.IndexIDMap2(faiss.IndexFlatIP(info.dim + 8))
    ix.add_with_ids(np.ones((info.ntotal, info.dim + 8), np.float32), np.arange(1, info.ntotal + 1))
    return ix


def _permuted_ids(p):
    ix = faiss.read_index(str(p / "texts.faiss"))
    ids = faiss.vector_to_array(ix.id_map)
    vecs = faiss.vector_to_array(faiss.downcast_index(ix.index).codes).view(np.float32).reshape(len(ids), -1)
    out = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    out.add_with_ids(vecs, ids[::-1].copy())
    faiss.write_index(out, str(p / "texts.faiss"))


def _manifest(obj):
    return lambda p: (p / "manifest.json").write_text(json.dumps(obj(json.loads((p / "manifest.json").read_text()))))


DAMAGES = {
    "texts.faiss truncated in the header": (_truncate(20), "texts.faiss"),
    "texts.faiss truncated in the vectors": (_truncate(300), "texts.faiss"),
    "texts.faiss missing its last byte": (_truncate(-1), "texts.faiss"),
    "texts.faiss empty": (_truncate(0), "texts.faiss"),
    "texts.faiss missing": (lambda p: (p / "texts.faiss").unlink(), "texts.faiss"),
    "texts.faiss of another type": (_faiss_of(_flat_l2), "texts.faiss"),
    "texts.faiss of another width": (_faiss_of(_wider), "texts.faiss"),
    "texts.faiss with permuted ids": (_permuted_ids, "texts.faiss"),
    "pairs.faiss truncated": (lambda p: os.truncate(p / "pairs.faiss", 50), "pairs.faiss"),
    "meta.sqlite missing": (lambda p: (p / "meta.sqlite").unlink(), "meta.sqlite"),
    "meta.sqlite garbage": (lambda p: (p / "meta.sqlite").write_bytes(os.urandom(8192)), "meta.sqlite"),
    "meta.sqlite truncated": (lambda p: os.truncate(p / "meta.sqlite", 1000), "meta.sqlite"),
    "meta.sqlite without state": (lambda p: sqlite3.connect(p / "meta.sqlite").execute("delete from state")
                                  .connection.commit(), "meta.sqlite"),
    "manifest a list": (lambda p: (p / "manifest.json").write_text("[1, 2]"), "manifest.json"),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text("{nope"), "manifest.json"),
    "manifest without model": (_manifest(lambda m: {k: v for k, v in m.items() if k != "model"}), "manifest.json"),
    "manifest dim disagrees": (_manifest(lambda m: {**m, "dim": m["dim"] + 1}), "manifest.json"),
    "manifest missing": (lambda p: (p / "manifest.json").unlink(), "manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_damage_is_one_clear_line_and_reading_writes_nothing(built_index, tmp_path, damage):
    apply, culprit = DAMAGES[damage]
    path = built_index.path
    apply(path)
    before = snapshot(path)
    with pytest.raises(IndexFormatError) as err:
        TextIndex.open(path).text_table()
    msg = str(err.value)
    assert culprit in msg and ("rebuild" in msg or "--repair" in msg or "coder-index build" in msg), msg
    assert "\n" not in msg
    assert snapshot(path) == before  # nothing created (meta.sqlite is not recreated) or modified
    out = cli_error("info", path)
    assert culprit in out
    rep = verify_index(path, check_model=False)
    assert not rep.ok and any(culprit in p.file or culprit in p.what for p in rep.problems)


def test_texts_copied_from_another_models_index_are_refused(built_index, tmp_path, other_tiny_model, classes_file):
    from coder_index.pipeline.build import build_index

    build_index(tmp_path / "other", classes_file, model=other_tiny_model, dataset="oxford_pets",
                descriptors=[str(p) for p in []])
    other = TextIndex.open(tmp_path / "other")
    mine = TextIndex.open(built_index.path)
    # same number of texts: copy only the name texts' file of a same-sized index
    assert other.counts()["texts"]["name"] == mine.counts()["texts"]["name"]
    shutil.copy(tmp_path / "other" / "pairs.faiss", built_index.path / "pairs.faiss")  # both empty: identical
    TextIndex.open(built_index.path)
    doctored = tmp_path / "doctored"
    shutil.copytree(built_index.path, doctored)
    ix = faiss.read_index(str(doctored / "texts.faiss"))
    vecs = faiss.vector_to_array(faiss.downcast_index(ix.index).codes).view(np.float32).reshape(ix.ntotal, -1)
    ids = faiss.vector_to_array(ix.id_map)
    rng = np.random.default_rng(0)
    fake = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    fake.add_with_ids(rng.standard_normal(vecs.shape).astype(np.float32), ids)  # another model's vectors
    faiss.write_index(fake, str(doctored / "texts.faiss"))
    with pytest.raises(IndexFormatError, match="not the file this index wrote"):
        TextIndex.open(doctored)


def test_verify_passes_on_a_good_index_and_repairs_the_manifest(built_index):
    rep = verify_index(built_index.path)
    assert rep.ok and any("re-encoded" in c for c in rep.checked), rep
    (built_index.path / "manifest.json").write_text("[]")
    res = CliRunner().invoke(cli, ["verify", str(built_index.path), "--no-model"])
    assert res.exit_code == 1 and "PROBLEM" in res.output and "--repair" in res.output
    res = CliRunner().invoke(cli, ["verify", str(built_index.path), "--repair", "--no-model"])
    assert res.exit_code == 0 and "repaired" in res.output
    assert TextIndex.open(built_index.path).counts()["classes"] == 5


def test_verify_finds_vectors_of_another_model(built_index, encoder):
    """A file whose recorded checksum was forged along with it still fails the model check."""
    path = built_index.path
    ix = faiss.read_index(str(path / "texts.faiss"))
    n, d = ix.ntotal, ix.d
    ids = faiss.vector_to_array(ix.id_map)
    fake = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    v = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    fake.add_with_ids(v / np.linalg.norm(v, axis=1, keepdims=True), ids)
    faiss.write_index(fake, str(path / "texts.faiss"))
    from coder_index.stores.faissfile import fingerprint

    con = sqlite3.connect(path / "meta.sqlite")
    con.execute("update state set value = ? where key = 'file:texts.faiss'", (json.dumps(fingerprint(
        path / "texts.faiss")),))
    con.commit()
    rep = verify_index(path)
    assert not rep.ok and "not this model's embeddings" in rep.problems[0].what


CREATE_AND_ADD = textwrap.dedent("""
    import sys
    from coder_index import ClipEncoder, TextIndex, TextItem
    path, model, tag = sys.argv[1:4]
    index = TextIndex.create(path, ClipEncoder(model, device="cpu"), exist_ok=True)
    index.add_classes(["pug", "beagle"])
    index.add_texts([TextItem("pug", "attribute", f"pug which has {tag} trait {i}") for i in range(15)])
    print("ok")
""")


@pytest.mark.slow  # the long variant: test_concurrent_build_commands races writers in the default run
def test_concurrent_creators_and_writers(tmp_path, tiny_model, encoder):
    """Four processes create the same new index and write to it at once (creation made slow on
    purpose): all succeed, every text lands once, FAISS and SQLite agree, no temp file is left."""
    path = tmp_path / "idx"
    env = {**os.environ, "CODER_INDEX_PAUSE_AT": "index.create_locked:1.5"}
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_AND_ADD, str(path), tiny_model, f"w{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    index = TextIndex.open(path)
    assert index.counts()["texts"]["attribute"] == 60 and index.counts()["classes"] == 2
    assert len(index.text_table()) == 60
    assert json.loads((path / "manifest.json").read_text())["counts"]["texts"]["attribute"] == 60
    assert verify_index(path, check_model=False).ok
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp") or ".faiss.g" in p.name]


def test_concurrent_build_commands(tmp_path, tiny_model):
    classes = tmp_path / "classes.txt"
    classes.write_text("pug\nbeagle\nsamoyed\n")
    cmd = [sys.executable, "-m", "coder_index_cli.main", "build", str(tmp_path / "idx"), "--classes", str(classes),
           "--model", tiny_model, "--dataset", "oxford_pets"]
    env = {**os.environ, "CODER_INDEX_PAUSE_AT": "index.create_locked:1.0"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-1500:]
    index = TextIndex.open(tmp_path / "idx")
    assert index.counts()["texts"]["name"] == 3 and len(index.text_table()) == 3


def test_a_reader_during_writes_never_sees_a_mixed_state(built_index, tiny_model):
    """Readers open and read while a writer commits six times: never a false 'damaged', never a table
    that mixes generations."""
    base = len(built_index.text_table())
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from coder_index import ClipEncoder, TextIndex, TextItem
        index = TextIndex.open(sys.argv[1], encoder=ClipEncoder(sys.argv[2], device="cpu"))
        for r in range(6):
            index.add_texts([TextItem("pug", "attribute", f"round {r} trait {i}") for i in range(10)])
    """), str(built_index.path), tiny_model], env={**os.environ, "CODER_INDEX_PAUSE_AT": "index.write_locked:0.3"},
        stderr=subprocess.PIPE, text=True)
    seen = set()
    deadline = time.time() + 300
    while writer.poll() is None and time.time() < deadline:
        table = TextIndex.open(built_index.path).text_table()
        assert (len(table) - base) % 10 == 0 and len(np.unique(table.ids)) == len(table.ids)
        seen.add(len(table))
    assert writer.wait(timeout=300) == 0, writer.stderr.read()
    assert len(TextIndex.open(built_index.path).text_table()) == base + 60
    assert len(seen) >= 2  # the reader really ran while the writer wrote


def test_hostile_knowledge_and_descriptor_files(tmp_path, encoder, classes_file):
    from coder_index.core.errors import InputFormatError
    from coder_index.pipeline.build import build_index
    from coder_index.textgen.knowledge import load_knowledge

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputFormatError, match="nests 200000 levels"):
        load_knowledge(deep)
    cases = {
        "source_not_object": ({"classes": {"pug": {"attribute": ["x"], "source": "llm"}}},
                              r'\$\.classes\["pug"\]\.source'),
        "pairs_not_object": ({"classes": {}, "pairs": ["a"]}, r"\$\.pairs must be an object"),
        "pair_row_not_object": ({"classes": {}, "pairs": {"pug": ["beagle"]}}, r'\$\.pairs\["pug"\] must be'),
        "pair_features_not_list": ({"classes": {}, "pairs": {"pug": {"beagle": "ears"}}},
                                   r'\$\.pairs\["pug"\]\["beagle"\] must be a list'),
        "class_entry_string": ({"classes": {"pug": "a dog"}}, r'\$\.classes\["pug"\] must be an object'),
        "attribute_item_number": ({"classes": {"pug": {"attribute": ["x", 3]}}},
                                  r'\$\.classes\["pug"\]\.attribute\[1\] must be a string'),
        "huge_text": ({"classes": {"pug": {"attribute": ["x" * 10_000]}}}, "at most 4000 characters"),
        "classes_list": ({"classes": ["pug"]}, r"\$\.classes must be an object"),
    }
    for name, (body, pattern) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"format": "coder-index/knowledge", "version": 1, **body}))
        with pytest.raises(InputFormatError, match=pattern):
            load_knowledge(p)
        res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes_file),
                                       "--knowledge", str(p)])
        assert res.exit_code == 1 and p.name in res.output and "Traceback" not in res.output
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"pug": ["ok", {"nested": 1}]}))
    with pytest.raises(InputFormatError, match=r'd\.json: \$\["pug"\]\[1\] must be a string'):
        build_index(tmp_path / "idx2", classes_file, encoder=encoder, descriptors=[desc])
    assert not (tmp_path / "idx2").exists() or not any((tmp_path / "idx2").iterdir())


@pytest.fixture(scope="module")
def built_dirs(tmp_path_factory, tiny_model):
    from PIL import Image

    root = tmp_path_factory.mktemp("dirs")
    (root / "classes.txt").write_text("c0\nc1\n")
    assert CliRunner().invoke(cli, ["build", str(root / "idx"), "--classes", str(root / "classes.txt"), "--model",
                                    tiny_model]).exit_code == 0
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        img.save(root / "imgs" / f"c{i % 2}" / f"{i}.png")
    (root / "caps.csv").write_text("path,caption\n" + "".join(f"c{i % 2}/{i}.png,thing {i}\n" for i in range(16)))
    for args in (["fewshot", "fit", root / "imgs", "--index", root / "idx", "--shots", "2", "--out", root / "ad",
                  "--augment-epochs", "1", "--workers", "0", "--search", "fast"],
                 ["corpus", "build", root / "corpus", "--images", root / "imgs", "--captions", root / "caps.csv",
                  "--index", root / "idx", "--workers", "0"]):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert res.exit_code == 0, res.output
    return root


@pytest.mark.parametrize("kind", ["ad", "corpus"])
@pytest.mark.parametrize("damage", ["missing", "half", "garbage", "empty"])
def test_damaged_adapter_and_corpus_files(built_dirs, tmp_path, kind, damage):
    names = sorted(p.name for p in (built_dirs / kind).iterdir())
    for name in names:
        d = tmp_path / f"{kind}-{name}"
        shutil.copytree(built_dirs / kind, d)
        f = d / name
        if damage == "missing":
            f.unlink()
        elif damage == "half":
            os.truncate(f, f.stat().st_size // 2)
        elif damage == "garbage":
            f.write_bytes(os.urandom(max(64, f.stat().st_size)))
        else:
            f.write_bytes(b"")
        option = ["--adapter", d] if kind == "ad" else ["--corpus", d, "--method", "xmore"]
        res = CliRunner().invoke(cli, [str(a) for a in ["classify", built_dirs / "imgs", "--index",
                                                        built_dirs / "idx", "--out", tmp_path / f"{name}.csv",
                                                        *option, "--workers", "0", "-q"]])
        assert res.exit_code == 1, (name, damage, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (name, damage, repr(res.exception))
        assert name in res.output or "damaged" in res.output, (name, damage, res.output)


# ---------------------------------------------------------------------------------------------- meta.sqlite
PAGE = 4096


def _built(tmp_path, tiny_model, name="idx"):
    """An index built by the CLI, with the command that built it (the one a fix must repeat)."""
    from conftest import PET_CLASSES, shared_path

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(PET_CLASSES) + "\n")
    args = ["build", str(tmp_path / name), "--classes", str(classes), "--dataset", "oxford_pets", "--descriptors",
            str(shared_path("data", "descriptors", "descriptors_pets.json")), "--model", tiny_model, "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return tmp_path / name, args


def _follow_the_fix(message, args):
    """The fix a message names, followed literally: its command with the build's own options."""
    assert "--overwrite" in message and "`coder-index build " in message, message
    command = message.split("`coder-index build ")[1].split("`")[0].split()
    assert command == [args[1], "--overwrite"], command
    res = CliRunner().invoke(cli, ["build", *command, *args[2:]])
    assert res.exit_code == 0, res.output


def _answers(path, encoder, images):
    index = TextIndex.open(path, encoder=encoder)
    preds = index.classify(images)
    return preds.labels, np.round(preds.logits, 4).tolist(), index.explain(images, k=3)[0]["prediction"]


@pytest.mark.parametrize("mode", ["garbage", "zeros"])
def test_every_damaged_page_of_meta_sqlite_is_one_clear_line_and_the_fix_works(tmp_path, tiny_model, encoder, mode):
    """Each page of meta.sqlite overwritten in turn: opening, classifying and explaining either answer
    exactly as the intact index does (a page they never read) or fail with one line naming the file
    and a fix; `verify` finds every damaged page; the fix, followed literally, gives a working index."""
    from PIL import Image

    path, args = _built(tmp_path, tiny_model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    intact = _answers(path, encoder, images)
    pages = (path / "meta.sqlite").stat().st_size // PAGE
    assert pages >= 10
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)
    failed = 0
    for page in range(pages):
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        start = PAGE * page + (100 if page == 0 else 0)  # page 1 keeps SQLite's file header in one case
        with open(path / "meta.sqlite", "r+b") as f:
            f.seek(start if mode == "zeros" else PAGE * page)
            f.write(bytes(PAGE * (page + 1) - start) if mode == "zeros" else rng.bytes(PAGE))
        try:
            got = _answers(path, encoder, images)
            assert got == intact, page                  # an unused page: the same answers
        except IndexFormatError as exc:
            failed += 1
            msg = str(exc)
            assert "meta.sqlite" in msg and "\n" not in msg and "sqlalche" not in msg, (page, msg)
            res = CliRunner().invoke(cli, ["info", str(path)])  # info reads fewer pages: it may still work
            assert res.exit_code in (0, 1) and "Traceback" not in res.output and res.exception in (None,) or \
                isinstance(res.exception, SystemExit), (page, res.output)
            if res.exit_code:
                assert "meta.sqlite" in res.output and "--overwrite" in res.output, res.output
        rep = verify_index(path, check_model=False)
        assert not rep.ok, page
        fixes = {p.fix for p in rep.problems}
        _follow_the_fix(next(iter(fixes)), args)
        assert verify_index(path, check_model=False).ok, page
        assert _answers(path, encoder, images) == intact
    assert failed >= pages // 2


@pytest.mark.parametrize("edit", [
    "update texts set class_id = (class_id + 1) % 5",
    "update texts set class_id = 4 - class_id where kind = 'attribute'",
    "update texts set kind = 'synonym' where kind = 'attribute'",
    "update texts set weight = 3 where id % 2 = 0",
    "update classes set name = name || 'x' where id = 2",
    "delete from texts where id = (select max(id) from texts)",
])
def test_edited_metadata_is_never_answered_from(tmp_path, tiny_model, encoder, edit):
    """Metadata that decides a prediction, edited outside coder-index (the same number of rows, or
    not): classify and explain refuse with the file and the fix; verify finds it; the fix works."""
    path, args = _built(tmp_path, tiny_model)
    con = sqlite3.connect(path / "meta.sqlite")
    con.execute(edit)
    con.commit()
    con.close()
    with pytest.raises(IndexFormatError) as err:
        TextIndex.open(path, encoder=encoder).classify(np.eye(1, encoder.embed_dim, dtype=np.float32))
    assert "meta.sqlite" in str(err.value) or "texts.faiss" in str(err.value)
    for command in (["info", path], ["explain", shared_path_image(), "--index", path]):
        assert "--overwrite" in cli_error(*command)
    rep = verify_index(path, check_model=False)
    assert not rep.ok
    _follow_the_fix(str(err.value), args)
    assert verify_index(path, check_model=False).ok


def shared_path_image():
    from conftest import shared_path

    return shared_path("data", "imagenet-samples", "n01440764_tench.JPEG")


def test_overwrite_deletes_only_an_index(tmp_path, tiny_model):
    path, args = _built(tmp_path, tiny_model)
    (path / "notes.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["build", args[1], "--overwrite", *args[2:]])
    assert res.exit_code == 1 and "notes.txt" in res.output and (path / "notes.txt").exists()
    assert (path / "manifest.json").exists()
