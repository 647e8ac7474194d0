"""What the package imports is what it declares: every third-party module imported anywhere in
coder_index/ or coder_index_cli/ comes from a distribution named in the base requirements or in an
extra; the optional ones (Ray, serve, object stores, the t-SNE picture) only in their extra; no
combination of extras asks for two FAISS builds, and two installed side by side are named with the fix."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# the extra that must declare what these parts of the package import (the rest: the base requirements)
EXTRA_OF_MODULE = {"ray": "ray", "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "h11": "serve",
                   "fsspec": "cloud", "sklearn": "report", "matplotlib": "report"}


def dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """{'base' or extra: {distribution names}}."""
    out = {"base": {dist_name(r) for r in PYPROJECT["dependencies"]}}
    for extra, reqs in PYPROJECT["optional-dependencies"].items():
        out[extra] = {dist_name(r) for r in reqs}
    return out


def imported_modules() -> dict[str, set[str]]:
    """{top-level third-party module: files importing it}."""
    found: dict[str, set[str]] = {}
    for pkg in ("coder_index", "coder_index_cli"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("coder_index", "coder_index_cli"):
                        found.setdefault(top, set()).add(str(p.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared_where_it_is_used():
    decl = declared()
    dists = md.packages_distributions()
    missing = []
    for module, files in sorted(imported_modules().items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names, f"{module} (imported by {sorted(files)}) is not installed here: cannot check its distribution"
        where = EXTRA_OF_MODULE.get(module, "base")
        if not names & decl[where]:
            missing.append(f"{module} ({sorted(names)}, imported by {sorted(files)[:3]}) is not declared in {where}")
    assert not missing, "\n".join(missing)


def test_the_optional_packages_are_not_base_requirements():
    base = declared()["base"]
    for module, extra in EXTRA_OF_MODULE.items():
        for dist in md.packages_distributions().get(module, []):
            assert dist.lower() not in base, f"{dist} is a base requirement; it belongs to the {extra} extra"


def test_no_combination_of_extras_asks_for_two_faiss_builds():
    faiss = {name: {d for d in dists if d.startswith("faiss")} for name, dists in declared().items()}
    assert faiss["base"] == {"faiss-cpu"}
    assert all(not builds for name, builds in faiss.items() if name != "base"), faiss


def test_a_mixed_faiss_install_is_named_with_the_fix(monkeypatch):
    from coder_index.model import faiss_gpu

    versions = {"faiss-cpu": "1.9.0", "faiss-gpu-cu12": "1.9.0"}

    def version(name):
        if name in versions:
            return versions[name]
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", version)
    message = faiss_gpu.mixed_install()
    assert "faiss-cpu 1.9.0 and faiss-gpu-cu12 1.9.0" in message
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12 && pip install faiss-gpu-cu12" in message
    # said at the first FAISS search of a process, on the CPU too, once
    import logging

    import numpy as np

    monkeypatch.setattr(faiss_gpu, "_said", set())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(faiss_gpu.__name__).addHandler(handler)
    try:
        vectors = np.eye(4, dtype=np.float32)
        for _ in range(2):
            faiss_gpu.knn(vectors[:1], vectors, 2, None)
    finally:
        logging.getLogger(faiss_gpu.__name__).removeHandler(handler)
    assert [r.getMessage() for r in records] == [message]
    del versions["faiss-gpu-cu12"]
    assert faiss_gpu.mixed_install() is None


def test_eval_without_the_report_extra_says_so_in_one_line(monkeypatch):
    import importlib.util

    from coder_index.evaluation import report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    why = report.tsne_unavailable()
    assert why is not None and "\n" not in why
    assert "scikit-learn" in why and "coder-index[report]" in why and "--tsne-samples 0" in why
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert report.tsne_unavailable() is None


@pytest.mark.parametrize("extra", ["serve", "report", "cloud", "ray", "docs"])
def test_the_test_command_installs_every_extra_with_tests(extra):
    """The README's test command and CI install the extras whose tests run here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if "pytest -q" in line and "pip install" in line)
    extras = re.search(r'\.\[([^\]]+)\]', command).group(1).split(",")
    assert extra in extras
    ci = re.search(r'pip install -q -e "\.\[([^\]]+)\]"', (ROOT / ".ci" / "run").read_text()).group(1).split(",")
    assert sorted(ci) == sorted(extras)
