"""The package's shape: no import cycle anywhere (imports inside functions and for type checking
included), the layer contract of pyproject.toml kept, and 0.2's import paths still served, with a
DeprecationWarning, by the modules that hold those names now."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import grimp
import pytest


def test_no_import_cycle():
    graph = grimp.build_graph("coder_index", "coder_index_cli")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=imported, imported=module)) +
                              f" -> {imported}")
    assert cycles == []


def test_layer_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"  # import-linter's command, beside this python
    res = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("old,name,new", [
    ("coder_index.index.text_index", "TextIndex", "coder_index.methods.text_index"),
    ("coder_index.index.text_index", "MANIFEST", "coder_index.stores.text_index"),
    ("coder_index.build", "build_index", "coder_index.pipeline.build"),
    ("coder_index.presets", "TextRecipe", "coder_index.core.presets"),
    ("coder_index.encoder", "ClipEncoder", "coder_index.model.encoder"),
    ("coder_index.predict", "explain", "coder_index.methods.explain"),
    ("coder_index.rerank", "PairTable", "coder_index.stores.pairs"),
    ("coder_index.xmore.corpus", "folder_captions", "coder_index.pipeline.ingest_corpus"),
    ("coder_index.fewshot.fit", "fit_adapter", "coder_index.pipeline.fit_adapter"),
    ("coder_index.evaluation.data", "load_labelled", "coder_index.pipeline.labelled"),
])
def test_old_import_paths_warn_and_give_the_same_objects(old, name, new):
    for mod in [m for m in sys.modules if m == old or m.startswith(old + ".")]:
        del sys.modules[mod]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)


def test_unknown_old_name_is_an_attribute_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module("coder_index.hub")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018
