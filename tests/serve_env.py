"""A served index for the serve tests: tiny model, pet classes with attribute, analogous, synonym and
one-to-one pair texts, a folder of photos classified by the CLI, and an eval report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import PET_CLASSES, shared_path
from images import make_messy_folder

SAMPLES = ["n01440764_tench.JPEG", "n01514859_hen.JPEG", "n02106166_Border_collie.JPEG", "n02109961_Eskimo_dog.JPEG"]


def run_cli(*args: object, cwd: Path | None = None) -> str:
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    return res.stdout


def knowledge(path: Path) -> Path:
    classes = {c: {"attribute": [f"{c} with fur pattern {i}" for i in range(3)], "analogous": [f"{c} look-alike"],
                   "synonym": [f"{c} pet"]} for c in PET_CLASSES}
    # arbitrary wording, chosen so that the random tiny model's rerank both keeps and changes predictions
    pairs = {a: {b: [f"a {len(a)} {b} thing", f"{a}"] for b in PET_CLASSES if b != a} for a in PET_CLASSES}
    path.write_text(json.dumps({"format": "coder-index/knowledge", "version": 1, "classes": classes, "pairs": pairs,
                                "provenance": {}}))
    return path


def make_serve_env(root: Path, tiny_model: str) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    classes = root / "classes.txt"
    classes.write_text("\n".join(PET_CLASSES) + "\n")
    run_cli("build", root / "idx", "--classes", classes, "--model", tiny_model, "--dataset", "oxford_pets",
            "--knowledge", knowledge(root / "k.json"))
    photos = make_messy_folder(root / "photos")
    for name in SAMPLES:
        shutil.copy(shared_path("data", "imagenet-samples", name), photos / name)
    run_cli("classify", "photos", "--index", root / "idx", "--out", "preds.csv", "--workers", "0", "-q", cwd=root)
    run_cli("classify", "photos", "--index", root / "idx", "--out", "preds-rerank.jsonl", "--workers", "0", "-q",
            "--rerank", "--llm", "none", cwd=root)
    labelled = root / "labelled"
    for i, c in enumerate(PET_CLASSES[:3]):
        (labelled / c).mkdir(parents=True)
        for j in range(4):
            shutil.copy(photos / ("a/red_0.jpg" if (i + j) % 2 else "b/blue_0.jpg"), labelled / c / f"{j}.jpg")
    run_cli("eval", labelled, "--index", root / "idx", "--out", root / "report", "--workers", "0", "--llm", "none",
            "--tsne-samples", "12", "-q")
    return {"root": root, "index": root / "idx", "photos": photos, "preds": root / "preds.csv",
            "preds_rerank": root / "preds-rerank.jsonl", "report": root / "report"}
