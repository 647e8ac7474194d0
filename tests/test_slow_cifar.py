"""The real CIFAR-10 test folder (10,000 JPEGs) end to end. Slow: run with `pytest -m slow`."""

import csv
import os

import pytest
from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import shared_path

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
def test_classify_cifar10_test_folder(tmp_path, tiny_model):
    folder = shared_path("data", "cifar10-test")
    classes = tmp_path / "cifar10.txt"
    classes.write_text("\n".join(CIFAR) + "\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--dataset", "cifar10",
                              "--model", tiny_model])
    assert res.exit_code == 0, res.output
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
    assert "0 unreadable file(s)" in res.output
