"""`coder-index classify`: one row per image of a folder, listed files, webdataset shards or parquet files."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .common import EXIT_INCOMPLETE, IMAGE_SUFFIXES, friendly_errors, resolve_gap_threshold
from .options import ENGINE, LLM_CLIENT, METHOD, MODEL, PARALLEL, PARQUET, check_engine_options, options
from .textgen_commands import make_generator


@click.command()
@click.argument("inputs", nargs=-1, metavar="FOLDER | IMAGE... | SHARD... | PARQUET...")
@click.option("--files-from", "files_from", default=None, metavar="LIST",
              help="Classify the image files LIST names, one path per line ('-': standard input), relative to the "
                   "working directory; rows name them as listed.")
@click.option("-0", "--null", "null_separated", is_flag=True,
              help="With --files-from: paths are separated by NUL bytes (find -print0), for names holding newlines.")
@click.option("--save-embeddings", "save_embeddings", default=None, metavar="DIR|URL",
              help="Also keep the image embeddings in clip-retrieval's layout (DIR/img_emb/img_emb_N.npy + "
                   "DIR/metadata/metadata_N.parquet with image_path, caption, key, shard, json), written as the run "
                   "goes and resumed with it; `coder-index corpus build --embeddings DIR` reads it back. A URL "
                   "(s3://bucket/emb/, gs://...) writes the parts to the object store; the part being filled waits "
                   "beside --out.")
@click.option("--embeddings-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Float type of --save-embeddings (recorded in DIR/embeddings.json).")
@click.option("--embeddings-part-rows", default=100_000, show_default=True, type=click.IntRange(1),
              help="Rows per img_emb_N.npy of --save-embeddings (a part closes at the first batch that reaches it).")
@options("index")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Predictions file: .csv or .jsonl. Rerunning with the same file resumes.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Classes per row.")
@options("batch_size")
@options(*PARALLEL, *MODEL, *METHOD)
@click.option("--rerank-chunk", default=2048, show_default=True, type=click.IntRange(1),
              help="Images per rerank step (their missing pairs are generated together).")
@click.option("--candidates", default=None, metavar="M|auto",
              type=click.STRING, callback=lambda _c, _p, v: _parse_candidates(v),
              help="Large vocabularies: stage 1 on each image's M most likely classes (found by a search over one "
                   "vector per class), scored exactly from their texts; 'auto' = 64 past 200,000 texts or 20,000 "
                   "classes. Scores are then the softmax over the M. [default: dense]")
@options(*ENGINE)
@click.option("--ray-index-source", default=None, metavar="PATH|URI",
              help="With --engine ray: where workers read the index (a path every node mounts, or a URI such as "
                   "s3://bucket/in1k that each node copies once) [default: --index as a path].")
@click.option("--overwrite", is_flag=True, help="Start afresh: delete OUT, its errors file and its run record first "
                                               "(otherwise a rerun resumes, and other settings are refused).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when FOLDER holds no image, or some file could not "
                                            "be read (the rows of the others are written all the same).")
@options(*LLM_CLIENT)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Encoder precision on a GPU (auto: fp16 on CUDA, fp32 on the CPU). CODER, the rerank and the "
                   "adapter always compute in float32, without TF32.")
@options("decode", *PARQUET)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def classify(inputs: tuple[str, ...], files_from: str | None, null_separated: bool, save_embeddings: str | None,
             embeddings_dtype: str, embeddings_part_rows: int, index_dir: str, out: Path,
             top_k: int, batch_size: int, workers: int | None,
             threads: int | None, model: str | None, pretrained: str | None, device: str | None, zs_method: str,
             rerank: bool, gap_threshold: float | None, adapter_dir: Path | None, corpus_dir: Path | None,
             retrieve_k: int, xmore_normalizer: str | None, xmore_retrieval: str | None, rerank_chunk: int,
             candidates: str | None, engine: str,
             ray_address: str | None, ray_actors: int | None, ray_gpus: float, ray_index_source: str | None,
             overwrite: bool, strict: bool,
             precision: str, decode: str, image_column: str | None, key_column: str | None, quiet: bool,
             **llm: Any) -> None:
    """Classify every image under FOLDER (recursively), the IMAGE files named (and those of
    --files-from; paths or URLs), the samples of webdataset shards, or the rows of parquet files,
    with CODER zero-shot. Shards are .tar files, .tar.gz/.tgz files, a folder of them, a brace
    pattern such as 'data/{00000..00099}.tar', URLs (https://, s3://, gs://, anything fsspec reads)
    or pipe:COMMAND (its output is the shard; 'pipe:aws s3 cp s3://b/{000..099}.tar -' is one
    command per shard, as webdataset expands it). Parquet files (Hugging Face datasets, img2dataset's
    output or its URL lists), local or by URL, are read by row group.

    Writes one row per image to --out (path as FOLDER/relative path, as the file was named,
    SHARD/KEY for a shard's sample, FILE.parquet/KEY for a parquet row, a URL without its
    credentials; label, score = softmax probability, method, then the next top-k classes). What
    cannot be classified (an image that does not decode, a FIFO named like an image, a sample
    without an image) is listed with the reason in OUT.errors.csv; so is what cannot be read (a
    missing file or shard, a 404, a command that fails, a damaged shard, retries spent), marked
    retry: the other inputs are classified, the run exits with status 3 (incomplete), and a rerun
    retries only those. A refusal that holds for every input (no credentials, a bucket that does not
    exist) stops at once with status 1. Interrupted runs resume: rerun the same command.
    OUT.run.json records the index, model and settings: a rerun with others is refused (--overwrite
    starts afresh). A second run on the same OUT is refused while the first runs.

    \b
    Examples:
      coder-index classify photos/ --index pets-index --out preds.csv
      coder-index classify cat.jpg dog.png --index pets-index --out preds.csv
      find /data -name '*.jpg' -newer last-run -print0 | \\
          coder-index classify --files-from - -0 --index in1k --out new.csv
      coder-index classify /data/images --index in1k --out preds.jsonl --top-k 10 --batch-size 256 --workers 8
      coder-index classify photos/ --index pets-index --out preds.csv --rerank --llm-model gpt-4o-mini
      coder-index classify photos/ --index pets-index --out preds.csv --rerank --gap-threshold 0.3 \\
          --base-url http://localhost:8000/v1 --llm-model Qwen2.5-7B-Instruct --max-requests 2000
      coder-index classify photos/ --index pets-index --corpus my-corpus --method xmore --out preds.csv
      coder-index classify /data/images --index in21k --out preds.csv --candidates 64
      coder-index classify /data/images --index in1k --out preds.csv --device cuda --precision bf16 --batch-size 512
      coder-index classify /data/images --index in1k --out preds.csv --decode cpu    # the reference pixels on a GPU
      coder-index classify /shared/images --index /shared/in1k --out preds.csv --engine ray --ray-address auto
      coder-index classify 'laion/{00000..00099}.tar' --index in1k --out preds.csv --save-embeddings laion-emb/
      coder-index classify 'https://host/data/{00000..00099}.tar' --index in1k --out preds.csv
      coder-index classify 's3://bucket/shards/{00000..00999}.tar.gz' --index in1k --out preds.csv \\
          --save-embeddings s3://bucket/emb/
      coder-index classify 'pipe:aws s3 cp --quiet s3://bucket/{00000..00099}.tar -' --index in1k --out preds.csv
      coder-index classify 'hf-data/train-{00000..00003}-of-00004.parquet' --index in1k --out preds.csv
      coder-index classify 'https://host/laion/{00000..00009}.parquet' --image-column jpg --key-column key \\
          --index in1k --out preds.csv
    """
    from coder_index.methods.pair_stage import PairReranker
    from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
    from coder_index.methods.text_index import TextIndex
    from coder_index.pipeline.classify import classify_folder
    from coder_index.pipeline.output import ResultWriter
    from coder_index.pipeline.runrecord import check_writable

    source = _classify_source(inputs, files_from, null_separated, image_column, key_column)
    if save_embeddings is not None:
        from coder_index.core.remote import check_reachable

        check_reachable([save_embeddings])  # before any model loads
    spec = ScorerSpec(top_k=top_k, method=zs_method, rerank=rerank, rerank_chunk=rerank_chunk,
                      adapter=_str(adapter_dir), corpus=_str(corpus_dir), retrieve_k=retrieve_k,
                      candidates=0 if candidates in (None, "auto") else int(candidates), normalizer=xmore_normalizer,
                      retrieval=xmore_retrieval)
    try:
        spec.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_engine_options(engine, ray_address, ray_actors, ray_gpus)
    if ray_index_source and engine != "ray":
        raise click.UsageError("--ray-index-source needs --engine ray")
    if engine == "ray":
        _check_ray_options(spec, llm)
    ResultWriter(out, top_k)   # a wrong extension or an unwritable --out fails before any model loads
    check_writable(out)
    index = TextIndex.open(index_dir, device=device, precision=precision)
    if precision in ("fp16", "bf16") and index.compute_device.type == "cpu":
        raise click.UsageError(f"--precision {precision} is for GPUs; on the CPU the encoders run in fp32 (the "
                               "default): leave --precision out, or pass --device cuda on a machine with a GPU")
    n_classes = len(index.class_names())
    if top_k > n_classes:
        click.echo(f"warning: --top-k {top_k} is more than the index's {n_classes} classes; writing {n_classes}",
                   err=True)
        top_k = n_classes
    index.require_model(model, pretrained)
    spec = replace(spec, top_k=top_k, gap_threshold=resolve_gap_threshold(gap_threshold, index),
                   candidates=_resolve_candidates(candidates, index, spec))
    if spec.method != "coder":  # X-MoRe's normaliser decided once, here: the run records it
        from coder_index.methods.scorer_spec import xmore_normalizer, xmore_retrieval

        spec = replace(spec, normalizer=xmore_normalizer(index, spec), retrieval=xmore_retrieval(index, spec))
        if engine == "ray":
            _check_ray_options(spec, llm)
    if spec.candidates and top_k > spec.candidates:
        click.echo(f"warning: --top-k {top_k} is more than --candidates {spec.candidates}; writing "
                   f"{spec.candidates}", err=True)
        spec = replace(spec, top_k=spec.candidates)
        top_k = spec.candidates
    generator = None
    if rerank and llm["llm_kind"] != "none":
        generator = make_generator(LazyEncoder(index), **llm, prompts=index.recipe.preset)
    scorer = build_scorer(index, spec, generator=generator, llm_model=llm.get("llm_model"), progress=not quiet,
                          note=lambda m: click.echo(m, err=True))
    reranker = getattr(scorer, "reranker", None)
    if not rerank:
        index.images_only()  # only images are encoded from here on: a third of the model is never kept
    from coder_index.pipeline.feed import resolve_decode

    # --decode decided once, by the one rule: where the images are encoded (Ray: the actors' devices)
    decode = resolve_decode(decode, ("cuda" if ray_gpus else "cpu") if engine == "ray" else index.compute_device,
                            released=index.recipe.is_released, probe=engine != "ray")
    run_engine = None
    if engine == "ray":
        from coder_index.engines.ray_engine import RayEngine

        run_engine = RayEngine(index, spec, address=ray_address, actors=ray_actors, batch_size=batch_size,
                               gpus_per_actor=ray_gpus, index_source=ray_index_source, progress=not quiet,
                               decode=decode)
    saver = None
    if save_embeddings is not None:
        from coder_index.pipeline.embeddings_out import EmbeddingSaver

        fp = index.fingerprint
        saver = EmbeddingSaver(save_embeddings, out=out, dim=fp.embed_dim, model=fp.to_dict(), dtype=embeddings_dtype,
                               part_rows=embeddings_part_rows, overwrite=overwrite)
    summary = classify_folder(index, source, out, scorer=scorer, top_k_n=top_k, batch_size=batch_size,
                              workers=workers, threads=threads, progress=not quiet, overwrite=overwrite,
                              engine=run_engine, decode=decode, save_embeddings=saver)
    if isinstance(reranker, PairReranker):
        click.echo(reranker.summary(), err=True)
        if reranker.generator is not None and reranker.generator.llm.usage.requests:
            click.echo(f"LLM: {reranker.generator.llm.usage.summary()}", err=True)
    _print_summary(summary)
    if summary.found == 0 and not summary.already_done and not summary.failed:
        click.echo(f"warning: {summary.what} no image (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                   f"{'; ' + str(summary.other_files) + ' other file(s)' if summary.other_files else ''}"
                   f"{'; ' + str(summary.hidden) + ' hidden' if summary.hidden else ''})", err=True)
    if summary.failed:
        _say_incomplete(summary)
        sys.exit(1 if summary.found == 0 and not summary.already_done else EXIT_INCOMPLETE)
    if strict and (summary.found == 0 or summary.errors):
        sys.exit(1)


def _say_incomplete(summary: Any) -> None:
    """What could not be read, named, and what to do: the other inputs are done, a rerun retries these."""
    shown = "; ".join(f"{what}: {why}" for what, why in summary.failed[:3])
    more = f" (and {len(summary.failed) - 3} more)" if len(summary.failed) > 3 else ""
    if summary.found == 0 and not summary.already_done:
        click.echo(f"error: nothing could be read: {shown}{more}. Listed in {summary.errors_file}; rerun the same "
                   "command to try again", err=True)
        return
    click.echo(f"incomplete: {len(summary.failed)} input(s) could not be read: {shown}{more}. Listed in "
               f"{summary.errors_file} (retry: yes); rerun the same command to try them again (exit status "
               f"{EXIT_INCOMPLETE})", err=True)


def _classify_source(inputs: tuple[str, ...], files_from: str | None, null_separated: bool,
                     image_column: str | None = None, key_column: str | None = None) -> Any:
    """What classify reads (``sources.resolve``: the one place the input's kind is decided)."""
    from coder_index.pipeline.discover import read_file_list
    from coder_index.pipeline.sources.parquet import ParquetOptions
    from coder_index.pipeline.sources.resolve import UsageError, open_source

    if null_separated and not files_from:
        raise click.UsageError("-0/--null applies to --files-from")
    if files_from and files_from != "-":
        _check_file_list(files_from)

    def listed() -> Any:
        if files_from == "-":
            yield from read_file_list(sys.stdin.buffer, null_separated)
        else:
            from coder_index.core.untrusted import open_regular_file

            with open_regular_file(files_from) as f:
                yield from read_file_list(f, null_separated)

    try:
        return open_source(inputs, listed() if files_from else None,
                           parquet=ParquetOptions(image_column=image_column, key_column=key_column))
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None


def _check_file_list(path: str) -> None:
    from coder_index.core.errors import InputFormatError
    from coder_index.core.untrusted import NotARegularFile, open_regular_file

    try:
        open_regular_file(path).close()
    except NotARegularFile:
        raise InputFormatError(f"--files-from {path} is not a regular file (a FIFO, socket, device or directory); "
                               "pipe the list in with --files-from -") from None
    except FileNotFoundError:
        raise InputFormatError(f"--files-from {path} does not exist") from None
    except PermissionError:
        raise InputFormatError(f"--files-from {path} cannot be read (permission denied)") from None


class LazyEncoder:
    """The index's encoder, loaded when first used: refusals and a run with nothing left to do come
    before the model loads (it takes seconds)."""

    def __init__(self, index: Any) -> None:
        self._index = index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index.encoder, name)


def _print_summary(summary) -> None:  # noqa: ANN001 - ClassifySummary
    """This run's work, then what each file holds now: the counts add up across resumed runs."""
    msg = f"classified {summary.classified} images in {summary.seconds:.1f}s"
    if summary.classified:
        msg += f" ({summary.images_per_second:.1f} img/s)"
    msg += f", {summary.errors} unreadable"
    if summary.already_done:
        msg += f"; {summary.already_done} done in earlier runs"
    if summary.retried:
        msg += f"; {summary.retried} input(s) earlier runs could not read tried again"
    if summary.special:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary.special_kinds.items())) or str(summary.special)
        msg += f"; skipped before decoding (listed as unreadable): {kinds}"
    if summary.failed:
        msg += f"; {len(summary.failed)} input(s) could not be read (to retry)"
    if summary.other_files:
        msg += f"; {summary.other_files} non-image file(s) ignored"
    if summary.hidden:
        msg += f"; {summary.hidden} hidden file(s)/folder(s) skipped"
    if summary.rows_in_out or summary.out_exists:
        msg += f". {summary.out} holds {summary.rows_in_out} row(s)"
    elif summary.failed:
        msg += f". No {summary.out} written"
    else:
        msg += f". No {summary.out} written: no image was classified"
    msg += (f", {summary.errors_file} lists {summary.errors_in_file} unreadable file(s)" if summary.errors_in_file
            else "; no unreadable file")
    if summary.embeddings_dir:
        msg += f"; {summary.embeddings_dir} holds the embeddings of {summary.embeddings_saved} row(s)"
        missing = summary.rows_in_out - summary.embeddings_saved
        if missing > 0:
            msg += (f" ({missing} row(s) of earlier runs without --save-embeddings have none: rerun with --overwrite "
                    "to save them all)")
    click.echo(msg, err=True)


