"""The command-line reference as Markdown, generated from the click commands themselves (the docs site's
``reference/cli.md`` is built from it by ``docs/hooks/cli_reference.py``): each command's whole help,
its examples as code blocks, and a table of its options with their real defaults."""

from __future__ import annotations

from typing import Any

import click


def markdown_reference(group: click.Group, prog: str = "coder-index") -> str:
    """Every command of ``group`` (groups' commands too), in the order ``--help`` lists them."""
    ctx = click.Context(group, info_name=prog)
    parts = [_command(group, prog, ctx, level=2, root=True)]
    parts += _commands(group, prog, ctx, level=2)
    return "\n".join(parts)


def _commands(group: click.Group, prefix: str, parent: click.Context, level: int) -> list[str]:
    out = []
    for name in group.list_commands(parent):
        cmd = group.get_command(parent, name)
        if cmd is None or cmd.hidden:
            continue
        ctx = click.Context(cmd, info_name=name, parent=parent)
        out.append(_command(cmd, f"{prefix} {name}", ctx, level))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{prefix} {name}", ctx, level + 1)
    return out


def _command(cmd: click.Command, name: str, ctx: click.Context, level: int, root: bool = False) -> str:
    lines = [f"{'#' * level} {name}" if not root else f"{'#' * level} {name} (the command group)", ""]
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines += ["```text", f"{name} {usage}".rstrip(), "```", ""]
    lines += help_markdown(cmd.help or "")
    options = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    if options:
        lines += ["", "| Option | Default | Description |", "| --- | --- | --- |"]
        for opt in options:
            lines.append(f"| {_cell(_names(opt))} | {_cell(default_text(opt))} | {_cell(opt.help or '')} |")
    if isinstance(cmd, click.Group):
        subs = [n for n in cmd.list_commands(ctx) if not getattr(cmd.get_command(ctx, n), "hidden", False)]
        lines += ["", "Commands: " + ", ".join(f"`{n}`" for n in subs) + "."]
    return "\n".join(lines) + "\n"


def help_markdown(text: str) -> list[str]:
    """A command's help as Markdown: paragraphs as text, and each block click keeps as written (the
    ``\\b`` ones: examples) as a code block, line by line."""
    import inspect

    out: list[str] = []
    for para in inspect.cleandoc(text).split("\n\n"):
        if para.startswith("\b"):
            body = para[1:].strip("\n").splitlines()
            title = body[0].strip() if body and body[0].strip().endswith(":") else None
            if title:
                out += [f"**{title}**", ""]
                body = body[1:]
            indent = min((len(ln) - len(ln.lstrip()) for ln in body if ln.strip()), default=0)
            out += ["```bash", *[ln[indent:] for ln in body], "```", ""]
        else:
            out += [" ".join(ln.strip() for ln in para.splitlines()), ""]
    return out


def default_text(opt: click.Option) -> str:
    """The option's default as ``--help`` would mean it: a value, "on"/"off" for a flag, "required", or
    "none" (never click's internal sentinels)."""
    if opt.required:
        return "required"
    value: Any = opt.default
    unset = value is None or repr(value).startswith("Sentinel.") or type(value).__name__ in ("Sentinel", "_Missing")
    if opt.is_flag:
        return "on" if not unset and value is True else "off"
    if callable(value):
        return "computed when run"
    if unset:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return f"`{value}`"


def _names(opt: click.Option) -> str:
    names = ", ".join(f"`{o}`" for o in [*opt.opts, *opt.secondary_opts])
    if not opt.is_flag:
        choices = getattr(opt.type, "choices", None)
        metavar = opt.metavar or ("|".join(str(c) for c in choices) if choices else
                                  opt.type.name.split()[0].upper())  # "integer range" -> INTEGER
        names += f" {metavar}"
    return names


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
