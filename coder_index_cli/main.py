"""`coder-index`: build text indexes, classify image folders with CODER, explain predictions."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from coder_index import __version__

from .common import (
    GAP_THRESHOLD,
    IMAGE_SUFFIXES,
    check_engine_options,
    engine_options,
    friendly_errors,
    model_options,
    parallel_options,
    print_json,
    resolve_gap_threshold,
    setup_logging,
)
from .corpus_command import register as register_corpus
from .eval_command import register as register_eval_command
from .fewshot_command import register as register_fewshot
from .reproduce_command import register as register_reproduce
from .serve_command import register as register_serve
from .textgen_commands import (
    llm_client_options,
    llm_options,
    make_generator,
    parse_kinds,
    register,
    report_generation,
)


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
      coder-index serve my-index --predictions predictions.csv --images-root .
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


@cli.command()
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", "classes_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line, in label order.")
@click.option("--dataset", default=None,
              help="Use this dataset's prompt templates (e.g. imagenet, oxford_pets, eurosat, dtd, food101, or a "
                   "released key such as ImageNet, oxford-pet, DTD, CUB200).")
@click.option("--preset", type=click.Choice(["default", "cvpr24"]), default=None,
              help="Text recipe: coder-index's own templates (default), or exactly the texts of the authors' released "
                   "CODER code (cvpr24; needs --dataset). An existing index keeps its own.")
@click.option("--task", type=click.Choice(["zero-shot", "few-shot"]), default=None,
              help="With --preset cvpr24: the released wording of attribute/analogous texts differs per task "
                   "[default: zero-shot].")
@click.option("--expert-knowledge", "expert_knowledge", default=None, type=click.Path(exists=True, file_okay=False),
              help="The authors' released expert_knowledge/ folder: imports attributes, analogous classes, synonyms "
                   "and one-to-one features of --dataset (with --preset cvpr24). Its .pkl files are read without "
                   "running any code.")
@click.option("--descriptors", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON {class: [descriptor, ...]} stored as attribute texts '{class} which has {descriptor}'. "
                   "Repeatable.")
@click.option("--knowledge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Knowledge file from `coder-index generate` (or descriptor / CuPL JSON): all its kinds go "
                   "into the index. Repeatable.")
@click.option("--generate", "generate_kinds", default=None, metavar="KINDS",
              help="Generate these kinds on the fly (e.g. attribute,analogous,synonym) with the LLM options below.")
@llm_options
@click.option("--model", default=None, help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME "
                                            "[default: ViT-B-32, or the index's model when adding to one].")
@model_options
@engine_options("texts are encoded")
@click.option("--overwrite", is_flag=True, help="Delete the index already in INDEX_DIR first (damaged or not; only "
                                               "an index's own files are deleted) and build afresh.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def build(index_dir: Path, classes_file: str, dataset: str | None, preset: str | None, task: str | None,
          expert_knowledge: str | None, descriptors: tuple[str, ...], knowledge: tuple[str, ...],
          generate_kinds: str | None, model: str | None, pretrained: str | None, device: str | None,
          engine: str, ray_address: str | None, ray_actors: int | None, ray_gpus: float, overwrite: bool,
          as_json: bool, quiet: bool, dry_run: bool, **llm: Any) -> None:
    """Create INDEX_DIR (or add to it) from a class list and attribute files.

    Name texts come from the dataset's templates; descriptor files add attribute texts; knowledge
    files (from `coder-index generate`) add attribute, analogous and synonym texts; --generate makes
    them on the fly. Running build again with more files adds only what is new.

    \b
    Examples:
      coder-index build pets-index --classes oxford-pet.txt --dataset oxford_pets \\
          --descriptors descriptors_pets.json --model ViT-B-32 --pretrained openai
      coder-index build in1k --classes ImageNet.txt --descriptors descriptors_imagenet.json \\
          --model ViT-L-14 --pretrained /models/vit-l-14.bin
      coder-index build tiny --classes classes.txt --model local-dir:/models/my-clip
      coder-index build in1k --classes ImageNet.txt --knowledge imagenet-knowledge.json
      coder-index build in1k --classes ImageNet.txt --generate attribute,analogous,synonym --llm none
      coder-index build in1k-cvpr24 --classes ImageNet.txt --dataset ImageNet --preset cvpr24 \\
          --expert-knowledge expert_knowledge/ --model ViT-B-32 --pretrained openai
      coder-index build in21k --classes in21k.txt --knowledge in21k-knowledge.json --engine ray --ray-address auto
      coder-index build pets-index --overwrite --classes oxford-pet.txt --dataset oxford_pets \\
          --descriptors descriptors_pets.json --model ViT-B-32 --pretrained openai   # a damaged index, afresh
    """
    from coder_index.pipeline.build import build_index
    from coder_index.textgen.knowledge import load_knowledge

    check_engine_options(engine, ray_address, ray_actors, ray_gpus)
    encode_with = None
    if engine == "ray":
        from coder_index.engines.ray_text import RayTextEncoder

        def encode_with(encoder):  # noqa: ANN001, ANN202 - the model is known once build_index loads it
            return RayTextEncoder(encoder, address=ray_address, actors=ray_actors, gpus_per_actor=ray_gpus,
                                  progress=not quiet)

    loaded = [load_knowledge(p) for p in knowledge]
    generate = None
    if generate_kinds:
        kinds = parse_kinds(generate_kinds)

        def generate(encoder, classes, recipe):  # noqa: ANN001, ANN202 - callback of build_index
            gen = make_generator(encoder, **llm, prompts=recipe.preset)
            if dry_run:
                d = gen.dry_run(classes, kinds)
                raise click.ClickException(f"dry run: would send {d.prompts} prompt(s) ({d.cached} cached); "
                                           "nothing was built")
            k, stats = gen.generate(classes, kinds, progress=not quiet)
            report_generation(stats)
            return k

    report = build_index(index_dir, classes_file, model=model, pretrained=pretrained, dataset=dataset, preset=preset,
                         task=task, descriptors=list(descriptors), device=device, knowledge=loaded,
                         expert_knowledge=expert_knowledge, generate=generate, progress=not quiet,
                         encode_with=encode_with, overwrite=overwrite)
    if as_json:
        print_json(report.__dict__)
        return
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    added = ", ".join(f"{v} {k}" for k, v in report.added.items())
    click.echo(f"{index_dir}: {report.classes} classes, {report.recipe}; added {added} texts; "
               f"{report.duplicates} already present")


@cli.command()
@click.argument("inputs", nargs=-1, metavar="FOLDER | IMAGE... | SHARD.tar...", type=click.Path(path_type=Path))
@click.option("--files-from", "files_from", default=None, metavar="LIST",
              help="Classify the image files LIST names, one path per line ('-': standard input), relative to the "
                   "working directory; rows name them as listed.")
@click.option("-0", "--null", "null_separated", is_flag=True,
              help="With --files-from: paths are separated by NUL bytes (find -print0), for names holding newlines.")
@click.option("--save-embeddings", "save_embeddings", default=None, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Also keep the image embeddings in clip-retrieval's layout (DIR/img_emb/img_emb_N.npy + "
                   "DIR/metadata/metadata_N.parquet with image_path, caption, key, shard, json), written as the run "
                   "goes and resumed with it; `coder-index corpus build --embeddings DIR` reads it back.")
@click.option("--embeddings-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Float type of --save-embeddings (recorded in DIR/embeddings.json).")
@click.option("--embeddings-part-rows", default=100_000, show_default=True, type=click.IntRange(1),
              help="Rows per img_emb_N.npy of --save-embeddings (a part closes at the first batch that reaches it).")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The text index to classify against.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Predictions file: .csv or .jsonl. Rerunning with the same file resumes.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Classes per row.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images per batch.")
@parallel_options
@click.option("--model", default=None,
              help="Refuse to run unless the index was built with this model (default: the index's model).")
@model_options
@click.option("--rerank", is_flag=True, help="Stage 2 (CODER*): rerank each image's top-5 with one-to-one pair "
                                              "texts, generating missing pairs with the LLM options below.")
@click.option("--gap-threshold", default=None, type=GAP_THRESHOLD,
              help="Rerank only images whose softmax top-1 minus top-2 is below this (default: all); 'preset' takes "
                   "the released code's threshold for the index's dataset.")
@click.option("--rerank-chunk", default=2048, show_default=True, type=click.IntRange(1),
              help="Images per rerank step (their missing pairs are generated together).")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Few-shot: classify with this CODER-Adapter (from `coder-index fewshot fit`).")
@click.option("--corpus", "corpus_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="X-MoRe: an image-text corpus (from `coder-index corpus build`) for --method xmore/coder+xmore.")
@click.option("--method", "zs_method", type=click.Choice(["coder", "xmore", "coder+xmore"]), default="coder",
              show_default=True, help="Zero-shot method; xmore and coder+xmore need --corpus.")
@click.option("--retrieve-k", default=16, show_default=True, type=click.IntRange(1),
              help="Corpus images retrieved per image for X-MoRe.")
@click.option("--candidates", default=None, metavar="M|auto",
              type=click.STRING, callback=lambda _c, _p, v: _parse_candidates(v),
              help="Large vocabularies: stage 1 on each image's M most likely classes (found by a search over one "
                   "vector per class), scored exactly from their texts; 'auto' = 64 past 200,000 texts or 20,000 "
                   "classes. Scores are then the softmax over the M. [default: dense]")
@engine_options("images are decoded, encoded and scored")
@click.option("--ray-index-source", default=None, metavar="PATH|URI",
              help="With --engine ray: where workers read the index (a path every node mounts, or a URI such as "
                   "s3://bucket/in1k that each node copies once) [default: --index as a path].")
@click.option("--overwrite", is_flag=True, help="Start afresh: delete OUT, its errors file and its run record first "
                                               "(otherwise a rerun resumes, and other settings are refused).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when FOLDER holds no image, or some file could not "
                                            "be read (the rows of the others are written all the same).")
@llm_client_options(none_help="no LLM: --rerank uses the pair texts already in the index, missing pairs count as ties")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Encoder precision on a GPU (auto: fp16 on CUDA, fp32 on the CPU). CODER, the rerank and the "
                   "adapter always compute in float32, without TF32.")
@click.option("--decode", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "gpu"]),
              help="cpu: open_clip's reference preprocessing (Pillow in the workers), byte for byte; gpu: JPEGs "
                   "decoded in batches where the encoder runs (nvJPEG on a GPU, libjpeg-turbo on the CPU), resized "
                   "and normalised there, other files the reference way; auto: gpu on a CUDA device, else cpu "
                   "(always cpu for a --preset cvpr24 index). See README: Decoding.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def classify(inputs: tuple[Path, ...], files_from: str | None, null_separated: bool, save_embeddings: Path | None,
             embeddings_dtype: str, embeddings_part_rows: int, index_dir: str, out: Path,
             top_k: int, batch_size: int, workers: int | None,
             threads: int | None, model: str | None, pretrained: str | None, device: str | None, rerank: bool,
             gap_threshold: float | None, rerank_chunk: int, adapter_dir: str | None, corpus_dir: str | None,
             zs_method: str, retrieve_k: int, candidates: str | None, engine: str, ray_address: str | None,
             ray_actors: int | None, ray_gpus: float, ray_index_source: str | None, overwrite: bool, strict: bool,
             precision: str, decode: str, quiet: bool, **llm: Any) -> None:
    """Classify every image under FOLDER (recursively), or the IMAGE files named (and those of
    --files-from), or the samples of webdataset tar shards (SHARD.tar files, a folder of them, or a
    brace pattern such as 'data/{00000..00099}.tar', read in place), with CODER zero-shot.

    Writes one row per image to --out (path as FOLDER/relative path, as the file was named, or
    SHARD.tar/KEY for a shard's sample; label, score = softmax probability, method, then the next
    top-k classes). Files that cannot be decoded, and FIFOs,
    sockets or devices named like images, are listed with the reason in OUT.errors.csv; hidden
    files are not classified (counted in the summary). Interrupted runs resume: rerun the same
    command. OUT.run.json records the index, model and settings: a rerun with others is refused
    (--overwrite starts afresh). A second run on the same OUT is refused while the first runs.

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
    """
    from coder_index.methods.pair_stage import PairReranker
    from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
    from coder_index.methods.text_index import TextIndex
    from coder_index.pipeline.classify import classify_folder
    from coder_index.pipeline.output import ResultWriter
    from coder_index.pipeline.runrecord import check_writable

    source = _classify_source(inputs, files_from, null_separated)
    spec = ScorerSpec(top_k=top_k, method=zs_method, rerank=rerank, rerank_chunk=rerank_chunk, adapter=adapter_dir,
                      corpus=corpus_dir, retrieve_k=retrieve_k,
                      candidates=0 if candidates in (None, "auto") else int(candidates))
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
    _check_requested_model(index, model, pretrained, device)
    spec = replace(spec, top_k=top_k, gap_threshold=resolve_gap_threshold(gap_threshold, index),
                   candidates=_resolve_candidates(candidates, index, spec))
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
    if decode == "auto" and index.recipe.is_released:
        decode = "cpu"  # the cvpr24 preset reproduces the released numbers: the reference preprocessing
    run_engine = None
    if engine == "ray":
        from coder_index.engines.ray_engine import RayEngine

        if decode == "auto":  # where the actors encode decides, not this driver's device
            decode = "gpu" if ray_gpus else "cpu"
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
    if summary.found == 0:
        folder = inputs[0] if isinstance(source, Path) else "the listed files" if not hasattr(source, "shards") \
            else "the shards"
        click.echo(f"warning: {folder} holds no image (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                   f"{'; ' + str(summary.other_files) + ' other file(s)' if summary.other_files else ''}"
                   f"{'; ' + str(summary.hidden) + ' hidden' if summary.hidden else ''})", err=True)
    if strict and (summary.found == 0 or summary.errors):
        sys.exit(1)


def _classify_source(inputs: tuple[Path, ...], files_from: str | None, null_separated: bool) -> Any:
    """One folder, image files (arguments and/or --files-from), or webdataset shards: what
    classify_folder reads."""
    from coder_index.pipeline.discover import ListedFiles, read_file_list
    from coder_index.pipeline.shards import ShardFiles, expand_shards, is_shard_spec

    shard_args = [p for p in inputs if is_shard_spec(str(p))]
    if shard_args:
        others = [p for p in inputs if p not in shard_args]
        if others or files_from:
            what = others[0] if others else "--files-from"
            raise click.UsageError(f"{what} is not a shard: classify shards (SHARD.tar files, a folder of them, or a "
                                   "brace pattern), a folder, or image files, in one run")
        shards = expand_shards(str(p) for p in shard_args)
        missing = [s for s in shards if not os.path.exists(s)]
        if len(missing) == len(shards):
            raise click.UsageError(f"no such shard: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
        return ShardFiles(shards)  # a missing shard among others is listed in the errors file
    absent = [p for p in inputs if not os.path.lexists(p)]
    if absent:
        raise click.UsageError(f"{absent[0]}: no such file or folder")
    folders = [p for p in inputs if p.is_dir()]
    if folders and (len(inputs) > 1 or files_from):
        raise click.UsageError(f"{folders[0]} is a folder: classify one folder, or image files (arguments and/or "
                               "--files-from), in one run")
    if folders:
        return folders[0]
    if not inputs and not files_from:
        raise click.UsageError("name a FOLDER, image files, or --files-from LIST")
    if null_separated and not files_from:
        raise click.UsageError("-0/--null applies to --files-from")

    def paths() -> Any:
        yield from (str(p) for p in inputs)
        if files_from == "-":
            yield from read_file_list(sys.stdin.buffer, null_separated)
        elif files_from:
            from coder_index.core.untrusted import open_regular_file

            with open_regular_file(files_from) as f:
                yield from read_file_list(f, null_separated)

    if files_from and files_from != "-":
        _check_file_list(files_from)
    return ListedFiles(paths())


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
    msg = (f"classified {summary.classified} images in {summary.seconds:.1f}s "
           f"({summary.images_per_second:.1f} img/s), {summary.errors} unreadable")
    if summary.already_done:
        msg += f"; {summary.already_done} done in earlier runs"
    if summary.special:
        msg += (f"; {summary.special} FIFO/socket/device/broken link named like an image skipped (listed as "
                "unreadable)")
    if summary.other_files:
        msg += f"; {summary.other_files} non-image file(s) ignored"
    if summary.hidden:
        msg += f"; {summary.hidden} hidden file(s)/folder(s) skipped"
    msg += f". {summary.out} holds {summary.rows_in_out} row(s)"
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
                       "(see README: Large vocabularies)", err=True)
        return 0
    return spec.candidates


def _check_ray_options(spec, llm: dict[str, Any]) -> None:  # noqa: ANN001 - ScorerSpec
    if spec.method != "coder":
        raise click.UsageError("--engine ray runs coder, --rerank and --adapter; X-MoRe needs every embedding of "
                               "the folder first: run it with the local engine")
    if spec.rerank and llm["llm_kind"] != "none":
        raise click.UsageError("--engine ray reranks with the pair texts stored in the index (its workers make no "
                               "LLM requests): add --llm none, or generate the pairs first with a local "
                               "`classify --rerank` run")


def _check_requested_model(index, model: str | None, pretrained: str | None, device: str | None) -> None:
    """--model/--pretrained name the model the caller expects; a different one is refused.

    A model that can be loaded locally (local-dir:, or a checkpoint file) is compared by its weights,
    so a moved model directory is still accepted; a different hub name is refused without a download.
    """
    from coder_index.core.errors import ModelMismatchError
    from coder_index.model.encoder import ClipEncoder

    fp = index.fingerprint
    if model is None and pretrained is None:
        return
    if (model or fp.model) == fp.model and (pretrained is None or pretrained == fp.pretrained):
        return
    local = (model or "").startswith("local-dir:") or (pretrained is not None and Path(pretrained).is_file())
    if not local:
        asked = f"{model or fp.model}" + (f" (pretrained={pretrained})" if pretrained else "")
        raise ModelMismatchError(
            f"This index was built with CLIP model {fp.describe()}, not {asked}. Embeddings of different "
            f"models are not comparable: omit --model to use the index's model, or build a new index "
            f"with --model {model or fp.model}.")
    encoder = ClipEncoder(model or fp.model, pretrained, device=device)
    index.check_model(encoder.fingerprint)  # same weights under another name or path is fine
    index._encoder = encoder


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The text index whose texts explain the prediction.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Nearest texts to show.")
@click.option("--rerank", is_flag=True, help="Explain the CODER* prediction (the one-to-one rerank with the pair texts "
                                              "stored in the index, as `classify --rerank --llm none`).")
@click.option("--gap-threshold", default=None, type=GAP_THRESHOLD,
              help="With --rerank: as in classify (rerank only images whose top-1 minus top-2 is below this).")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Explain the prediction of this CODER-Adapter (from `coder-index fewshot fit`).")
@click.option("--corpus", "corpus_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="X-MoRe: the image-text corpus for --method xmore/coder+xmore.")
@click.option("--method", "zs_method", type=click.Choice(["coder", "xmore", "coder+xmore"]), default="coder",
              show_default=True, help="Zero-shot method whose prediction is explained (X-MoRe's normalisers are "
                                      "taken over the explained images, as `classify` of a folder holding them).")
@click.option("--retrieve-k", default=16, show_default=True, type=click.IntRange(1),
              help="Corpus images retrieved per image for X-MoRe.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--device", default=None, help="cuda, mps or cpu.")
@friendly_errors
def explain(images: tuple[str, ...], index_dir: str, k: int, rerank: bool, gap_threshold: float | None,
            adapter_dir: str | None, corpus_dir: str | None, zs_method: str, retrieve_k: int, as_json: bool,
            device: str | None) -> None:
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

    spec = ScorerSpec(top_k=5, method=zs_method, rerank=rerank, adapter=adapter_dir, corpus=corpus_dir,
                      retrieve_k=retrieve_k)
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


@cli.command()
@click.argument("query")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The text index to search.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Texts to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--device", default=None, help="cuda, mps or cpu.")
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


@cli.command()
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


@cli.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Fix what can be fixed without losing anything: rewrite the manifest "
                                            "from meta.sqlite, finish or discard interrupted writes, remove stale "
                                            "temp files.")
@click.option("--no-model", "no_model", is_flag=True, help="Skip loading the model (its fingerprint and a sample of "
                                                          "stored vectors re-encoded from their texts).")
@click.option("--device", default=None, help="cuda, mps or cpu (for the model check).")
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


register(cli)
register_eval_command(cli)
register_fewshot(cli)
register_corpus(cli)
register_reproduce(cli)
register_serve(cli)

if __name__ == "__main__":
    cli()
