"""How class names and words become texts: the text *recipe* of an index.

Two presets:

* ``default`` — coder-index's own templates (``coder_index/data/templates.json``): CLIP's prompt set per dataset
  for names and synonyms, ``{c} which has {a}`` style attributes, one one-to-one template.
* ``cvpr24`` — exactly the texts the authors' released CODER code builds (``coder_index/data/cvpr24.json``,
  facts from ``YCaigogogo/CVPR24-CODER``): one name template per dataset, per-dataset and per-task
  attribute/analogous wording, synonym texts as the released code really produces them (the
  constant ``a photo of None``, once per synonym), several one-to-one templates per feature.

A recipe also says how many times a text counts (``weight``): the released code averages over
lists that may repeat a text, and so does coder-index under ``cvpr24``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from coder_index.core.choices import PRESETS, TASKS
from coder_index.core.errors import InputFormatError
from coder_index.core.records import TextItem

DEFAULT_PAIR_TEMPLATE = "Because of {f}, {a} is different from {b}"
_PLACEHOLDER = re.compile(r"\{([cafb])\}")


@cache
def data_file(name: str) -> dict[str, Any]:
    """A JSON file shipped in ``coder_index/data/`` (the package ``coder_index.data``)."""
    try:
        text = resources.files("coder_index.data").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without install
        text = (Path(__file__).resolve().parent.parent / "data" / name).read_text(encoding="utf-8")
    return json.loads(text)


def nfc(text: str) -> str:
    """Unicode NFC: 'é' typed as one code point or as 'e' + a combining accent is the same name."""
    return unicodedata.normalize("NFC", text)


def norm_key(name: str) -> str:
    """A name for loose matching: NFC, case-folded, letters and digits only (any script)."""
    return "".join(ch for ch in nfc(name).casefold() if ch.isalnum())


def fill(template: str, c: str | None = None, a: str | None = None, *, f: str | None = None,
         b: str | None = None) -> str:
    """One-pass substitution of ``{c} {a} {f} {b}``: braces inside inserted names or features stay
    literal, and an inserted value is never substituted again (str.format would do both wrong)."""
    values = {"c": c, "a": a, "f": f, "b": b}

    def sub(m: re.Match) -> str:
        v = values[m.group(1)]
        return m.group(0) if v is None else v

    return _PLACEHOLDER.sub(sub, template)


# --------------------------------------------------------------------------------- datasets
def dataset_names() -> list[str]:
    return sorted(k for k in data_file("templates.json") if not k.startswith("_"))


def resolve_dataset(dataset: str | None) -> str | None:
    """coder-index's key for a dataset name, alias or released key (case and punctuation ignored)."""
    if not dataset:
        return None
    wanted = norm_key(dataset)
    data = data_file("templates.json")
    for k, v in data.items():
        if not k.startswith("_") and (norm_key(k) == wanted or wanted in {norm_key(a) for a in v.get("aliases", [])}):
            return k
    released = _released_entry(dataset)
    if released is not None:
        return released[1]["dataset"]
    raise InputFormatError(f"unknown dataset '{dataset}'; known: {', '.join(dataset_names())} and the released "
                           f"keys {', '.join(released_keys())} (or leave --dataset out for the default templates)")


def released_keys() -> list[str]:
    return [k for k in data_file("cvpr24.json") if not k.startswith("_")]


def _released_entry(dataset: str) -> tuple[str, dict[str, Any]] | None:
    data = data_file("cvpr24.json")
    wanted = norm_key(dataset)
    for k, v in data.items():  # released keys and their aliases first
        if not k.startswith("_") and (norm_key(k) == wanted or wanted in {norm_key(a) for a in v["aliases"]}):
            return k, v
    for k, v in data.items():  # then coder-index's own key (imagenet -> ImageNet, not ImageNet-V2)
        if not k.startswith("_") and norm_key(v["dataset"]) == wanted:
            return k, v
    return None


