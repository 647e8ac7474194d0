"""The `coder-index` commands on a messy generated folder, through click's runner."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import run_cli, shared_path
from images import BAD, GOOD, make_messy_folder

run = run_cli  # conftest's: the command line in this process, as a user types it


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    classes = root / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    desc = shared_path("data", "descriptors", "descriptors_pets.json")
    run("build", root / "idx", "--classes", classes, "--model", tiny_model, "--dataset", "oxford_pets",
        "--descriptors", desc)
    return root / "idx"


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def test_every_command_has_help_with_examples():
    for cmd in ("build", "classify", "explain", "texts", "info", "verify", "reproduce", "serve"):
        out = run(cmd, "--help").output
        assert "Examples:" in out and f"coder-index {cmd}" in out


def test_info(cli_index):
    data = json.loads(run("info", cli_index, "--json").output)
    assert data["counts"]["classes"] == 5
    assert data["counts"]["texts"]["name"] == 5 and data["counts"]["texts"]["attribute"] > 0
    human = run("info", cli_index).output
    assert "classes:     5" in human and "local-dir:" in human


def test_build_again_is_idempotent(cli_index, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    before = json.loads(run("info", cli_index, "--json").output)["counts"]
    report = json.loads(run("build", cli_index, "--classes", classes, "--dataset", "oxford_pets", "--json").output)
    assert report["added"] == {"name": 0}
    assert json.loads(run("info", cli_index, "--json").output)["counts"] == before


@pytest.mark.parametrize("fmt, workers", [("csv", "2"), ("jsonl", "0")])
def test_classify_messy_folder(cli_index, messy, tmp_path, fmt, workers):
    out = tmp_path / f"preds.{fmt}"
    res = run("classify", messy, "--index", cli_index, "--out", out, "--workers", workers, "--top-k", "3",
              "--batch-size", "4")
    prefix = Path(os.path.normpath(messy)).as_posix() + "/"
    if fmt == "csv":
        with open(out, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "label", "score", "method", "label_2", "score_2", "label_3", "score_3"]
        scores = [[float(r["score"]), float(r["score_2"]), float(r["score_3"])] for r in rows]
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        scores = [[t["score"] for t in r["top_k"]] for r in rows]
    assert sorted(r["path"] for r in rows) == sorted(prefix + g for g in GOOD)
    assert all(r["label"] in {"Abyssinian", "Bengal", "beagle", "pug", "samoyed"} for r in rows)
    assert all(s == sorted(s, reverse=True) and 0 < s[0] <= 1 for s in scores)

    errors_file = tmp_path / f"preds.{fmt}.errors.csv"
    with open(errors_file, encoding="utf-8", newline="") as f:
        errors = {r["path"]: r["error"] for r in csv.DictReader(f)}
    assert set(errors) == {prefix + b for b in BAD}
    for name, reason in BAD.items():
        assert reason in errors[prefix + name]
    assert f"{len(GOOD)} images" in res.output and "3 unreadable" in res.output
    assert "1 non-image file(s) ignored" in res.output
    assert f"{out} holds {len(GOOD)} row(s), {errors_file} lists 3 unreadable file(s)" in res.output

    # a rerun finds everything done and writes nothing new; the files' totals are unchanged
    again = run("classify", messy, "--index", cli_index, "--out", out, "--workers", workers, "--top-k", "3")
    assert f"{len(GOOD) + len(BAD)} done in earlier runs" in again.output
    assert "classified 0 images" in again.output and ", 0 unreadable" in again.output
    assert f"{out} holds {len(GOOD)} row(s), {errors_file} lists 3 unreadable file(s)" in again.output
    n_lines = len(out.read_text(encoding="utf-8").splitlines())
    assert n_lines == len(GOOD) + (1 if fmt == "csv" else 0)


def test_classify_refuses_changed_top_k_on_resume(cli_index, messy, tmp_path):
    out = tmp_path / "p.csv"
    run("classify", messy, "--index", cli_index, "--out", out, "--workers", "0")
    res = run("classify", messy, "--index", cli_index, "--out", out, "--top-k", "2", ok=False)
    assert res.exit_code != 0 and "--top-k" in res.output


def test_classify_refuses_another_model(cli_index, messy, tmp_path, other_tiny_model):
    res = run("classify", messy, "--index", cli_index, "--out", tmp_path / "p.csv", "--model", "ViT-B-32", ok=False)
    assert res.exit_code == 1 and "not comparable" in res.output and "ViT-B-32" in res.output
    res = run("classify", messy, "--index", cli_index, "--out", tmp_path / "p.csv", "--model", other_tiny_model,
              ok=False)
    assert res.exit_code == 1 and "built with CLIP model" in res.output
    assert not (tmp_path / "p.csv").exists()


def test_classify_accepts_same_weights_under_another_path(cli_index, messy, tmp_path, tiny_model):
    moved = tmp_path / "moved-model"
    moved.mkdir()
    for f in Path(tiny_model[len("local-dir:"):]).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    run("classify", messy, "--index", cli_index, "--out", tmp_path / "p.csv", "--model", f"local-dir:{moved}",
        "--workers", "0")
    assert (tmp_path / "p.csv").exists()


def test_explain_json_and_text(cli_index, messy):
    img = messy / "chat_été_猫.jpg"
    data = json.loads(run("explain", img, messy / "a/red_0.jpg", "--index", cli_index, "-k", "4", "--json").output)
    assert len(data) == 2
    first = data[0]
    assert first["path"] == str(img)
    assert first["prediction"] == first["classes"][0]["class"]
    cos = [t["cosine"] for t in first["nearest_texts"]]
    assert len(cos) == 4 and cos == sorted(cos, reverse=True)
    assert all(set(t) == {"text", "class", "kind", "cosine"} for t in first["nearest_texts"])
    assert all(t["class"] == first["prediction"] for t in first["class_texts"])
    human = run("explain", img, "--index", cli_index, "-k", "2").output
    assert "nearest texts" in human and first["prediction"] in human


def test_explain_unreadable_image_is_clear(cli_index, messy):
    res = run("explain", messy / "fake.jpg", "--index", cli_index, ok=False)
    assert res.exit_code == 1 and "not an image" in res.output


@pytest.mark.parametrize("as_json", [False, True])
def test_explain_explains_every_readable_image_and_names_each_bad_one(cli_index, messy, as_json):
    """explain a.jpg truncated.jpg b.png ...: the good ones are explained, in order, every bad one is
    named with its reason, and the exit status says something was wrong."""
    from images import BAD

    files = [messy / "a/red_0.jpg", messy / "truncated.jpg", messy / "gray.png", messy / "corrupt.jpg",
             messy / "fake.jpg", messy / "b/blue_1.bmp"]
    res = CliRunner().invoke(cli, ["explain", *map(str, files), "--index", str(cli_index),
                                   *(["--json"] if as_json else [])])
    assert res.exit_code == 1, res.output
    good = [f for f in files if f.name not in BAD]
    if as_json:
        assert [r["path"] for r in json.loads(res.stdout)] == [str(f) for f in good]
    else:
        assert [line.split(": ")[0] for line in res.stdout.splitlines() if not line.startswith(" ")] == \
            [str(f) for f in good]
    for f in files:
        if f.name in BAD:
            assert f"cannot read image {f}: " in res.stderr and BAD[f.name] in res.stderr


def test_build_errors_are_clear(tmp_path, tiny_model):
    classes = tmp_path / "c.txt"
    classes.write_text("cat\ncat\n")
    res = run("build", tmp_path / "i", "--classes", classes, "--model", tiny_model, ok=False)
    assert res.exit_code == 1 and "appears twice" in res.output
    classes.write_text("cat\n")
    res = run("build", tmp_path / "i", "--classes", classes, "--model", tiny_model, "--dataset", "nope", ok=False)
    assert "unknown dataset" in res.output


def _count_rows(path: Path) -> int:
    return max(0, len(path.read_bytes().split(b"\n")) - 2) if path.exists() else 0


def test_killed_run_resumes_without_loss_or_duplicates(cli_index, tmp_path):
    folder = shared_path("data", "cifar10-test")
    subset = tmp_path / "subset"
    for cls in ("cat", "dog", "ship"):
        (subset / cls).mkdir(parents=True)
        for f in sorted((folder / cls).iterdir())[:150]:
            os.symlink(f, subset / cls / f.name)
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "coder_index_cli.main", "classify", str(subset), "--index", str(cli_index),
           "--out", str(out), "--batch-size", "8", "--workers", "0", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _count_rows(out) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count_rows(out)
    assert 0 < partial < 450, "the run should have been killed part-way"
    with open(out, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b"/torn/row.jpg,pu")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{partial} done in earlier runs" in res.stderr
    with open(out, newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == 450 and len(set(paths)) == 450
    assert "/torn/row.jpg" not in paths
