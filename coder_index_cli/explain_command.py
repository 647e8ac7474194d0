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
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The text index whose texts explain the prediction.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Nearest texts to show.")
@options(*METHOD)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options(*MODEL)
@friendly_errors
def explain(images: tuple[str, ...], index_dir: str, k: int, zs_method: str, rerank: bool,
            gap_threshold: float | None, adapter_dir: Path | None, corpus_dir: Path | None, retrieve_k: int,
            as_json: bool, model: str | None, pretrained: str | None, device: str | None) -> None:
    """Why an image gets its class, by the method that made the prediction (CODER by default;
    --rerank, --adapter, --method xmore as in classify): the method's class scores, the k nearest
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
    """
    from coder_index.core.decode import ImageDecodeError, load_image
    from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
    from coder_index.methods.text_index import TextIndex

    spec = ScorerSpec(top_k=5, method=zs_method, rerank=rerank, retrieve_k=retrieve_k,
                      adapter=None if adapter_dir is None else str(adapter_dir),
                      corpus=None if corpus_dir is None else str(corpus_dir))
    try:
        spec.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    loaded, bad = [], []
    for path in images:  # every file is read before the model loads: a bad one is named, the rest explained
        try:
            loaded.append((path, load_image(path)))
        except ImageDecodeError as exc:
            bad.append((path, str(exc)))
    results = []
    if loaded:
        index = TextIndex.open(index_dir, device=device)
        index.require_model(model, pretrained)
        spec = replace(spec, top_k=min(5, len(index.class_names())),
                       gap_threshold=resolve_gap_threshold(gap_threshold, index))
        scorer = build_scorer(index, spec, note=lambda m: click.echo(m, err=True))
        emb = index.encoder.encode_images([im for _, im in loaded])
        if scorer.two_pass:
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