def shipped_class_lists() -> list[str]:
    """The datasets whose class list ships in the package (the released keys of the cvpr24 preset)."""
    return [k for k in data_file("cvpr24.json") if not k.startswith("_") and k != "ImageNet-V2"]


def shipped_class_list(dataset: str) -> Path:
    """The class list shipped for ``dataset`` (any name the cvpr24 preset knows it by): the released
    CODER code's ``datasets/class_name/{key}.txt`` (``coder_index/data/classnames/README.md``)."""
    found = _released_entry(dataset)
    if found is None:
        raise InputFormatError(f"no class list ships for --dataset {dataset!r}; pass --classes FILE (one class "
                               f"name per line, in label order). Lists ship for: {', '.join(shipped_class_lists())}")
    key = "ImageNet" if found[0] == "ImageNet-V2" else found[0]  # the same 1,000 classes
    name = f"classnames/{key}.txt"
    try:
        path = Path(str(resources.files("coder_index.data").joinpath(name)))
    except ModuleNotFoundError:  # pragma: no cover - a source tree without install
        path = Path(__file__).resolve().parent.parent / "data" / name
    if not path.is_file():
        raise InputFormatError(f"the shipped class list {name} is missing from this installation of coder-index; "
                               "reinstall it, or pass --classes FILE")
    return path


def released_dataset(dataset: str | None) -> tuple[str, dict[str, Any]]:
    """(released key, its cvpr24.json entry) for any name of a dataset the released code covers."""
    found = _released_entry(dataset) if dataset else None
    if found is None:
        raise InputFormatError(
            f"--preset cvpr24 needs --dataset with one of the released datasets: {', '.join(released_keys())} "
            f"(got {dataset!r})")
    return found


def resolve_gap_threshold(value: float | str | None, recipe: Any) -> float | None:
    """A --gap-threshold as given: a number, None (rerank every image), or 'preset': the released
    threshold of the recipe's dataset (ImageNet 0.1, DTD 0.6, ...)."""
    if value != "preset":
        return value
    return gap_threshold_preset(recipe.released or recipe.dataset)


def gap_threshold_preset(dataset: str | None) -> float:
    """The released code's rerank gate for ``dataset`` (``--gap-threshold preset``)."""
    key, entry = released_dataset(dataset)
    if "gap_threshold" not in entry:
        known = ", ".join(k for k in released_keys() if "gap_threshold" in data_file("cvpr24.json")[k])
        raise InputFormatError(f"the released code has no rerank gate for {key}; it has one for {known}. "
                               "Pass a number to --gap-threshold")
    return float(entry["gap_threshold"])


def few_shot_defaults(dataset: str | None) -> dict[str, Any]:
    """augment_epochs, init_alpha, init_beta of the released configs (20 epochs where none is given)."""
    found = _released_entry(dataset) if dataset else None
    fs = (found[1].get("few_shot") if found else None) or {}
    return {"augment_epochs": int(fs.get("augment_epochs", 20)), "init_alpha": float(fs.get("init_alpha", 1.0)),
            "init_beta": float(fs.get("init_beta", 1.0)), "released": found[0] if found else None}


def tip_adapter_config(dataset: str | None) -> dict[str, Any] | None:
    """Tip-Adapter's own released config for ``dataset`` (gaopengcuhk/Tip-Adapter configs/*.yaml):
    ``config``, ``search_scale`` and ``search_step`` ([beta, alpha]; one search round),
    ``init_beta``, ``init_alpha``; None for a dataset it has no config for."""
    found = _released_entry(dataset) if dataset else None
    tip = ((found[1].get("few_shot") or {}).get("tip_adapter") if found else None)
    return dict(tip) if tip else None


def _by_label(names: list[str], classes: list[str], what: str, key: str) -> list[str]:
    if len(names) != len(classes):
        raise InputFormatError(f"the released {what} of {key} has {len(names)} classes, the index {len(classes)}; "
                               "build the index from the released class list (same classes, same order)")
    return list(names)


