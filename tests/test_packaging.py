"""Every subpackage ships: pyproject.toml lists packages by hand (two of them map other folders),
so a new folder that is forgotten there would vanish from the wheel."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "coder_index").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"] == {"coder_index.data": "data", "coder_index_cli": "cli"}
    data = cfg["package-data"]["coder_index.data"]
    assert all(any(p.match(g) for g in data) for p in (ROOT / "data").iterdir() if p.suffix in (".json", ".txt"))


def test_the_pages_files_ship():
    """serve's page is package data: every file under serve/static must match a package-data glob."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = cfg["package-data"]["coder_index.serve"]
    static = ROOT / "coder_index" / "serve" / "static"
    files = [p.relative_to(static.parent) for p in static.iterdir()]
    assert {p.name for p in files} >= {"index.html", "app.js", "app.css"}
    assert all(any(p.match(g) for g in globs) for p in files)
