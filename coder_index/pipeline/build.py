"""Build (or extend) a text index from a class list, a text recipe and text sources."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coder_index.core.atomic import check_writable
from coder_index.core.presets import TextRecipe
from coder_index.core.sources import attribute_texts, read_class_list, read_descriptor_file
from coder_index.model.encoder import ClipEncoder
from coder_index.stores import pairs as pair_store
from coder_index.stores.text_index import MANIFEST, TextStore

if TYPE_CHECKING:
    from coder_index.textgen.knowledge import Knowledge


@dataclass
class BuildReport:
    path: str
    classes: int
    recipe: str = ""
    added: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    warnings: list[str] = field(default_factory=list)
    # texts encoded by the model, texts read from the text embedding cache, and the seconds both took
    text_encoding: dict[str, float] = field(default_factory=dict)


def resolve_recipe(index_dir: Path, preset: str | None, dataset: str | None, task: str | None) -> TextRecipe | None:
    """The recipe asked for; None means 'the existing index's own' (or the default for a new one)."""
    if preset is None and dataset is None and task is None:
        return None
    return TextRecipe.make(preset or "default", dataset, task or "zero-shot")


def build_index(index_dir: str | Path, classes_file: str | Path, *, model: str | None = None,
                pretrained: str | None = None, dataset: str | None = None, preset: str | None = None,
                task: str | None = None, descriptors: list[str | Path] | None = None, device: str | None = None,
                encoder: ClipEncoder | None = None, knowledge: list[Knowledge] | None = None,
                expert_knowledge: str | Path | None = None,
                generate: Callable[[ClipEncoder, list[str], TextRecipe], Knowledge] | None = None,
                progress: bool = False, encode: Callable[[list[str]], Any] | None = None,
                encode_with: Callable[[ClipEncoder], Any] | None = None, overwrite: bool = False,
                text_cache: str | Path | bool | None = None) -> BuildReport:
    """Create ``index_dir`` (or add to it: rebuilding is idempotent) with name texts for every class
    of ``classes_file``, attribute texts from each descriptor file, and all general kinds of each
    knowledge file. ``generate(encoder, classes, recipe)`` produces more knowledge on the fly (given
    the index's recipe: a ``cvpr24`` index asks the released generator's prompts).

    ``preset`` ('default' or 'cvpr24'), ``dataset`` and ``task`` choose the text recipe; an existing
    index keeps its own and refuses another. ``expert_knowledge`` is the released
    ``expert_knowledge/`` folder (cvpr24 preset): attributes, analogous classes, synonyms and
    one-to-one features of ``dataset``.

    ``overwrite`` deletes the index already in ``index_dir`` (damaged or not, never read) and builds
    afresh: the fix for an index that ``verify`` finds damaged.

    ``text_cache``: where text embeddings are remembered per model weights (``stores.textcache``;
    None: the default file, False: none), so that a rebuild or another index over the same texts
    encodes only what its weights never encoded.

    ``encode(texts) -> [n, D]`` encodes the texts instead of the index's encoder (e.g. a
    ``RayTextEncoder``); ``encode_with(encoder)`` is a context manager giving such a function once the
    model is known (the CLI's ``--engine ray``).
    """
    from coder_index.textgen.expert import load_expert_knowledge

    classes = read_class_list(classes_file)
    index_dir = Path(index_dir)
    check_writable(index_dir, "index directory", is_dir=True)  # before any model is loaded
    recipe = resolve_recipe(index_dir, preset, dataset, task)
    descriptor_data = [(Path(p), read_descriptor_file(p)) for p in descriptors or []]  # fail before work
    exists = (index_dir / MANIFEST).exists() and not overwrite
    if exists and recipe is None:
        recipe = TextStore.open(index_dir).recipe
    recipe = (recipe or TextRecipe.make()).for_classes(classes)  # class names in texts, per label
    expert = None
    if expert_knowledge is not None:
        if not recipe.is_released:
            raise ValueError("--expert-knowledge holds the released texts; use it with --preset cvpr24 --dataset NAME")
        expert = load_expert_knowledge(expert_knowledge, recipe.knowledge_key, classes)
    if encoder is None:
        if exists and model is None:
            encoder = TextStore.open(index_dir, device=device).encoder
        else:
            encoder = ClipEncoder(model or "ViT-B-32", pretrained, device=device)
    with encode_with(encoder) if encode_with is not None else nullcontext(encode) as encode:
        return _fill(index_dir, encoder, recipe, classes, classes_file, descriptor_data, knowledge, expert,
                     expert_knowledge, generate, progress, encode, overwrite, text_cache)


def _fill(index_dir: Path, encoder: ClipEncoder, recipe: TextRecipe, classes: list[str], classes_file: str | Path,
          descriptor_data: list, knowledge: list[Knowledge] | None, expert: Any, expert_knowledge: str | Path | None,
          generate: Callable | None, progress: bool, encode: Callable | None, overwrite: bool = False,
          text_cache: str | Path | bool | None = None) -> BuildReport:
    index = TextStore.create(index_dir, encoder, exist_ok=True, recipe=recipe, overwrite=overwrite)
    index.text_cache_path = text_cache
    index.add_classes(classes)
    report = BuildReport(str(index_dir), len(classes), recipe.describe())

    def add(items: list, kind: str) -> None:
        res = index.add_texts(items, progress=progress, desc=f"encoding {kind} texts", encode=encode)
        report.added[kind] = report.added.get(kind, 0) + res.added
        report.duplicates += res.duplicates

    add(recipe.name_texts(classes), "name")
    for path, data in descriptor_data:
        imp = attribute_texts(data, classes, recipe, source=f"descriptors:{path.name}")
        if imp.unmatched_keys:
            report.warnings.append(f"{path.name}: {len(imp.unmatched_keys)} key(s) match no class "
                                   f"(first: {imp.unmatched_keys[:3]}); their descriptors were skipped")
        if imp.classes_without:
            report.warnings.append(f"{path.name}: no descriptors for {len(imp.classes_without)} class(es) "
                                   f"(first: {imp.classes_without[:3]})")
        add(imp.items, "attribute")
    sources: list[tuple[Knowledge, bool]] = [(k, False) for k in knowledge or []]
    if expert is not None:
        sources.append((expert[0], True))  # the released lookups are exact: no loose name matching
        report.warnings += [f"expert knowledge: {m}" for m in expert[1]]
    if generate is not None:
        sources.append((generate(encoder, classes, index.recipe), False))
    for k, exact in sources:
        items = k.text_items(classes, recipe, exact=exact)
        for kind in ("attribute", "analogous", "synonym"):
            add([it for it in items if it.kind == kind], kind)
        pairs = k.pair_features(classes, exact=exact)
        if pairs:
            source = "llm:" + str((k.provenance.get("llm") or {}).get("model", "knowledge")) if not exact else \
                f"expert:{Path(str(expert_knowledge)).name}"
            report.added["pair"] = report.added.get("pair", 0) + pair_store.add_pair_texts(index, pairs, source=source)
    spent = index.text_encode_stats()
    report.text_encoding = {"encoded": spent.encoded, "from_cache": spent.from_cache,
                            "seconds": round(spent.seconds, 3)}
    index.record_run("build", {"classes_file": str(classes_file), "recipe": recipe.to_dict(),
                               "descriptors": [str(p) for p, _ in descriptor_data],
                               "knowledge": [k.provenance for k, _ in sources], "added": report.added})
    return report