def loader_class_names(dataset: str | None, classes: list[str]) -> list[str]:
    """The class names the released few-shot code's data loader gives its zero-shot term, by label:
    ImageNet's loader differs from ImageNet.txt at 4 labels (eft -> newt, ...), EuroSAT's loader has
    eurosat1's names; elsewhere the index's own names (the loaders read them from the dataset's split
    file, which the released repository does not hold)."""
    found = _released_entry(dataset) if dataset else None
    fs = (found[1].get("few_shot") or {}) if found else {}
    if "loader_class_names" in fs:
        return _by_label(fs["loader_class_names"], classes, "data loader", found[0])  # type: ignore[index]
    out = list(classes)
    for label, listed, loader in fs.get("loader_renames", []):
        # only where the index holds the released list's name at that label
        if label < len(out) and out[label].replace("_", " ") == listed:
            out[label] = loader
    return out


def clip_prompts(dataset: str | None) -> tuple[str, list[str]]:
    """CLIP's published zero-shot prompt list for ``dataset`` ('imagenet''s 80 where it has none, as
    CLIP_benchmark does), with the name of the list used."""
    data = data_file("clip_prompts.json")
    key = resolve_dataset(dataset) if dataset else None
    if key in data:
        return f"clip:{key}", list(data[key])
    return "clip:imagenet", list(data["imagenet"])


