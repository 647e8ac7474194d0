"""mkdocs hook: reference/cli.md's marker becomes the reference generated from the click commands
(``coder_index_cli.reference``): every command's whole help, its examples as code blocks, and its
options with their real defaults."""

from __future__ import annotations

MARKER = "<!-- the command-line reference, generated -->"


def on_page_markdown(markdown: str, page, config, files):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    if MARKER not in markdown:
        return markdown
    from coder_index_cli.main import cli
    from coder_index_cli.reference import markdown_reference

    return markdown.replace(MARKER, markdown_reference(cli))
