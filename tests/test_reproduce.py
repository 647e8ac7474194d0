"""`coder-index reproduce` on small generated datasets in the released layouts, with the tiny model."""

import json
import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from coder_index import TextIndex
from coder_index.core.errors import InputFormatError
from coder_index.evaluation.layouts import locate_test_split
from coder_index_cli.main import cli

CLASSES = {"DTD": ["banded", "blotchy", "braided"], "oxford-pet": ["Abyssinian", "american bulldog", "pug"],
           "ImageNet": ["tench", "goldfish", "great white shark"]}


def _img(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)


def make_root(tmp_path):
    root = tmp_path / "data"
    for i, c in enumerate(CLASSES["DTD"]):           # class folders
        for j in range(2):
            _img(root / "dtd" / c / f"{j}.jpg", 10 * i + j)
    test = []                                         # CoOp split file
    for i, c in enumerate(CLASSES["oxford-pet"]):
        for j in range(2):
            rel = f"{c.replace(' ', '_')}_{j}.jpg"
            _img(root / "oxford-pet" / "images" / rel, 100 + 10 * i + j)
            test.append([rel, i, c.replace(" ", "_").lower()])
    (root / "oxford-pet" / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": [], "val": [],
                                                                                 "test": test}))
    for i, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):   # ImageNet val/<wnid>
        _img(root / "imagenet" / "val" / wnid / "a.JPEG", 200 + i)
    for label in (2, 0, 1):                                              # ImageNet-V2 <label>/
        _img(root / "imagenet_v2" / "imagenetv2-matched-frequency-format-val" / str(label) / "x.jpeg", 300 + label)
    names = tmp_path / "class_name"
    names.mkdir()
    for key, classes in CLASSES.items():
        (names / f"{key}.txt").write_text("\n".join(classes) + "\n")
    ek = tmp_path / "expert_knowledge"
    for folder in ("attribute", "simile_class", "synonym", "ovo_attribute"):
        (ek / folder).mkdir(parents=True)
    for key, classes in CLASSES.items():
        (ek / "attribute" / f"{key}.pkl").write_bytes(pickle.dumps([[f"{c} look {k}" for k in range(2)]
                                                                    for c in classes]))
        (ek / "simile_class" / f"{key}.pkl").write_bytes(pickle.dumps([["something"] for _ in classes]))
        (ek / "synonym" / f"{key}.json").write_text(json.dumps([{"syno": ["x"]} for _ in classes]))
        (ek / "ovo_attribute" / f"{key}.json").write_text(json.dumps(
            {a: {b: [f"{a} shape"] for b in classes if b != a} for a in classes}))
    return root, names, ek


def test_layouts_give_the_right_labels(tmp_path):
    root, _, _ = make_root(tmp_path)
    dtd, _ = locate_test_split(root, "DTD", CLASSES["DTD"])
    assert [p.parent.name for p in dtd.paths] == [CLASSES["DTD"][y] for y in dtd.labels]
    pets, source = locate_test_split(root, "oxford-pet", CLASSES["oxford-pet"])
    assert "split_zhou" in source and pets.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.is_file() for p in pets.paths)
    inet, _ = locate_test_split(root, "ImageNet", CLASSES["ImageNet"])
    assert sorted(zip([p.parent.name for p in inet.paths], inet.labels.tolist(), strict=True)) == \
        [("n01440764", 0), ("n01443537", 1), ("n01484850", 2)]
    v2, _ = locate_test_split(root, "ImageNet-V2", CLASSES["ImageNet"])
    pairs = zip([int(p.parent.name) for p in v2.paths], v2.labels.tolist(), strict=True)
    assert sorted(pairs) == [(0, 0), (1, 1), (2, 2)]
    assert locate_test_split(root, "CUB200", ["a"]) is None
    (root / "dtd" / "extra").mkdir()
    _img(root / "dtd" / "extra" / "0.jpg", 9)
    with pytest.raises(InputFormatError, match="match no class"):
        locate_test_split(root, "DTD", CLASSES["DTD"])


def test_reproduce_writes_tables_and_resumes(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    root, names, ek = make_root(tmp_path)
    args = ["reproduce", str(root), "--expert-knowledge", str(ek), "--class-names", str(names), "--model",
            tiny_model, "--out", str(tmp_path / "out"), "--workers", "0", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    t = json.loads((tmp_path / "out" / "tables.json").read_text())
    assert t["datasets"] == ["ImageNet", "ImageNet-V2", "DTD", "oxford-pet"]
    assert set(t["missing"]) == {"CUB200", "eurosat", "food-101", "caltech-101", "places-365"}
    for key in t["datasets"]:
        rep = json.loads((tmp_path / "out" / key / "report.json").read_text())
        by_name = {m["name"].split(" ")[0]: m["top1"] for m in rep["methods"]}
        assert t["table1"]["CODER"][key] == by_name["coder"] == t["table2"]["P+Att+Ana+Syn"][key]
        assert t["table1"]["CODER*"][key] == by_name["coder*-gated"]
        gate = {"ImageNet": 0.1, "ImageNet-V2": 0.05, "DTD": 0.6, "oxford-pet": 0.1}[key]
        assert f"coder*-gated (gap<{gate})" in {m["name"] for m in rep["methods"]}
    index = TextIndex.open(tmp_path / "out" / "indexes" / "oxford-pet")
    assert index.recipe.released == "oxford-pet" and index.counts()["pair_texts"] == 6 * 4
    assert not (tmp_path / "out" / "indexes" / "ImageNet-V2").exists()   # V2 uses ImageNet's index
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "| CODER* |" in md and "| P+Att |" in md and "ImageNet-V2" in md
    before = {k: (tmp_path / "out" / k / "report.json").stat().st_mtime_ns for k in t["datasets"]}
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert {k: (tmp_path / "out" / k / "report.json").stat().st_mtime_ns for k in t["datasets"]} == before
    res = CliRunner().invoke(cli, args[:-1] + ["--datasets", "cifar10"])
    assert res.exit_code == 1 and "zero-shot datasets" in res.output
