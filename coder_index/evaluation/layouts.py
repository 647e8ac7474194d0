"""Test splits of the paper's datasets in the layouts people already have on disk.

For a released dataset key (``ImageNet``, ``oxford-pet``, ``DTD``, ...) under a data root, the first
layout that is present wins:

1. ``<key>.csv`` (or ``<key>/labels.csv``) with the columns ``path,label``;
2. a CoOp/Tip-Adapter split file ``split_zhou_*.json`` (its ``test`` list of ``[path, label,
   classname]``), used by the released few-shot code and DATASET.md for Caltech101, DTD, EuroSAT,
   Food101, Oxford Pets, Flowers, SUN397, UCF101 and Stanford Cars;
3. ImageNet-V2's ``imagenetv2-matched-frequency*/<label>/`` folders;
4. torchvision's Places365 validation list ``places365_val.txt`` (+ ``val_256/``);
5. torchvision's Oxford-IIIT Pet ``annotations/test.txt`` (+ ``images/``);
6. ImageFolder layouts: ``val/`` (ImageNet), ``test/`` (CUB200, Food101), or class folders directly.
   Folder names are matched to the class list by name; when they are not names (ImageNet's wnids,
   CUB's ``001.Black_footed_Albatross``) and there are as many folders as classes, the sorted order
   is the label order, as torchvision's ImageFolder assigns it.

``<key>`` may be the released key, its aliases or coder-index's own dataset key, also below
``datasets/data/`` as in the released repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from coder_index.core.errors import InputFormatError
from coder_index.core.presets import data_file, norm_key
from coder_index.core.sources import match_classes
from coder_index.pipeline.discover import discover_images
from coder_index.pipeline.labelled import LabelledSet, load_labelled

# Folder names the released DATASET.md uses, per released key (besides the key itself).
FOLDERS = {
    "ImageNet": ["imagenet"], "ImageNet-V2": ["imagenet_v2", "imagenetv2"], "oxford-pet": ["oxford-pet"],
    "DTD": ["dtd", "dtd/dtd"], "CUB200": ["CUB200"], "food-101": ["food-101"], "eurosat": ["eurosat"],
    "caltech-101": ["caltech-101", "data/caltech-101"], "places-365": ["places-365"],
    "oxford_flowers": ["oxford_flowers"], "Aircraft": ["fgvc_aircraft", "aircraft"], "ucf101": ["ucf101"],
    "stanford_cars": ["stanford_cars"], "sun397": ["sun397", "data/sun397"],
}


def _names(key: str) -> list[str]:
    """Folder/file names a dataset may have; coder-index's own key only where no other released key
    shares it (ImageNet-V2 must not pick up ImageNet's folder)."""
    data = data_file("cvpr24.json")
    entry = data[key]
    shared = sum(1 for k, v in data.items() if not k.startswith("_") and v["dataset"] == entry["dataset"]) > 1
    own = [] if shared and key != "ImageNet" else [entry["dataset"]]
    return list(dict.fromkeys([*FOLDERS.get(key, []), key, *entry["aliases"], *own]))


def candidate_dirs(root: Path, key: str) -> list[Path]:
    names = _names(key)
    out = []
    for base in (root, root / "datasets" / "data"):
        for n in dict.fromkeys(names):
            p = base / n
            if p.is_dir() and p not in out:
                out.append(p)
    return out


def _from_pairs(pairs: list[tuple[Path, str | int]], class_names: list[str], source: str) -> LabelledSet:
    """(path, class name or label index) -> a LabelledSet over ``class_names``."""
    names = sorted({v for _, v in pairs if isinstance(v, str)})
    mapping, unmatched = match_classes(names, class_names)
    if unmatched:
        raise InputFormatError(f"{source}: {len(unmatched)} class name(s) match no class of the class list "
                               f"(first: {unmatched[:5]})")
    ids = {c: i for i, c in enumerate(class_names)}
    labels = []
    for _, v in pairs:
        lab = ids[mapping[v]] if isinstance(v, str) else int(v)
        if not 0 <= lab < len(class_names):
            raise InputFormatError(f"{source}: label {lab} is outside the class list's {len(class_names)} classes")
        labels.append(lab)
    return LabelledSet([p for p, _ in pairs], np.asarray(labels, np.int64), class_names)


def _split_zhou(base: Path, class_names: list[str]) -> LabelledSet | None:
    files = sorted(base.glob("split_zhou_*.json")) + sorted(base.glob("*/split_zhou_*.json"))
    if not files:
        return None
    split = json.loads(files[0].read_text(encoding="utf-8"))
    test = split.get("test") if isinstance(split, dict) else None
    if not isinstance(test, list) or not test:
        raise InputFormatError(f"{files[0]} has no 'test' list of [path, label, classname]")
    folder = files[0].parent
    # the image folder next to the split file: the one that holds the first listed image
    first = str(test[0][0])
    image_dir = next((d for d in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
                      if (d / first).is_file()), None)
    if image_dir is None:
        raise InputFormatError(f"{files[0]}: its first test image {first} is under none of {folder}'s folders")
    names = [str(row[2]).replace("_", " ") for row in test]
    _, unmatched = match_classes(sorted(set(names)), class_names)
    by_name = not unmatched
    pairs = [(image_dir / str(row[0]), name if by_name else int(row[1])) for row, name in zip(test, names, strict=True)]
    return _from_pairs(pairs, class_names, str(files[0]))


def _image_folders(base: Path, class_names: list[str]) -> LabelledSet | None:
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders or not any(discover_images(base / f).images for f in folders[:3]):
        return None
    _, unmatched = match_classes(folders, class_names)
    if not unmatched:
        return load_labelled(base, class_names)
    if len(folders) != len(class_names):
        raise InputFormatError(f"{base}: {len(unmatched)} of {len(folders)} folders match no class (first: "
                               f"{unmatched[:3]}) and their number differs from the class list's {len(class_names)}")
    if all(re.fullmatch(r"\d+", f) for f in folders):  # ImageNet-V2: the folder is the label
        order = {f: int(f) for f in folders}
    else:                                              # ImageFolder: sorted folder order is the label order
        order = {f: i for i, f in enumerate(folders)}
    pairs = [(base / f / p, order[f]) for f in folders for p in discover_images(base / f).images]
    return _from_pairs(pairs, class_names, str(base))


def _places365(base: Path, class_names: list[str]) -> LabelledSet | None:
    listing = base / "places365_val.txt"
    if not listing.is_file():
        return None
    image_dir = next((d for d in (base / "val_256", base / "val_large", base) if d.is_dir()), base)
    pairs = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            pairs.append((image_dir / parts[0], int(parts[1])))
    return _from_pairs(pairs, class_names, str(listing))


def _oxford_pet(base: Path, class_names: list[str]) -> LabelledSet | None:
    listing = base / "annotations" / "test.txt"
    if not listing.is_file():
        return None
    pairs = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:  # "Abyssinian_100 1 1 1": image stem, class id from 1
            pairs.append((base / "images" / f"{parts[0]}.jpg", int(parts[1]) - 1))
    return _from_pairs(pairs, class_names, str(listing))


def dataset_present(root: str | Path, key: str) -> bool:
    """Whether anything under ``root`` is named like dataset ``key`` (a folder or a labels CSV)."""
    root = Path(root)
    return bool(candidate_dirs(root, key)) or any((root / f"{n}.csv").is_file() for n in _names(key))


def locate_test_split(root: str | Path, key: str, class_names: list[str]) -> tuple[LabelledSet, str] | None:
    """The test split of released dataset ``key`` under ``root`` and a description of where it came
    from, or None when the dataset is not there."""
    root = Path(root)
    for name in _names(key):
        for csv in (root / f"{name}.csv", root / name / "labels.csv"):
            if csv.is_file():
                return load_labelled(csv, class_names), str(csv)
    for base in candidate_dirs(root, key):
        for finder in (_split_zhou, _places365, _oxford_pet):
            found = finder(base, class_names)
            if found is not None:
                return found, f"{base} ({finder.__name__.strip('_')})"
        subdirs = [base / s for s in ("test", "val", "images/val")] + \
            sorted(p for p in base.glob("imagenetv2-*") if p.is_dir()) + [base]
        for d in subdirs:
            if d.is_dir():
                found = _image_folders(d, class_names)
                if found is not None:
                    return found, str(d)
    return None


def normalise_key(name: str) -> str | None:
    """The released key for a dataset name given on the command line, or None."""
    wanted = norm_key(name)
    for k, v in data_file("cvpr24.json").items():
        if not k.startswith("_") and wanted in {norm_key(k), norm_key(v["dataset"]), *map(norm_key, v["aliases"])}:
            return k
    return None
