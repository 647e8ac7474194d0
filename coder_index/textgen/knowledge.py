"""Knowledge files: everything the generator produced for one vocabulary, as portable JSON.

    {"format": "coder-index/knowledge", "version": 1,
     "classes": {name: {"attribute": [phrase, ...],        # -> "{c} which has {phrase}"
                        "attribute_text": [sentence, ...],  # stored verbatim (WordNet, CuPL)
                        "analogous": [name, ...], "synonym": [name, ...],
                        "source": {kind: "llm:<model>" | "wordnet" | "import:<file>"}}},
     "pairs": {a: {b: [feature of a that tells it from b, ...]}},
     "provenance": {...}}

Import also reads the published descriptor format ``{class: [descriptor, ...]}`` and CuPL-style
``{class: [full sentence, ...]}``. Pickle is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coder_index.core.atomic import atomic_write_json
from coder_index.core.errors import InputFormatError
from coder_index.core.presets import TextRecipe
from coder_index.core.records import TextItem
from coder_index.core.sources import match_classes, read_json_refusing_pickle
from coder_index.core.untrusted import DESCRIPTORS, KNOWLEDGE, check

FORMAT = "coder-index/knowledge"
KINDS = ("attribute", "attribute_text", "analogous", "synonym")


@dataclass
class Knowledge:
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pairs: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def set(self, cls: str, kind: str, items: list[str], source: str) -> None:
        entry = self.classes.setdefault(cls, {"source": {}})
        entry[kind] = list(items)
        entry.setdefault("source", {})[kind] = source

    def get(self, cls: str, kind: str) -> list[str]:
        return list(self.classes.get(cls, {}).get(kind, []))

    def set_pair(self, a: str, b: str, features: list[str]) -> None:
        self.pairs.setdefault(a, {})[b] = list(features)

    def pair(self, a: str, b: str) -> list[str] | None:
        return self.pairs.get(a, {}).get(b)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "classes": self.classes, "pairs": self.pairs,
                "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        atomic_write_json(Path(path), self.to_json())

    def counts(self) -> dict[str, int]:
        return {k: sum(len(e.get(k, [])) for e in self.classes.values()) for k in KINDS} | {
            "pairs": sum(len(r) for r in self.pairs.values())}

    def pair_features(self, classes: list[str], *, exact: bool = False) -> dict[tuple[str, str], list[str]]:
        """Pair features with both class names matched to the vocabulary (others are skipped);
        ``exact`` matches names verbatim, as the released code's dictionary lookup does."""
        names = list({*self.pairs, *(b for row in self.pairs.values() for b in row)})
        vocab = set(classes)
        mapping = {n: n for n in names if n in vocab} if exact else match_classes(names, classes)[0]
        return {(mapping[a], mapping[b]): feats for a, row in self.pairs.items() for b, feats in row.items()
                if a in mapping and b in mapping and feats}

    def text_items(self, classes: list[str], recipe: TextRecipe, *, exact: bool = False) -> list[TextItem]:
        """Index texts for ``classes``: attributes, analogous and synonyms through the recipe's
        templates. Keys match classes loosely (case, punctuation) unless ``exact``. Pair texts are
        not general texts and are not included."""
        vocab = set(classes)
        mapping = {k: k for k in self.classes if k in vocab} if exact else match_classes(list(self.classes), classes)[0]
        items: list[TextItem] = []
        for key, entry in self.classes.items():
            c = mapping.get(key)
            if c is None:
                continue
            src = entry.get("source", {})
            items += recipe.attribute_texts(c, entry.get("attribute", []), src.get("attribute", "knowledge"))
            items += [TextItem(c, "attribute", s, None, src.get("attribute_text", "knowledge"))
                      for s in entry.get("attribute_text", [])]
            items += recipe.analogous_texts(c, entry.get("analogous", []), src.get("analogous", "knowledge"))
            items += recipe.synonym_texts(c, entry.get("synonym", []), src.get("synonym", "knowledge"))
        return items


def _looks_like_sentences(data: dict[str, list[str]]) -> bool:
    """CuPL prompts are full sentences that name their class; VCD descriptors are short phrases."""
    total = named = 0
    for cls, items in data.items():
        for s in items:
            total += 1
            named += cls.lower() in s.lower()
    return total > 0 and named / total > 0.5


def load_knowledge(path: str | Path, fmt: str = "auto") -> Knowledge:
    """Read a knowledge file, a descriptor file or a CuPL prompt file (``fmt``: auto, knowledge,
    descriptors, cupl)."""
    path = Path(path)
    data = read_json_refusing_pickle(path)
    if not isinstance(data, dict):
        raise InputFormatError(f"{path}: expected a JSON object (a knowledge file, or {{class: [text, ...]}})")
    if fmt == "knowledge" or (fmt == "auto" and data.get("format") == FORMAT):
        if data.get("format") != FORMAT:
            raise InputFormatError(f"{path} is not a coder-index knowledge file (format {data.get('format')!r})")
        check(data, KNOWLEDGE, str(path))
        k = Knowledge({c: {kind: list(v) if isinstance(v, list) else dict(v) for kind, v in e.items()
                           if v is not None and (kind in KINDS or kind == "source")}
                       for c, e in data["classes"].items()},
                      {a: {b: list(f) for b, f in row.items()} for a, row in (data.get("pairs") or {}).items()},
                      data.get("provenance") if isinstance(data.get("provenance"), dict) else {})
        return k
    check(data, DESCRIPTORS, str(path))
    if fmt == "auto":
        fmt = "cupl" if _looks_like_sentences(data) else "descriptors"
    kind = {"cupl": "attribute_text", "descriptors": "attribute"}.get(fmt)
    if kind is None:
        raise InputFormatError(f"unknown knowledge format {fmt!r}; use auto, knowledge, descriptors or cupl")
    k = Knowledge(provenance={"imported_from": path.name, "format": fmt,
                              "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for cls, items in data.items():
        k.set(cls, kind, [" ".join(x.split()) for x in items if x.strip()], f"import:{path.name}")
    return k
