"""`coder-index`: the command group, a table of contents. Each command lives in its own module;
options that several commands share are declared once, in ``options``."""

from __future__ import annotations

import click

from coder_index import __version__

from . import (
    build_command,
    classify_command,
    corpus_command,
    eval_command,
    explain_command,
    fewshot_command,
    index_commands,
    reproduce_command,
    serve_command,
    textgen_commands,
)
from .common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="coder-index")
@click.option("-v", "--verbose", is_flag=True, help="Log what is loaded and decided.")
def cli(verbose: bool) -> None:
    """Training-free CLIP classification with cross-modal neighbour representations (CODER).

    \b
    Typical session:
      coder-index build my-index --classes classes.txt --descriptors descriptors.json \\
          --model ViT-B-32 --pretrained openai
      coder-index classify photos/ --index my-index --out predictions.csv
      coder-index explain photos/cat.jpg --index my-index -k 10
      coder-index serve my-index --predictions predictions.csv
      coder-index info my-index
    """
    setup_logging(verbose)
    skip_collections_at_exit()


def skip_collections_at_exit() -> None:
    """A command is one process: what it imported and loaded lives until it exits, so the garbage
    collector need not look at it again (core.startup: 1.3 s less at exit after open_clip's import)."""
    import atexit
    import gc

    from coder_index.core.startup import freeze_after_loading

    freeze_after_loading()
    atexit.register(gc.freeze)


# building an index, and the texts that go into it
cli.add_command(build_command.build)
textgen_commands.register(cli)            # generate, setup wordnet
# classifying, and asking why
cli.add_command(classify_command.classify)
cli.add_command(explain_command.explain)
serve_command.register(cli)               # serve
# what an index holds
cli.add_command(index_commands.texts)
cli.add_command(index_commands.info)
cli.add_command(index_commands.verify)
# evaluation, few-shot, retrieval, the paper's tables
eval_command.register(cli)                # eval
fewshot_command.register(cli)             # fewshot fit
corpus_command.register(cli)              # corpus build | info | search
reproduce_command.register(cli)           # reproduce

if __name__ == "__main__":
    cli()
