"""The authors' released expert knowledge (``expert_knowledge/`` of YCaigogogo/CVPR24-CODER).

    expert_knowledge/
      attribute/{dataset}.pkl       [[attribute, ...] per class], aligned with the class list
      simile_class/{dataset}.pkl    [[analogous class, ...] per class], aligned likewise
      synonym/{dataset}.json        [{"syno": [synonym, ...]} per class], aligned likewise
      ovo_attribute/{dataset}.json  {class_a: {class_b: [feature of a against b, ...]}}

The two ``.pkl`` files are pickles of plain lists. They are read with an unpickler that refuses
every global (class, function, module attribute): lists, dicts, strings and numbers load, anything
that would import or call code is refused before it runs. Pickle stays refused everywhere else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from coder_index.core.errors import InputFormatError
from coder_index.textgen.knowledge import Knowledge

MAX_FILE_BYTES = 512 * 1024 * 1024
FILES = {
    "attribute": ("attribute", ".pkl"),
    "analogous": ("simile_class", ".pkl"),
    "synonym": ("synonym", ".json"),
    "pairs": ("ovo_attribute", ".json"),
}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Builds only what pickle can express without a global: None, bools, numbers, strings, bytes,
    lists, tuples, dicts, sets. Every opcode that needs a class or a callable goes through
    ``find_class`` (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*), and that refuses."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it references {module}.{name}; only plain lists, dicts, strings and numbers "
                                     "are accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses persistent ids; only plain data is accepted")


def load_plain_pickle(path: Path) -> Any:
    """A pickle of plain data, or InputFormatError. Nothing in the file is executed."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputFormatError(f"{path}: {size} bytes is more than an expert-knowledge file holds; refused")
    try:
        return _NoGlobalsUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError,
            RecursionError, UnicodeDecodeError) as exc:
        raise InputFormatError(f"{path} was refused: {exc}. The released expert-knowledge pickles hold lists "
                               "of strings; convert anything else to JSON") from None


def _read_json(path: Path) -> Any:
    from coder_index.core.untrusted import read_json

    return read_json(path)


def _per_class_lists(data: Any, path: Path, n: int, what: str) -> list[list[str]]:
    if not isinstance(data, list):
        raise InputFormatError(f"{path}: expected a list with one entry per class, got {type(data).__name__}")
    if len(data) != n:
        raise InputFormatError(f"{path} has {len(data)} entries but the class list has {n}; the file must be "
                               "aligned with the class list it was made for (same order, same length)")
    from coder_index.core.untrusted import MAX_TEXT

    out = []
    for i, row in enumerate(data):
        if not isinstance(row, (list, tuple)) or not all(isinstance(x, str) and len(x) <= MAX_TEXT for x in row):
            raise InputFormatError(f"{path}: entry [{i}] must be a list of {what} strings (at most {MAX_TEXT} "
                                   "characters each)")
        out.append(list(row))
    return out


def load_expert_knowledge(root: str | Path, knowledge_key: str, classes: list[str]) -> tuple[Knowledge, list[str]]:
    """Knowledge from the released folder for one dataset (file stem ``knowledge_key``, e.g. 'ImageNet'
    or 'oxford-pet'), aligned with ``classes``; and notes on files that were not there."""
    root = Path(root)
    if not root.is_dir():
        raise InputFormatError(f"--expert-knowledge {root} is not a folder")
    paths = {kind: root / folder / f"{knowledge_key}{ext}" for kind, (folder, ext) in FILES.items()}
    present = {kind: p for kind, p in paths.items() if p.is_file()}
    if not present:
        raise InputFormatError(
            f"{root} holds none of {', '.join(str(p.relative_to(root)) for p in paths.values())}; point "
            "--expert-knowledge at the unzipped expert_knowledge/ folder and check --dataset")
    source = f"expert:{root.name}"
    k = Knowledge(provenance={"imported_from": str(root), "format": "cvpr24-expert-knowledge",
                              "dataset": knowledge_key, "files": sorted(str(p.relative_to(root))
                                                                        for p in present.values())})
    n = len(classes)
    if "attribute" in present:
        for c, items in zip(classes, _per_class_lists(load_plain_pickle(present["attribute"]), present["attribute"],
                                                     n, "attribute"), strict=True):
            k.set(c, "attribute", items, source)
    if "analogous" in present:
        for c, items in zip(classes, _per_class_lists(load_plain_pickle(present["analogous"]), present["analogous"],
                                                     n, "analogous class"), strict=True):
            k.set(c, "analogous", items, source)
    if "synonym" in present:
        from coder_index.core.untrusted import EXPERT_SYNONYMS, check

        data = check(_read_json(present["synonym"]), EXPERT_SYNONYMS, str(present["synonym"]))
        rows = [r["syno"] for r in data]
        for c, items in zip(classes, _per_class_lists(rows, present["synonym"], n, "synonym"), strict=True):
            k.set(c, "synonym", items, source)
    if "pairs" in present:
        from coder_index.core.untrusted import EXPERT_PAIRS, check

        data = check(_read_json(present["pairs"]), EXPERT_PAIRS, str(present["pairs"]))
        for a, row in data.items():
            for b, feats in row.items():
                k.set_pair(a, b, feats)
    missing = [f"{paths[kind].relative_to(root)} (no {kind} texts)" for kind in paths if kind not in present]
    return k, missing
