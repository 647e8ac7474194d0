"""Readers of user-supplied text sources: class lists and published ``{class: [descriptor, ...]}``
attribute files (e.g. Menon & Vondrick's VCD descriptors). How they become texts is a
``presets.TextRecipe``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coder_index.core.errors import InputFormatError
from coder_index.core.presets import TextRecipe, nfc, norm_key
from coder_index.core.records import TextItem
from coder_index.core.untrusted import DESCRIPTORS, check, read_json, read_text


def read_class_list(path: str | Path) -> list[str]:
    """One class name per line, in label order; blank lines and '#' comments skipped."""
    path = Path(path)
    lines = read_text(path, "class list").splitlines()
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        name = nfc(" ".join(raw.split()))
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


def read_json_refusing_pickle(path: str | Path) -> Any:
    """JSON of bounded size and depth (``untrusted.read_json``); pickle files are refused."""
    return read_json(path)


def read_descriptor_file(path: str | Path) -> dict[str, list[str]]:
    """``{class: [descriptor, ...]}`` as published with the VCD descriptors."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputFormatError(f"{path}: expected a JSON object {{class: [descriptor, ...]}} with string descriptors")
    return check(data, DESCRIPTORS, str(path))


def match_classes(keys: list[str], classes: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map file keys to vocabulary classes: exact, then ignoring case/punctuation/underscores."""
    exact = {nfc(c): c for c in classes}
    loose = {}
    for c in classes:
        loose.setdefault(norm_key(c), c)
    mapping, unmatched = {}, []
    for k in keys:
        target = exact.get(nfc(k)) or loose.get(norm_key(k))
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
                    recipe: TextRecipe, source: str = "descriptor-file") -> DescriptorImport:
    """``{class} which has {descriptor}`` (or the recipe's variant) for every matched class."""
    mapping, unmatched = match_classes(list(descriptors), classes)
    items = [it for k, descs in descriptors.items() if k in mapping
             for it in recipe.attribute_texts(mapping[k], [d.strip() for d in descs if d.strip()], source)]
    covered = set(mapping.values())
    return DescriptorImport(items, unmatched, [c for c in classes if c not in covered])
