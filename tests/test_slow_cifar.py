"""The real CIFAR-10 test folder (10,000 JPEGs) end to end. Slow: run with `pytest -m slow`."""

import csv
import os

import pytest
from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import shared_path

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_cifar_index(tmp_path, tiny_model):
    classes = tmp_path / "cifar10.txt"
    classes.write_text("\n".join(CIFAR) + "\n")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--dataset", "cifar10",
                                   "--model", tiny_model])
    assert res.exit_code == 0, res.output
    return tmp_path / "idx"


@pytest.mark.slow
def test_classify_cifar10_test_folder(tmp_path, tiny_model):
    folder = shared_path("data", "cifar10-test")
    build_cifar_index(tmp_path, tiny_model)
    runner = CliRunner()
    out = tmp_path / "cifar.csv"
    res = runner.invoke(cli, ["classify", str(folder), "--index", str(tmp_path / "idx"), "--out", str(out),
                              "--batch-size", "256", "--workers", "2", "-q"])
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {f"{os.path.normpath(folder)}/{c}/{f}" for c in CIFAR for f in os.listdir(folder / c)}
    assert len(expected) == 10_000
    assert [r["path"] for r in rows] == sorted(expected)
    assert {r["label"] for r in rows} <= set(CIFAR)
    assert "10000 images" in res.output and "0 unreadable" in res.output and "no unreadable file" in res.output


@pytest.mark.slow
def test_eval_cifar10_test_folder(tmp_path, tiny_model, monkeypatch):
    import json

    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    build_cifar_index(tmp_path, tiny_model)
    runner = CliRunner()
    args = ["eval", str(shared_path("data", "cifar10-test")), "--index", str(tmp_path / "idx"), "--llm", "none",
            "--methods", "clip,coder,P", "--tsne-samples", "300", "-q"]
    res = runner.invoke(cli, args + ["--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    assert first["images"] == 10_000 and first["skipped"] == 0 and first["embeddings_from_cache"] == 0
    assert sum(first["per_class"]["coder"].values()) == pytest.approx(10 * first["methods"][1]["top1"], abs=1e-3)
    res = runner.invoke(cli, args + ["--out", str(tmp_path / "b")])
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert second["embeddings_from_cache"] == 10_000
    assert [m["top1"] for m in second["methods"]] == [m["top1"] for m in first["methods"]]


@pytest.mark.slow
def test_fewshot_cifar10_16_shots(tmp_path, tiny_model, monkeypatch):
    import json

    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    build_cifar_index(tmp_path, tiny_model)
    runner = CliRunner()
    folder = shared_path("data", "cifar10-test")
    res = runner.invoke(cli, ["fewshot", "fit", str(folder), "--index", str(tmp_path / "idx"), "--shots", "16",
                              "--out", str(tmp_path / "ad"), "--augment-epochs", "2", "--val-per-class", "50",
                              "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert manifest["support_images"] == 160 and manifest["validation"]["images"] == 500
    for h in manifest["adapters"].values():
        assert h["val_accuracy"] >= h["val_zero_shot_accuracy"]  # the search can always pick a tiny alpha
    res = runner.invoke(cli, ["eval", str(folder), "--index", str(tmp_path / "idx"), "--adapter",
                              str(tmp_path / "ad"), "--out", str(tmp_path / "rep"), "--tsne-samples", "0", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["images"] == 10_000 and [m["name"] for m in rep["methods"]] == ["clip", "tip-adapter", "coder-adapter"]
