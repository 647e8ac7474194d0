"""Build (or extend) a text index from a class list, templates and attribute files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .encoder import ClipEncoder
from .index.text_index import TextIndex
from .sources import attribute_texts, load_templates, name_texts, read_class_list, read_descriptor_file

if TYPE_CHECKING:
    from .textgen.knowledge import Knowledge


@dataclass
class BuildReport:
    path: str
    classes: int
    added: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    warnings: list[str] = field(default_factory=list)


def build_index(index_dir: str | Path, classes_file: str | Path, *, model: str | None = None,
                pretrained: str | None = None, dataset: str | None = None,
                descriptors: list[str | Path] | None = None, device: str | None = None,
                encoder: ClipEncoder | None = None, knowledge: list[Knowledge] | None = None,
                generate: Callable[[ClipEncoder, list[str]], Knowledge] | None = None,
                progress: bool = False) -> BuildReport:
    """Create ``index_dir`` (or add to it: rebuilding is idempotent) with name texts for every class
    of ``classes_file``, attribute texts from each descriptor file, and all general kinds of each
    knowledge file. ``generate(encoder, classes)`` produces more knowledge on the fly."""
    classes = read_class_list(classes_file)
    templates = load_templates(dataset)
    index_dir = Path(index_dir)
    descriptor_data = [(Path(p), read_descriptor_file(p)) for p in descriptors or []]  # fail before work
    if encoder is None:
        if (index_dir / "manifest.json").exists() and model is None:
            index = TextIndex.open(index_dir, device=device)
            encoder = index.encoder
        else:
            encoder = ClipEncoder(model or "ViT-B-32", pretrained, device=device)
    index = TextIndex.create(index_dir, encoder, exist_ok=True)
    index.add_classes(classes)
    report = BuildReport(str(index_dir), len(classes))

    res = index.add_texts(name_texts(classes, templates), progress=progress)
    report.added["name"] = res.added
    report.duplicates += res.duplicates
    for path, data in descriptor_data:
        imp = attribute_texts(data, classes, templates, source=f"descriptors:{path.name}")
        if imp.unmatched_keys:
            report.warnings.append(f"{path.name}: {len(imp.unmatched_keys)} key(s) match no class "
                                   f"(first: {imp.unmatched_keys[:3]}); their descriptors were skipped")
        if imp.classes_without:
            report.warnings.append(f"{path.name}: no descriptors for {len(imp.classes_without)} class(es) "
                                   f"(first: {imp.classes_without[:3]})")
        res = index.add_texts(imp.items, progress=progress)
        report.added["attribute"] = report.added.get("attribute", 0) + res.added
        report.duplicates += res.duplicates
    all_knowledge = list(knowledge or [])
    if generate is not None:
        all_knowledge.append(generate(encoder, classes))
    for k in all_knowledge:
        items = k.text_items(classes, templates)
        for kind in ("attribute", "analogous", "synonym"):
            res = index.add_texts([it for it in items if it.kind == kind], progress=progress)
            report.added[kind] = report.added.get(kind, 0) + res.added
            report.duplicates += res.duplicates
        pairs = k.pair_features(classes)
        if pairs:
            source = "llm:" + str((k.provenance.get("llm") or {}).get("model", "knowledge"))
            report.added["pair"] = report.added.get("pair", 0) + index.add_pair_texts(pairs, source=source)
    index.record_run("build", {"classes_file": str(classes_file), "dataset": templates.dataset,
                               "descriptors": [str(p) for p, _ in descriptor_data],
                               "knowledge": [k.provenance for k in all_knowledge], "added": report.added})
    return report
