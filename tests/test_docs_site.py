"""The documentation: a site built from docs/ with warnings as errors (broken links and anchors
included), a CLI reference generated from the click commands, a README that is a front page whose
links all lead somewhere, a changelog entry for the version, the version in one place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import coder_index
from coder_index_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page(site):
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav) >= 20
    for page in nav:
        built = site / (page[:-3] + "/index.html" if page != "index.md" else "index.html")
        assert built.is_file(), page
    # every markdown file under docs/ is in the nav (none forgotten)
    assert {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")} == set(nav)


def test_the_cli_reference_is_generated_from_the_commands(site):
    html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        assert f"coder-index {name}" in html, name
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and not param.hidden:
                    assert opt in html, f"{name} {opt}"


def test_the_api_reference_renders_the_public_names(site):
    html = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("methods.coder.coder_features", "methods.coder.heuristic_logits", "methods.rerank.rerank",
                 "methods.fewshot.adapter.CoderAdapter", "methods.xmore.ensemble.xmore_ensemble",
                 "methods.text_index.TextIndex"):
        assert f'id="coder_index.{name}"' in html, name


def test_the_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 15
    for link in local:
        assert (ROOT / link).exists(), link


def test_one_version_everywhere():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"coder-index, version {coder_index.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "coder_index.__version__"' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M)  # no literal version here
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(coder_index.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
