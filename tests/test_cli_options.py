"""Each shared option is declared once (coder_index_cli/options.py): wherever a command offers it, it has
the same names, default, type and help; the commands that should offer a group do."""

from __future__ import annotations

import click
import pytest

from coder_index_cli import options as shared
from coder_index_cli.main import cli

# Options of the same flag that mean something else in one command, on purpose.
OTHER_MEANING = {
    ("fewshot fit", "--method"),    # which fitted adapter's point to report
    ("corpus search", "--model"),   # the corpus's model by default
    ("reproduce", "--model"),       # required: the model every table row is computed with
}
NEW_MODEL_USERS = {"build", "generate", "corpus build"}  # their --model is a new index's or file's: new_model
MODEL_INDEX_USERS = {"generate", "corpus build"}  # their --index lends its model: model_index (else: index)


def commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    out = {}
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            out.update(commands(cmd, full + " "))
        else:
            out[full] = cmd
    return out


def declared(name: str) -> click.Option:
    def probe() -> None:
        pass

    return shared.OPTIONS[name](probe).__click_params__[0]


def signature(opt: click.Option) -> tuple:
    kind = opt.type
    kind_sig = (type(kind).__name__, tuple(getattr(kind, "choices", ()) or ()), repr(kind))
    return (tuple(opt.opts), tuple(opt.secondary_opts), opt.name, opt.default, opt.help, kind_sig, opt.is_flag,
            opt.show_default, opt.metavar, opt.multiple, opt.required)


ALL = commands()


def shared_name(command: str, flag: str) -> str | None:
    if (command, flag) in OTHER_MEANING:
        return None
    if flag == "--model":
        return "new_model" if command in NEW_MODEL_USERS else "model"
    if flag == "--index":
        return "model_index" if command in MODEL_INDEX_USERS else "index"
    return next((n for n in shared.OPTIONS if n not in ("model", "new_model", "index", "model_index")
                 and flag in declared(n).opts), None)


def test_every_command_offering_a_shared_option_declares_it_the_same_way():
    """No command declares a shared flag of its own (it would drift): only the listed other meanings."""
    seen = 0
    for cmd_name, cmd in ALL.items():
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            name = shared_name(cmd_name, param.opts[0])
            if name is None:
                continue
            assert signature(param) == signature(declared(name)), f"{cmd_name} {param.opts[0]} != options.{name}"
            seen += 1
    assert seen > 60  # the comparison really ran over the commands


@pytest.mark.parametrize("command, groups", [
    ("classify", ["index", "batch_size", "MODEL", "METHOD", "LLM_CLIENT", "PARALLEL", "ENGINE", "decode", "PARQUET"]),
    ("explain", ["index", "MODEL", "METHOD"]),
    ("serve", ["MODEL", "METHOD"]),
    ("eval", ["index", "batch_size", "MODEL", "LLM_CLIENT", "PARALLEL", "decode", "adapter", "corpus", "retrieve_k",
              "xmore_normalizer", "gap_threshold", "PARQUET", "label_column"]),
    ("fewshot fit", ["index", "batch_size", "MODEL", "PARALLEL", "decode"]),
    ("corpus build", ["batch_size", "PARALLEL", "ENGINE", "decode", "new_model", "model_index", "pretrained",
                      "device"]),
    ("build", ["GENERATOR", "LLM_CLIENT", "ENGINE", "preset", "new_model", "pretrained", "device"]),
    ("generate", ["GENERATOR", "LLM_CLIENT", "preset", "new_model", "model_index", "pretrained", "device"]),
    ("texts", ["index"]),
    ("reproduce", ["batch_size"]),
])
def test_commands_offer_the_shared_groups(command, groups):
    names = [n for g in groups for n in (getattr(shared, g) if g.isupper() else (g,))]
    params = {tuple(p.opts): p for p in ALL[command].params if isinstance(p, click.Option)}
    for name in names:
        ref = declared(name)
        assert tuple(ref.opts) in params, f"{command} lacks {ref.opts[0]}"
        assert signature(params[tuple(ref.opts)]) == signature(ref)


def test_main_is_a_table_of_contents():
    import inspect

    from coder_index_cli import main

    source = inspect.getsource(main)
    assert len(source.splitlines()) < 100  # the group and the list of commands; each command lives elsewhere
    assert "@cli.command" not in source and "@click.command" not in source


def test_shared_options_are_declared_only_in_options_py():
    """--index, --batch-size and the rest of the shared options are written once: no command module
    declares one of its own (it would drift: fewshot's --batch-size once defaulted to 32, the others 64)."""
    from pathlib import Path

    other_meanings = {flag for _, flag in OTHER_MEANING}  # another option of the same name, on purpose
    flags = {opt for name in shared.OPTIONS for opt in declared(name).opts if opt.startswith("--")} - other_meanings
    package = Path(shared.__file__).parent
    for module in package.glob("*.py"):
        if module.name == "options.py":
            continue
        text = module.read_text(encoding="utf-8")
        for flag in flags:
            assert f'click.option("{flag}"' not in text, f"{module.name} declares {flag} again"
