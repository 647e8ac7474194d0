"""Import paths of coder-index 0.2, from before the layers became folders: they keep working for
this release, with a DeprecationWarning naming the new place, and go away in 0.4.

Resolved by name on purpose: the shim must not make the new modules import each other, so it
holds dotted names and imports a target only when an old name is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> the modules its names now live in, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    f"coder_index.{old}": tuple(f"coder_index.{n}" for n in new) for old, new in {
        "errors": ("core.errors",), "validation": ("core.validation",), "untrusted": ("core.untrusted",),
        "faults": ("core.faults",), "choices": ("core.choices",), "linalg": ("core.linalg",),
        "pages": ("core.pages",), "parallelism": ("core.parallelism",), "presets": ("core.presets",),
        "sources": ("core.sources",), "index.atomic": ("core.atomic",), "index.damage": ("core.damage",),
        "index.records": ("core.records",), "pipeline.decode": ("core.decode",),
        "encoder": ("model.encoder",), "hub": ("model.hub",), "compute": ("model.compute",),
        "faiss_gpu": ("model.faiss_gpu",),
        "index.text_index": ("methods.text_index", "stores.text_index"), "index.schema": ("stores.schema",),
        "index.faissfile": ("stores.faissfile",), "index.verify": ("stores.verify",),
        "index.pairs": ("stores.pairs",), "xmore.corpus": ("stores.corpus", "pipeline.ingest_corpus"),
        "evaluation.embcache": ("stores.embcache",),
        "coder": ("methods.coder",), "candidates": ("methods.candidates",), "rerank": ("methods.rerank",),
        "predict": ("methods.predict", "methods.explain"), "pair_evidence": ("methods.pair_evidence",),
        "pair_stage": ("methods.pair_stage",), "zeroshot": ("methods.zeroshot",),
        "index.queries": ("methods.text_index",), "pipeline.scorers": ("methods.scorers",),
        "pipeline.scorer_spec": ("methods.scorer_spec",), "fewshot.adapter": ("methods.fewshot.adapter",),
        "fewshot.model": ("methods.fewshot.model",), "xmore.ensemble": ("methods.xmore.ensemble",),
        "xmore.predict": ("methods.xmore.predict",),
        "build": ("pipeline.build",), "evaluation.data": ("pipeline.labelled",),
        "fewshot.fit": ("pipeline.fit_adapter",), "fewshot.support": ("pipeline.support_views",),
        "xmore.ingest": ("pipeline.ingest_corpus",),
        "index": ("stores",), "fewshot": ("methods.fewshot",), "xmore": ("methods.xmore",),
    }.items()
}
OLD_PACKAGES = {"coder_index.index", "coder_index.fewshot", "coder_index.xmore"}


class _OldPath(types.ModuleType):
    """A module under its old name whose names are looked up where they live now."""

    __targets__: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        sub = f"{self.__name__}.{name}"
        if sub in MOVED:
            return importlib.import_module(sub)
        for target in self.__targets__:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__targets__)}) has no attribute {name!r}")


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in OLD_PACKAGES)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _OldPath(spec.name)
        module.__targets__ = MOVED[spec.name]
        if spec.name in OLD_PACKAGES:
            module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(f"{module.__name__} moved to {MOVED[module.__name__][0]} in coder-index 0.3; the old "
                      "import path works until 0.4 (docs: Changelog)", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Serve the old names after every real module was looked for (the finder goes last)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
