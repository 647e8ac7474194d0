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


def _all_commands(group=cli, prefix=()):  # noqa: ANN001, ANN202 - (names, command) of every command
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from _all_commands(cmd, (*prefix, name))


def test_the_cli_reference_shows_real_defaults_whole_summaries_and_examples_as_code():
    import inspect

    from coder_index_cli.reference import markdown_reference

    md = markdown_reference(cli)
    assert "Sentinel" not in md and "UNSET" not in md
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", md, re.S))
    for names, cmd in _all_commands():
        assert f"## coder-index {' '.join(names)}" in md, names
        paragraphs = inspect.cleandoc(cmd.help or "").split("\n\n")
        summary = " ".join(ln.strip() for ln in paragraphs[0].splitlines())
        assert summary in md, (names, summary[:80])  # whole, never cut mid-sentence
        for para in paragraphs:
            if para.startswith("\b"):
                for line in para.splitlines()[1:]:
                    if line.strip() and not line.strip().endswith(":"):
                        assert line.strip() in blocks, (names, line)  # examples as code, line by line
    start = md.index("## coder-index classify\n")
    classify = md[start:md.index("## coder-index", start + 5)]
    assert re.search(r"\| `--index` \S+ \| required \|", classify)
    assert re.search(r"\| `--batch-size` \S+ \| `64` \|", classify)
    assert re.search(r"\| `-0`, `--null` \| off \|", classify)


def test_help_examples_keep_their_line_breaks():
    """A continued example ends its line with a backslash: nothing runs on after one (a docstring's
    single backslash would join the next line to it)."""
    for names, _cmd in _all_commands():
        out = CliRunner().invoke(cli, [*names, "--help"], terminal_width=200).output
        for line in out.splitlines():
            if "\\" in line and "coder-index" in line:
                assert line.rstrip().endswith("\\"), (names, line)


def test_the_classify_guide_quotes_the_reasons_the_code_gives():
    """Each reason the classify guide quotes is one the code writes (no stale promise such as
    'decompress it first'); a format name stands for the one the code fills in."""
    guide = (ROOT / "docs" / "guides" / "classify.md").read_text(encoding="utf-8")
    source = "\n".join(p.read_text(encoding="utf-8") for d in ("coder_index", "coder_index_cli")
                       for p in (ROOT / d).rglob("*.py"))
    start = guide.index("The reason is one per kind")
    quoted = re.findall(r"`([^`]+)`", guide[start:guide.index("\n\n", start)])
    start = guide.index("## When something cannot be read")
    quoted += [q for q in re.findall(r"`([^`]+)`", guide[start:guide.index("Exit statuses of", start)])
               if " " in q and not q.startswith(("-", "OUT", "retry", "CODER_INDEX"))]
    assert len(quoted) >= 8
    for phrase in quoted:
        if phrase in ("serve", "Connection refused"):  # a word of the guide's; the system's own wording
            continue
        for piece in re.split(r"\.\.\.|JPEG|PNG|data/00007\.tar|1 input\(s\)", " ".join(phrase.split())):
            if piece.strip(" :()"):
                assert piece.strip(" :") in source, (phrase, piece)
    assert "decompress it first" not in guide and "decompressed first" not in guide
