"""`coder-index explain`: why an image gets its class, by the method that made the prediction."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .common import friendly_errors, print_json, resolve_gap_threshold
from .options import METHOD, MODEL, options


@click.command()
@click.argument("images", nargs=-1, metavar="[IMAGE | URL | SHARD/KEY]...")
@options("index")
@click.option("--predictions", "predictions", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A classify output: explain its rows with the method that made them (settings and X-MoRe's "
                   "normalisers from OUT.run.json); IMAGE arguments are then its row paths (files, URLs, "
                   "SHARD/KEY), read from where classify ran.")
@click.option("--row", "rows", multiple=True, type=click.IntRange(1),
              help="With --predictions: explain row N of the file (numbered from 1). Repeatable.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Nearest texts to show.")
@options(*METHOD)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options(*MODEL)
@friendly_errors
def explain(images: tuple[str, ...], index_dir: str, predictions: str | None, rows: tuple[int, ...], k: int,
            zs_method: str, rerank: bool,
            gap_threshold: float | None, adapter_dir: Path | None, corpus_dir: Path | None, retrieve_k: int,
            xmore_normalizer: str | None, xmore_retrieval: str | None, as_json: bool, model: str | None,
            pretrained: str | None, device: str | None) -> None:
    """Why an image gets its class, by the method that made the prediction (CODER by default;
    --rerank, --adapter, --method xmore as in classify; with --predictions OUT, the method that made
    OUT's rows, and for X-MoRe the run's own normalisers): the method's class scores, the k nearest
    texts, the best texts of the predicted class and of the runner-up, for X-MoRe the captions of
    the nearest corpus images, and (when the index holds pair texts) the CODER* pair scores of its
    top-5 classes. Every readable image is explained; each unreadable one is named on stderr and
    the exit status is 1.

    \b
    Examples:
      coder-index explain cat.jpg --index pets-index
      coder-index explain a.jpg b.png --index in1k -k 20 --json > why.json
      coder-index explain cat.jpg --index pets-index --rerank
      coder-index explain cat.jpg --index pets-index --adapter pets-adapter
      coder-index explain cat.jpg --index in1k --corpus laion-corpus --method xmore
      coder-index explain --index in1k --predictions preds.csv --row 1 --row 7
      coder-index explain shards/00000.tar/000000123 --index in1k --predictions preds.csv
      coder-index explain https://host/img/cat.jpg --index in1k
    """
    from coder_index.core.decode import ImageDecodeError, decode_image_bytes
    from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
    from coder_index.methods.text_index import TextIndex
    from coder_index.pipeline.rows import RunRecord, predictions_rows, row_bytes, run_scorer

    record, cwd, parquet = None, None, None
    given = dict(method=zs_method, rerank=rerank, retrieve_k=retrieve_k, normalizer=xmore_normalizer,
                 retrieval=xmore_retrieval,
                 adapter=None if adapter_dir is None else str(adapter_dir),
                 corpus=None if corpus_dir is None else str(corpus_dir), gap_threshold=gap_threshold)
    if predictions is not None:
        record = RunRecord.load(predictions)
        _refuse_method_options(record)
        given = {**given, **record.spec()}
        dirs = record.working_dirs()
        cwd = dirs[0] if dirs else Path(predictions).resolve().parent
        parquet = record.parquet_options()
        images = (*images, *predictions_rows(predictions, list(rows)))
    elif rows:
        raise click.UsageError("--row N names a row of a predictions file: add --predictions OUT")
    if not images:
        raise click.UsageError("name an IMAGE (a file, a URL, or a SHARD/KEY row), or --predictions OUT --row N")
    spec = ScorerSpec(top_k=5, **{k_: v for k_, v in given.items() if k_ != "gap_threshold"})
    try:
        spec.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    loaded, bad = [], []
    for path in images:  # every image is read before the model loads: a bad one is named, the rest explained
        try:
            loaded.append((path, decode_image_bytes(row_bytes(path, cwd, parquet))))
        except ImageDecodeError as exc:
            bad.append((path, str(exc)))
    results = []
    if loaded:
        index = TextIndex.open(index_dir, device=device)
        index.require_model(model, pretrained)
        note = lambda m: click.echo(m, err=True)  # noqa: E731
        if record is not None:  # the rows' own scorer: their method, settings and normalisers
            from coder_index.core.errors import InputFormatError

            try:
                scorer = run_scorer(index, record, top_k=5, note=note)
            except InputFormatError as exc:
                raise click.UsageError(f"{exc} (--index)") from None
        else:
            spec = replace(spec, top_k=min(5, len(index.class_names())),
                           gap_threshold=resolve_gap_threshold(given["gap_threshold"], index))
            scorer = build_scorer(index, spec, note=note)
        emb = index.encoder.encode_images([im for _, im in loaded])
        if scorer.two_pass and scorer.normalizers is None:  # X-MoRe over a set: these images are the set
            scorer.prepare(emb, {})
        results = index.explain(emb, k=k, scorer=scorer)
        for (path, _), r in zip(loaded, results, strict=True):
            r["path"] = path
    if as_json:
        print_json(results)
    else:
        for r in results:
            _print_explanation(r)
    for path, reason in bad:
        click.echo(f"cannot read image {path}: {reason}", err=True)
    if bad:
        sys.exit(1)


_METHOD_OPTIONS = ("zs_method", "rerank", "gap_threshold", "adapter_dir", "corpus_dir", "retrieve_k",
                   "xmore_normalizer", "xmore_retrieval")


def _refuse_method_options(record) -> None:  # noqa: ANN001 - RunRecord
    """With --predictions the rows' own method is explained: a method option given too is refused."""
    ctx = click.get_current_context()
    given = [name for name in _METHOD_OPTIONS
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        flags = ", ".join("--" + n.replace("zs_", "").replace("_dir", "").replace("_", "-") for n in given)
        raise click.UsageError(f"the rows of --predictions were made by {record.method} (OUT.run.json says how): "
                               f"leave out {flags}")


def _print_explanation(r: dict[str, Any]) -> None:
    click.echo(f"{r['path']}: {r['prediction']} ({r['method']})")
    click.echo("  classes (score, CODER stage-1 logit):")
    for c in r["classes"]:
        click.echo(f"    {c['score']:8.4f}  {c['logit']:8.3f}  {c['class']}")
    click.echo("  nearest texts (cosine, kind, class):")
    for t in r["nearest_texts"]:
        click.echo(f"    {t['cosine']:8.4f}  {t['kind']:<9}  {t['class']}: {t['text']}")
    for title, hits in ((f"best texts of {r['prediction']}", r["class_texts"]),
                        (f"best texts of the runner-up, {r['runner_up']}", r["runner_up_texts"])):
        if hits:
            click.echo(f"  {title}:")
        for t in hits:
            click.echo(f"    {t['cosine']:8.4f}  {t['kind']:<9}  {t['text']}")
    if r.get("captions"):
        click.echo("  captions of the nearest corpus images (cosine):")
        for c in r["captions"]:
            click.echo(f"    {c['cosine']:8.4f}  {c.get('caption', '')}")
    if r["pairs"]:
        ev = r["pairs"]
        click.echo(f"  CODER* pairs (score > 0 favours the first class): rerank picks {ev['prediction']}"
                   + (" (changed)" if ev["changed"] else ""))
        for pair in ev["pairs"]:
            if pair["has_texts"]:
                click.echo(f"    {pair['score']:+8.4f}  {pair['a']} vs {pair['b']}")