# --------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class TextRecipe:
    """Turns class names, attributes, analogous names, synonyms and pair features into texts.

    Recorded in every index (``state.text_recipe``) so that texts added later, pair texts generated
    on demand included, follow the same wording.
    """

    preset: str = "default"
    dataset: str | None = None           # coder-index dataset key
    task: str = "zero-shot"
    released: str | None = None          # released dataset key (cvpr24)
    name_templates: tuple[str, ...] = ()
    attribute_template: str = "{c} which has {a}"
    analogous_template: str = "a {c} similar to {a}"
    pair_templates: tuple[str, ...] = (DEFAULT_PAIR_TEMPLATE,)
    # (class, name written in its texts) where they differ: the released few-shot EuroSAT texts say
    # "Annual Crop Land" for the class listed as "annual crop land" (datasets/class_name/eurosat1.txt)
    text_names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def make(cls, preset: str = "default", dataset: str | None = None, task: str = "zero-shot") -> TextRecipe:
        if preset not in PRESETS:
            raise InputFormatError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        if task not in TASKS:
            raise InputFormatError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if preset == "cvpr24":
            key, e = released_dataset(dataset)
            return cls("cvpr24", e["dataset"], task, key, (e["name"],), e["attribute"][task], e["analogous"][task],
                       tuple(e["pair"]))
        key = resolve_dataset(dataset)
        entry = data_file("templates.json")[key or "default"]
        return cls("default", key, task, None, tuple(entry["name"]), entry["attribute"], entry["analogous"],
                   (DEFAULT_PAIR_TEMPLATE,))

    def for_classes(self, classes: list[str]) -> TextRecipe:
        """This recipe with the class names its texts use for ``classes`` (by label): under cvpr24 the
        released few-shot EuroSAT texts take eurosat1's names; otherwise the classes' own."""
        if not (self.is_released and self.task == "few-shot"):
            return self
        fs = data_file("cvpr24.json")[self.released].get("few_shot") or {}
        if "text_class_names" not in fs:
            return self
        names = _by_label(fs["text_class_names"], classes, "few-shot text class list", self.released or "")
        return replace(self, text_names=tuple((c, n) for c, n in zip(classes, names, strict=True) if c != n))

    # ---- persistence
    def to_dict(self) -> dict[str, Any]:
        d = {"preset": self.preset, "dataset": self.dataset, "task": self.task, "released": self.released,
             "name_templates": list(self.name_templates), "attribute_template": self.attribute_template,
             "analogous_template": self.analogous_template, "pair_templates": list(self.pair_templates)}
        if self.text_names:  # absent otherwise: recipes of earlier indexes read and compare the same
            d["text_names"] = [list(p) for p in self.text_names]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextRecipe:
        return cls(d["preset"], d.get("dataset"), d.get("task", "zero-shot"), d.get("released"),
                   tuple(d["name_templates"]), d["attribute_template"], d["analogous_template"],
                   tuple(d["pair_templates"]), tuple((str(a), str(b)) for a, b in d.get("text_names", [])))

    def describe(self) -> str:
        where = self.released or self.dataset or "no dataset"
        return f"preset {self.preset} ({where}, {self.task})"

    @property
    def is_released(self) -> bool:
        return self.preset == "cvpr24"

    @property
    def knowledge_key(self) -> str | None:
        """File stem of this dataset in the released expert_knowledge/ (ImageNet-V2 uses ImageNet's)."""
        return data_file("cvpr24.json")[self.released]["knowledge"] if self.released else None

    # ---- class names inside texts
    def _spelled(self, c: str) -> str:
        """The class name written in its texts (the class itself unless ``text_names`` says otherwise)."""
        return dict(self.text_names).get(c, c) if self.text_names else c

    def _name_in_name_text(self, c: str) -> str:
        # The released code replaces '_' by ' ' for name texts only; attribute, analogous and pair
        # texts get the class name verbatim.
        return self._spelled(c).replace("_", " ") if self.is_released else c

    # ---- texts
    def name_texts(self, classes: Iterable[str]) -> list[TextItem]:
        return [TextItem(c, "name", fill(t, self._name_in_name_text(c)), template=t, source="template")
                for c in classes for t in self.name_templates]

    def attribute_texts(self, c: str, attributes: Iterable[str], source: str) -> list[TextItem]:
        return _weighted(c, "attribute", (fill(self.attribute_template, self._spelled(c), a) for a in attributes),
                         self.attribute_template, source, self.is_released)

    def analogous_texts(self, c: str, names: Iterable[str], source: str) -> list[TextItem]:
        return _weighted(c, "analogous", (fill(self.analogous_template, self._spelled(c), a) for a in names),
                         self.analogous_template, source, self.is_released)

    def synonym_texts(self, c: str, synonyms: Iterable[str], source: str) -> list[TextItem]:
        synonyms = list(synonyms)
        if self.is_released:
            # Released quirk, reproduced on purpose: get_templates(dataset, 'syno', synonym) puts the
            # synonym into `class_name`, so the template is filled with syno=None: one constant text
            # per synonym, e.g. "a photo of None".
            return _weighted(c, "synonym", (fill(t, "None") for _ in synonyms for t in self.name_templates),
                             self.name_templates[0], source, True)
        return [TextItem(c, "synonym", fill(t, s), t, source) for s in synonyms for t in self.name_templates]

    def pair_texts(self, a: str, b: str, features: Iterable[str]) -> list[tuple[str, str, int]]:
        """(feature, text, weight) of every template for every feature of ``a`` against ``b``."""
        sa, sb = self._spelled(a), self._spelled(b)
        texts = [(f, " ".join(fill(t, a=sa, b=sb, f=f).split())) for f in features for t in self.pair_templates]
        if not self.is_released:
            texts = [(f, t) for f, t in texts if f.strip()]
        counts = Counter(t for _, t in texts)
        feature_of = {}
        for f, t in texts:
            feature_of.setdefault(t, f)
        return [(feature_of[t], t, n if self.is_released else 1) for t, n in counts.items()]


def _weighted(c: str, kind: str, texts: Iterable[str], template: str, source: str, keep_repeats: bool
              ) -> list[TextItem]:
    """One item per distinct text; under the released preset a repeated text counts as often as it
    appears (the released code averages over its lists as they are)."""
    counts = Counter(" ".join(t.split()) for t in texts)  # CLIP's tokenizer ignores repeated whitespace
    return [TextItem(c, kind, t, template, source, weight=n if keep_repeats else 1) for t, n in counts.items() if t]