def _parse_candidates(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is neither a positive number of classes nor 'auto'")
    return value


def _resolve_candidates(value: str | None, index, spec) -> int:  # noqa: ANN001 - TextIndex, ScorerSpec
    """--candidates M, 'auto' (M = 64 for vocabularies past the dense limits), or unset: dense, with a
    hint when the vocabulary is past those limits."""
    from coder_index.methods.candidates import DEFAULT_CANDIDATES, suggest_candidates

    counts = index.counts()
    n_texts = sum(counts["texts"].values())
    large = suggest_candidates(n_texts, counts["classes"])
    if value == "auto":
        return DEFAULT_CANDIDATES if large and not (spec.adapter or spec.method != "coder") else 0
    if value is None:
        if large and not (spec.adapter or spec.method != "coder"):
            click.echo(f"note: {n_texts:,} texts over {counts['classes']:,} classes: a dense CODER reads "
                       f"every text per image; --candidates {DEFAULT_CANDIDATES} scores each image's "
                       f"{DEFAULT_CANDIDATES} most likely classes exactly and is several times faster "
                       "(see the docs, At scale: Large vocabularies)", err=True)
        return 0
    return spec.candidates


def _check_ray_options(spec, llm: dict[str, Any]) -> None:  # noqa: ANN001 - ScorerSpec
    if spec.method != "coder" and spec.normalizer in ("set", "running"):
        raise click.UsageError(f"--engine ray scores each image on its own: X-MoRe with --xmore-normalizer "
                               f"{spec.normalizer} needs the run's images in one place; use the corpus's normalisers "
                               "(the default) or the local engine")
    if spec.rerank and llm["llm_kind"] != "none":
        raise click.UsageError("--engine ray reranks with the pair texts stored in the index (its workers make no "
                               "LLM requests): add --llm none, or generate the pairs first with a local "
                               "`classify --rerank` run")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
