"""A new user's first run and everyday use: offline model hub, fast --help, eval failing fast, honest
scores, clear messages for common mistakes, a consistent command line, threads."""

import csv
import json
import os
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from coder_index_cli.main import cli

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


run = run_cli  # conftest's: the command line in this process, as a user types it


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------------------ 1. the model hub
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", pytest.param("unreachable", marks=pytest.mark.slow)])
def test_unreachable_hub_fails_once_fast_with_the_commands_fixes(tmp_path, how):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "HF_HUB_OFFLINE": "1" if how == "HF_HUB_OFFLINE" else "0", "HF_ENDPOINT": closed_port_url()}
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    cases = {
        "build": ["build", tmp_path / "idx", "--classes", tmp_path / "classes.txt", "--model", "ViT-B-32",
                  "--pretrained", "laion2b_s34b_b79k"],
        "generate": ["generate", "--classes", tmp_path / "classes.txt", "--out", tmp_path / "k.json", "--llm", "none",
                     "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"],
    }
    for name, args in cases.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "coder_index_cli.main", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)
        took = time.perf_counter() - t0
        assert proc.returncode == 1, proc.stderr
        err = proc.stderr
        assert err.count("cannot download the weights of ViT-B-32") == 1 and "Retrying" not in err, err
        assert ("HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "cannot be reached") in err
        assert "--pretrained /path/to" in err and "local-dir:" in err and ".." not in err.replace("...", "")
        assert ("--index IDX" in err) == (name == "generate") and ("--pretrained random" in err)
        assert took < 40, took  # the old path spent ~50 s in retries; this is the import time plus one probe


def test_cached_weights_load_without_the_network(tmp_path, monkeypatch, caplog):
    """Weights already in the hub cache load offline, without asking the (unreachable) hub. (And a
    model with untrained weights is said once, in coder-index's words, not by open_clip each time.)"""
    import logging

    import open_clip
    import torch

    from coder_index import ClipEncoder
    from coder_index.model.encoder import _SAID_UNTRAINED
    from coder_index.model.hub import in_cache

    _SAID_UNTRAINED.clear()

    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    repo = cfg["hf_hub"].rstrip("/")
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    with caplog.at_level(logging.INFO):
        random = ClipEncoder("ViT-B-32", "random", device="cpu")
        random.release_text_tower()
        random._ensure_text_tower()  # built a second time in this process: nothing more is said
    assert "No pretrained weights loaded" not in caplog.text
    assert caplog.text.count("untrained (seeded) weights (--pretrained random)") == 1
    torch.save({k: v.float() for k, v in random.model.state_dict().items()}, snap / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert in_cache("ViT-B-32", "laion2b_s34b_b79k", str(tmp_path / "hub"))
    enc = ClipEncoder("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=str(tmp_path / "hub"))
    assert enc.fingerprint.weights_sha256 == random.fingerprint.weights_sha256


def test_wrong_pretrained_and_not_a_checkpoint(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\n")
    res = run("build", tmp_path / "i", "--classes", tmp_path / "classes.txt", "--model", "ViT-B-32",
              "--pretrained", "opneai", ok=False)
    assert res.exit_code == 1 and "--model ViT-B-32 --pretrained openai" in res.output
    (tmp_path / "notes.txt").write_text("these are my notes, not weights\n" * 10)
    res = run("build", tmp_path / "i", "--classes", tmp_path / "classes.txt", "--model", "ViT-B-32",
              "--pretrained", tmp_path / "notes.txt", ok=False)
    assert res.exit_code == 1 and "not a checkpoint" in res.output and "weights_only" not in res.output


def test_generate_help_says_the_index_model_needs_no_download():
    out = run("generate", "--help").output
    assert "nothing is downloaded" in " ".join(out.split())


# ------------------------------------------------------------------------------ 2. fast --help
def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _groups(group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield (*path, name), cmd
            yield from _groups(cmd, (*path, name))


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom coder_index_cli.main import cli\n"
            f"for path in {[list(p) for p, _ in _commands(cli)] + [[]]!r}:\n"
            "    try:\n        cli([*path, '--help'], standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "print([m for m in ('torch', 'open_clip', 'faiss', 'numpy', 'PIL', 'sqlalchemy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------ 3. eval fails fast
def _labelled(root: Path, per_class=3):
    rng = np.random.default_rng(0)
    for c in ("Abyssinian", "Bengal", "beagle", "pug", "samoyed"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_without_a_key_fails_before_any_model_or_image(built_index, tmp_path, monkeypatch):
    from coder_index.model import encoder as encoder_module

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(encoder_module.ClipEncoder, "__init__",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded before the key check")))
    data = _labelled(tmp_path / "data")
    res = run("eval", data, "--index", built_index.path, "--out", tmp_path / "rep", ok=False)
    assert res.exit_code == 1 and "--llm none" in res.output and "--methods" in res.output
    res = run("eval", data, "--index", built_index.path, "--out", tmp_path / "rep", "--mapping",
              tmp_path / "missing.csv", ok=False)
    assert res.exit_code == 2  # a missing mapping file: click refuses it before anything runs


def test_readme_eval_example_runs_offline(built_index, tmp_path, monkeypatch):
    """The README's eval line (default methods, --llm none) works without a key or a network."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    data = _labelled(tmp_path / "data")
    readme = (ROOT / "README.md").read_text()
    assert "coder-index eval ../shared/data/cifar10-test --index cifar-index --out cifar-report --llm none" in readme
    run("eval", data, "--index", built_index.path, "--out", tmp_path / "rep", "--llm", "none", "--workers", "0",
        "--tsne-samples", "0", "-q")
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {m["name"] for m in rep["methods"]} >= {"clip", "vcd", "coder"}
    assert any("coder*" in n for n in rep["notes"])  # no pair texts and no LLM: said, not failed


# ------------------------------------------------------------------------------ 4. honest scores
def test_xmore_scores_are_probabilities(tmp_path, built_index, encoder):
    from coder_index.stores.corpus import build_corpus, laion_chunks, laion_shards

    root = tmp_path / "laion"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    np.save(root / "img_emb" / "img_emb_0.npy", rng.standard_normal((40, encoder.embed_dim)).astype(np.float32))
    pq.write_table(pa.table({"caption": [f"thing {i}" for i in range(40)]}), root / "metadata" / "metadata_0.parquet")
    shards = laion_shards(root)
    build_corpus(tmp_path / "corpus", encoder, laion_chunks(shards, 16), 40, sources={})
    data = _labelled(tmp_path / "data", 2)
    out = tmp_path / "p.jsonl"
    run("classify", data, "--index", built_index.path, "--corpus", tmp_path / "corpus", "--method", "xmore",
        "--out", out, "--top-k", "5", "--workers", "0", "-q")
    for line in out.read_text().splitlines():
        scores = [t["score"] for t in json.loads(line)["top_k"]]
        assert sum(scores) == pytest.approx(1.0, abs=1e-5) and scores == sorted(scores, reverse=True)


# ------------------------------------------------------------------------------ 5. common mistakes
def test_eval_help_first_example_runs_offline_as_written(built_index, tmp_path, monkeypatch):
    """The first example of `eval --help` works on a machine without a key or a network."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    help_text = run("eval", "--help").output
    first = next(line for line in help_text.splitlines() if line.strip().startswith("coder-index eval "))
    words = first.split("#")[0].split()[2:]  # after 'coder-index eval'
    data = _labelled(tmp_path / "data")
    words[0] = str(data)
    words[words.index("--index") + 1] = str(built_index.path)
    run("eval", *words, "--workers", "0", "--tsne-samples", "0", "-q")
    assert (tmp_path / words[words.index("--out") + 1] / "report.json").is_file()


def test_top_k_above_the_classes_warns_and_clamps(built_index, tmp_path):
    data = _labelled(tmp_path / "data", 1)
    res = run("classify", data, "--index", built_index.path, "--out", tmp_path / "p.csv", "--top-k", "9",
              "--workers", "0", "-q")
    assert "--top-k 9 is more than the index's 5 classes" in res.output
    with open(tmp_path / "p.csv", newline="") as f:
        assert next(csv.reader(f))[-1] == "score_5"


def test_empty_folder_warns_and_fails_with_strict(built_index, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    res = run("classify", tmp_path / "empty", "--index", built_index.path, "--out", tmp_path / "p.csv", "-q")
    assert "holds no image" in res.output and "1 other file" in res.output
    res = run("classify", tmp_path / "empty", "--index", built_index.path, "--out", tmp_path / "p2.csv", "--strict",
              "-q", ok=False)
    assert res.exit_code == 1


def test_a_corpus_given_as_index_is_named(tmp_path, built_index):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.faiss").write_bytes(b"x")
    (tmp_path / "corpus" / "manifest.json").write_text(json.dumps({"format": "coder-index/corpus"}))
    res = run("info", tmp_path / "corpus", ok=False)
    assert "is an image-text corpus, not a text index: pass it as --corpus" in res.output
    data = tmp_path / "d"
    data.mkdir()
    res = run("classify", data, "--index", tmp_path / "corpus", "--out", tmp_path / "p.csv", ok=False)
    assert "is an image-text corpus, not a text index" in res.output


def test_class_names_and_descriptor_keys_compare_after_nfc(tmp_path, encoder):
    from coder_index import TextIndex
    from coder_index.pipeline.build import build_index

    nfd = unicodedata.normalize("NFD", "Café")
    nfc = unicodedata.normalize("NFC", "Café")
    assert nfd != nfc
    (tmp_path / "classes.txt").write_text(f"{nfd}\nthé noir\n", encoding="utf-8")
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({nfc: ["a cup"], unicodedata.normalize("NFD", "thé noir"): ["dark"]}),
                    encoding="utf-8")
    report = build_index(tmp_path / "idx", tmp_path / "classes.txt", encoder=encoder, descriptors=[desc])
    assert not report.warnings and report.added["attribute"] == 2
    assert TextIndex.open(tmp_path / "idx").class_names() == [nfc, "thé noir"]


# ------------------------------------------------------------------------------ 6. a consistent CLI
def test_every_option_has_help_and_every_command_examples():
    for path, group in _groups(cli):  # setup, fewshot, corpus: their own --help shows examples too
        assert "Examples:" in (group.help or ""), path
    for path, cmd in _commands(cli):
        assert "Examples:" in (cmd.help or ""), path
        missing = [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.help]
        assert not missing, (path, missing)


def test_quiet_on_every_long_command_and_llm_none_said_per_command():
    long = [("build",), ("classify",), ("eval",), ("generate",), ("fewshot", "fit"), ("corpus", "build"),
            ("reproduce",)]
    helps = {}
    for path in long:
        out = run(*path, "--help").output
        assert "-q, --quiet" in out, path
        helps[path] = " ".join(out.split())
    # one declaration of --llm (coder_index_cli/options.py) says what none means for each command
    for path in (("classify",), ("eval",), ("generate",), ("build",)):
        text = helps[path]
        assert "none: no LLM requests (generate and build use the offline WordNet generator; classify --rerank " \
               "and eval's coder* rows use the pair texts already in the index" in text, path


def test_classify_help_example_is_not_garbled():
    out = run("classify", "--help").output
    line = next(x for x in out.splitlines() if "--gap-threshold 0.3" in x)
    assert line.rstrip().endswith("\\") and "--base-url" not in line


def test_progress_bars_name_what_they_count(tmp_path, tiny_model):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    env = {**os.environ, "CODER_INDEX_CACHE_DIR": str(tmp_path / "cache")}  # no text embedding remembered yet
    proc = subprocess.run([sys.executable, "-m", "coder_index_cli.main", "build", str(tmp_path / "idx"), "--classes",
                           str(tmp_path / "classes.txt"), "--model", tiny_model], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "encoding name texts" in proc.stderr
    data = _labelled(tmp_path / "data", 1)
    res = run("classify", data, "--index", tmp_path / "idx", "--out", tmp_path / "p.csv", "--workers", "0")
    assert " 0img " not in res.output, res.output  # no bar before its total is known


def test_corpus_info_reads_as_lines_with_the_pretrained_tag(tmp_path, encoder):
    from coder_index.stores.corpus import Chunk, build_corpus

    rng = np.random.default_rng(0)
    chunk = Chunk(rng.standard_normal((3, encoder.embed_dim)).astype(np.float32), ["a", "b", "c"], ["1", "2", "3"])
    build_corpus(tmp_path / "c", encoder, iter([chunk]), 3, sources={"images": "x"})
    out = run("corpus", "info", tmp_path / "c").output
    assert "rows:       3" in out and "model:" in out and "{'" not in out and "'source'" not in out  # not a dict
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["model"]["pretrained"] = "laion2b_s34b_b79k"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert "pretrained=laion2b_s34b_b79k" in run("corpus", "info", tmp_path / "c").output


def test_eval_report_names_its_throughput_column(built_index, tmp_path, monkeypatch):
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    data = _labelled(tmp_path / "data", 1)
    out = run("eval", data, "--index", built_index.path, "--out", tmp_path / "rep", "--methods", "coder",
              "--workers", "0", "--tsne-samples", "0", "-q").output
    assert "images/s (the method alone)" in out and "encoding excluded" in out


# ------------------------------------------------------------------------------ 8. threads
def test_threads_and_workers_follow_the_model(encoder):
    from coder_index import ClipEncoder
    from coder_index.core.parallelism import choose, cpu_count, image_gflops, torch_threads

    small = choose(encoder)
    assert image_gflops(encoder) < 1 and small.threads == 1 and small.workers == max(1, cpu_count())
    big = ClipEncoder("ViT-B-32", "random", device="cpu")
    assert image_gflops(big) > 4
    plan = choose(big)
    assert plan.threads == cpu_count() and plan.workers >= 1
    explicit = choose(big, threads=3, workers=0)
    assert (explicit.threads, explicit.workers) == (3, 0)
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------ 9. README and repo
def test_readme_and_gitignore_for_a_first_run():
    readme = (ROOT / "README.md").read_text()
    ignore = (ROOT / ".gitignore").read_text().split()
    assert "imagenet-index/" in ignore and "predictions.csv" in ignore
    for needle in ("HF_HUB_OFFLINE", "NLTK_DATA", "Leveraging Cross-Modal Neighbor Representation for Improved CLIP "
                   "Classification", "What the main job costs"):
        assert needle in " ".join(readme.split()), needle


def test_setup_wordnet_says_which_nltk_data(tmp_path, wordnet_reader):
    out = run("setup", "wordnet", "--target", tmp_path / "nltk").output
    assert f"export NLTK_DATA={(tmp_path / 'nltk').resolve()}" in out


def _forbid_model_loads(monkeypatch):
    from coder_index.model import encoder as encoder_module

    monkeypatch.setattr(encoder_module.ClipEncoder, "__init__",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")))


@pytest.mark.parametrize("extra", [[], ["--rerank", "--llm", "none"],
                                   ["--rerank", "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "0"]],
                         ids=["coder", "coder*", "coder*-with-llm"])
def test_refusals_and_nothing_to_do_never_load_the_model(built_index, tmp_path, monkeypatch, extra):
    """Check and refuse first, load last: a rerun with everything done, a changed --top-k, an empty
    folder and an unwritable --out all answer without loading the model (it takes seconds)."""
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    data = _labelled(tmp_path / "data", 1)
    out = tmp_path / "p.csv"
    run("classify", data, "--index", built_index.path, "--out", out, "--workers", "0", "-q", *extra)
    _forbid_model_loads(monkeypatch)  # each CLI call opens the index anew: no model is held from the first run
    res = run("classify", data, "--index", built_index.path, "--out", out, "--workers", "0", *extra)
    assert "done in earlier runs" in res.output
    res = run("classify", data, "--index", built_index.path, "--out", out, "--top-k", "2", *extra, ok=False)
    assert res.exit_code == 1 and "--top-k" in res.output and "the model was loaded" not in res.output
    (tmp_path / "empty").mkdir()
    res = run("classify", tmp_path / "empty", "--index", built_index.path, "--out", tmp_path / "e.csv", *extra)
    assert "holds no image" in res.output
    for bad in ("/proc/nope/p.csv", "/proc/p.csv", str(tmp_path / "p.csv" / "x.csv")):
        res = run("classify", data, "--index", built_index.path, "--out", bad, *extra, ok=False)
        assert res.exit_code == 1 and bad in res.output and "Errno" not in res.output, res.output
