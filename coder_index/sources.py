"""Where the texts of this issue come from: class names through templates, and published
``{class: [descriptor, ...]}`` attribute files (e.g. Menon & Vondrick's VCD descriptors)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputFormatError
from .index.text_index import TextItem

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class DatasetTemplates:
    dataset: str
    name: tuple[str, ...]   # templates with {c}
    attribute: str          # with {c} and {a}
    analogous: str          # with {c} and {a}


@cache
def _templates_file() -> dict[str, Any]:
    try:
        text = resources.files("coder_index.data").joinpath("templates.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without install
        text = (Path(__file__).resolve().parent.parent / "data" / "templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def dataset_names() -> list[str]:
    return sorted(k for k in _templates_file() if not k.startswith("_"))


def load_templates(dataset: str | None = None) -> DatasetTemplates:
    """Templates of ``dataset`` (name or alias, case-insensitive); ``None`` gives the default set."""
    data = _templates_file()
    key = "default"
    if dataset:
        wanted = _norm(dataset)
        matches = [k for k, v in data.items() if not k.startswith("_")
                   and (_norm(k) == wanted or wanted in {_norm(a) for a in v.get("aliases", [])})]
        if not matches:
            raise InputFormatError(f"unknown dataset '{dataset}'; known: {', '.join(dataset_names())} "
                                   "(or leave --dataset out for the default templates)")
        key = matches[0]
    entry = data[key]
    return DatasetTemplates(key, tuple(entry["name"]), entry["attribute"], entry["analogous"])


def fill(template: str, c: str, a: str | None = None) -> str:
    """Substitute without str.format so braces inside class names or descriptors stay literal."""
    out = template.replace("{c}", c)
    return out.replace("{a}", a) if a is not None else out


def read_class_list(path: str | Path) -> list[str]:
    """One class name per line, in label order; blank lines and '#' comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputFormatError(f"class list {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InputFormatError(f"class list {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        name = " ".join(raw.split())
        if not name or name.startswith("#"):
            continue
        if name in seen:
            raise InputFormatError(f"{path}: class '{name}' appears twice (lines {seen[name]} and {lineno}); "
                                   "class names must be unique")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise InputFormatError(f"{path} holds no class names (one per line expected)")
    return names


def name_texts(classes: list[str], templates: DatasetTemplates) -> list[TextItem]:
    return [TextItem(c, "name", fill(t, c), template=t, source="template")
            for c in classes for t in templates.name]


def read_json_refusing_pickle(path: str | Path) -> Any:
    path = Path(path)
    if path.suffix in (".pkl", ".pickle", ".pt", ".pth"):
        raise InputFormatError(f"{path}: pickle files are refused (loading them can run arbitrary code); "
                               "convert it to JSON")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputFormatError(f"{path} does not exist") from None
    if raw.startswith(_PICKLE_MAGIC):
        raise InputFormatError(f"{path} is a pickle file; pickle is refused (it can run code), use JSON")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFormatError(f"{path} is not valid JSON: {exc}") from None


def read_descriptor_file(path: str | Path) -> dict[str, list[str]]:
    """``{class: [descriptor, ...]}`` as published with the VCD descriptors."""
    data = read_json_refusing_pickle(path)
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(d, str) for d in v)
            for k, v in data.items()):
        raise InputFormatError(f"{path}: expected a JSON object {{class: [descriptor, ...]}} "
                               "with string descriptors")
    return data


def match_classes(keys: list[str], classes: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map file keys to vocabulary classes: exact, then ignoring case/punctuation/underscores."""
    exact = set(classes)
    loose = {}
    for c in classes:
        loose.setdefault(_norm(c), c)
    mapping, unmatched = {}, []
    for k in keys:
        target = k if k in exact else loose.get(_norm(k))
        if target is None:
            unmatched.append(k)
        else:
            mapping[k] = target
    return mapping, unmatched


@dataclass(frozen=True)
class DescriptorImport:
    items: list[TextItem]
    unmatched_keys: list[str]        # keys of the file that are not classes of the vocabulary
    classes_without: list[str]       # vocabulary classes the file has nothing for


def attribute_texts(descriptors: dict[str, list[str]], classes: list[str],
                    templates: DatasetTemplates, source: str = "descriptor-file") -> DescriptorImport:
    """``{class} which has {descriptor}`` (or the dataset's variant) for every matched class."""
    mapping, unmatched = match_classes(list(descriptors), classes)
    items = [TextItem(mapping[k], "attribute", fill(templates.attribute, mapping[k], d.strip()),
                      template=templates.attribute, source=source)
             for k, descs in descriptors.items() if k in mapping for d in descs if d.strip()]
    covered = set(mapping.values())
    return DescriptorImport(items, unmatched, [c for c in classes if c not in covered])
