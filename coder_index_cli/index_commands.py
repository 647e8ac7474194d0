"""`coder-index texts`, `info` and `verify`: what an index holds, and whether it is whole."""

from __future__ import annotations

import sys

import click

from .common import friendly_errors, print_json
from .options import options


@click.command()
@click.argument("query")
@options("index")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Texts to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options("device")
@friendly_errors
def texts(query: str, index_dir: str, k: int, as_json: bool, device: str | None) -> None:
    """The index's k texts nearest to a text QUERY (cosine of CLIP text embeddings).

    \b
    Examples:
      coder-index texts "a fluffy white dog" --index pets-index
      coder-index texts "striped fur" --index in1k -k 20 --json
    """
    from coder_index.methods.text_index import TextIndex

    hits = TextIndex.open(index_dir, device=device).texts_near(query, k)
    if as_json:
        print_json(hits)
        return
    for t in hits:
        click.echo(f"{t['cosine']:8.4f}  {t['kind']:<9}  {t['class']}: {t['text']}")


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def info(index_dir: str, as_json: bool) -> None:
    """Show an index's manifest, model and counts of classes and texts per kind.

    \b
    Examples:
      coder-index info pets-index
      coder-index info pets-index --json | jq .counts
    """
    from coder_index.methods.text_index import TextIndex

    data = TextIndex.open(index_dir).info()
    if as_json:
        print_json(data)
        return
    m = data["manifest"]
    model = m["model"]
    click.echo(f"index:       {data['path']} (format {m['format_version']}, generation {data['generation']})")
    tag = f"  pretrained={model['pretrained']}" if model["pretrained"] else ""
    click.echo(f"model:       {model['model']}{tag}")
    click.echo(f"weights:     sha256 {model['weights_sha256']}")
    click.echo(f"dim:         {m['dim']}")
    click.echo(f"created:     {m.get('created_at')}   updated: {m.get('updated_at', '-')}")
    click.echo(f"classes:     {data['counts']['classes']}")
    for kind, n in data["counts"]["texts"].items():
        click.echo(f"texts {kind + ':':<11}{n}")
    click.echo(f"pair texts:  {data['counts']['pair_texts']}")


@click.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Fix what can be fixed without losing anything: rewrite the manifest "
                                            "from meta.sqlite, finish or discard interrupted writes, remove stale "
                                            "temp files.")
@click.option("--no-model", "no_model", is_flag=True, help="Skip loading the model (its fingerprint and a sample of "
                                                          "stored vectors re-encoded from their texts).")
@options("device")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
def verify(index_dir: str, repair: bool, no_model: bool, device: str | None, as_json: bool) -> None:
    """Check everything in INDEX_DIR: manifest, meta.sqlite, FAISS type, width and checksums, id sets, model.

    Prints what is wrong and how to repair it; exits with status 1 if anything is wrong.

    \b
    Examples:
      coder-index verify pets-index
      coder-index verify pets-index --repair          # e.g. a damaged manifest.json
      coder-index verify in1k --no-model --json
    """
    from coder_index.stores.verify import verify_index

    rep = verify_index(index_dir, check_model=not no_model, repair=repair, device=device)
    if as_json:
        print_json(rep.to_dict())
    else:
        for line in rep.repaired:
            click.echo(f"repaired: {line}")
        for line in rep.checked:
            click.echo(f"ok:       {line}")
        for line in rep.notes:
            click.echo(f"note:     {line}")
        for p in rep.problems:
            click.echo(f"PROBLEM:  {p.file}: {p.what}. Fix: {p.fix}")
        click.echo(f"{index_dir}: " + ("all checks passed" if rep.ok else f"{len(rep.problems)} problem(s)"),
                   err=True)
    if not rep.ok:
        sys.exit(1)
