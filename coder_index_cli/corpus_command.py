"""`coder-index corpus build|info|search`: the external image-text corpus of X-MoRe."""

from __future__ import annotations

from pathlib import Path

import click

from .common import friendly_errors, print_json, torch_threads_if
from .options import ENGINE, PARALLEL, check_engine_options, options


def register(cli: click.Group) -> None:
    @cli.group()
    def corpus() -> None:
        """An image-text corpus for retrieval-augmented zero-shot (X-MoRe).

        \b
        Examples:
          coder-index corpus build my-corpus --images photos/ --captions captions.csv --index pets-index
          coder-index corpus info my-corpus
          coder-index corpus search my-corpus cat.jpg -k 5
          coder-index classify photos/ --index pets-index --corpus my-corpus --method xmore --out preds.csv
        """

    @corpus.command("build")
    @click.argument("corpus_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--images", multiple=True, metavar="DIR|SHARDS",
                  help="Images with captions: a folder (with a --captions CSV, or img2dataset's sidecar .txt files), "
                       "or webdataset shards (.tar/.tar.gz files, a folder or brace pattern of them, URLs, "
                       "pipe:COMMAND) whose KEY.txt members are the captions. Repeatable for shards.")
    @click.option("--captions", type=click.Path(exists=True, dir_okay=False), help="CSV path,caption for --images.")
    @click.option("--embeddings", metavar="DIR|URL",
                  help="Precomputed embeddings: img_emb/img_emb_*.npy + metadata/metadata_*.parquet (caption column), "
                       "as clip-retrieval and LAION publish them; a folder, or with --reference an s3:// or gs:// URL.")
    @click.option("--reference", is_flag=True,
                  help="Refer to --embeddings where they are instead of copying them: nothing is copied or encoded "
                       "now; the index is memory-mapped, captions are read and encoded for the rows retrieved. For "
                       "LAION-size corpora.")
    @click.option("--index-file", type=click.Path(exists=True, dir_okay=False), metavar="KNN_INDEX",
                  help="With --reference: the FAISS index you have over --embeddings (autofaiss's knn.index, or any "
                       "inner-product index whose ids are the rows); default: one built with --index-factory.")
    @click.option("--index-factory", default="Flat", show_default=True,
                  help="FAISS factory string, e.g. Flat, IVF4096,PQ64, HNSW32 (trained on a sample).")
    @click.option("--nprobe", default=32, show_default=True, type=click.IntRange(1),
                  help="IVF indexes: inverted lists searched per query (more: better recall, slower); kept with the "
                       "corpus. With --index-file, given only: that index's own setting is kept otherwise.")
    @click.option("--train-size", default=100_000, show_default=True, type=click.IntRange(1),
                  help="Rows sampled to train IVF/PQ indexes.")
    @click.option("--use-text-embeddings", is_flag=True,
                  help="Take the precomputed text_emb/text_emb_*.npy shards as caption embeddings instead of "
                       "encoding 'a photo of a {caption}' (raw captions: an approximation, far faster).")
    @options("new_model", "model_index", "pretrained", "device")
    @options("batch_size")
    @options(*PARALLEL, "decode", *ENGINE)
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
    @friendly_errors
    def build(corpus_dir: Path, images: tuple[str, ...], captions: str | None, embeddings: str | None,
              reference: bool, index_file: str | None, index_factory: str, nprobe: int, train_size: int,
              use_text_embeddings: bool, model: str | None, index_dir: str | None,
              pretrained: str | None, device: str | None, batch_size: int, workers: int | None, threads: int | None,
              decode: str, engine: str, ray_address: str | None, ray_actors: int | None, ray_gpus: float,
              quiet: bool) -> None:
        """Create CORPUS_DIR from a captioned image folder or from LAION-layout embeddings.

        Captions are encoded once, here, as "a photo of a {caption}". With --reference nothing is
        copied or encoded: the corpus refers to the embedding folder (and --index-file) where they
        are, for LAION-size corpora. Every input is validated first, and the corpus is built aside:
        a failed ingest leaves nothing behind.

        \b
        Examples:
          coder-index corpus build my-corpus --images photos/ --captions captions.csv --index pets-index
          coder-index corpus build cc-corpus --images 'https://host/cc/{00000..00099}.tar' --index pets-index
          coder-index corpus build laion-sub --embeddings laion/ --index-factory IVF4096,PQ64 \\
              --model ViT-B-32 --pretrained openai
          coder-index corpus build laion-400m --embeddings /shared/laion/ --index-factory IVF65536,PQ64 \\
              --index in1k --engine ray --ray-address auto
          coder-index corpus build laion-ref --embeddings /data/laion400m/ --reference \\
              --index-file /data/laion400m/knn.index --index in1k
        """
        from coder_index.core.atomic import check_writable
        from coder_index.methods.text_index import TextIndex
        from coder_index.model.encoder import ClipEncoder
        from coder_index.pipeline.ingest_corpus import ingest_folder, ingest_laion
        from coder_index.pipeline.sources.resolve import input_kind

        shard_specs = [i for i in images if input_kind(i) in ("shards", "remote-folder")]
        if shard_specs and len(shard_specs) != len(images):
            raise click.UsageError("--images takes one folder, or shards (one or more): not both")
        if len(images) > 1 and not shard_specs:
            raise click.UsageError("--images takes one folder (or several shards)")
        if shard_specs and captions:
            raise click.UsageError("--captions is for a folder of images; shards carry their captions (KEY.txt)")
        if not shard_specs and images and not Path(images[0]).is_dir():
            raise click.UsageError(f"--images {images[0]}: no such folder (or not shards)")
        if bool(images) == bool(embeddings):
            raise click.UsageError("give exactly one of --images DIR or --embeddings DIR")
        if (reference or index_file) and not embeddings:
            raise click.UsageError("--reference and --index-file refer to an --embeddings folder")
        if index_file and not reference:
            raise click.UsageError("--index-file is for a corpus by reference: add --reference")
        if reference and engine == "ray":
            raise click.UsageError("--reference encodes nothing at build time: --engine ray has nothing to do")
        if index_file and _given("index_factory"):
            raise click.UsageError("--index-file is the index: --index-factory builds one instead; give one of them")
        from coder_index.core.remote import is_remote

        if embeddings and not is_remote(embeddings) and not Path(embeddings).is_dir():
            raise click.UsageError(f"--embeddings {embeddings}: no such folder")
        if embeddings and is_remote(embeddings) and not reference:
            raise click.UsageError("--embeddings URL: a corpus refers to remote embeddings (add --reference); "
                                   "to copy them, download the folder first")
        check_engine_options(engine, ray_address, ray_actors, ray_gpus)
        if engine == "ray" and (images or use_text_embeddings):
            raise click.UsageError("--engine ray encodes the captions of --embeddings shards; --images and "
                                   "--use-text-embeddings run locally")
        check_writable(corpus_dir, "corpus directory", is_dir=True)
        if corpus_dir.exists() and any(corpus_dir.iterdir()):
            raise click.ClickException(f"{corpus_dir} exists and is not empty; choose a new corpus directory")
        if shard_specs:
            from coder_index.pipeline.sources.resolve import UsageError, open_source

            try:
                shard_list = open_source(shard_specs).specs  # a typo or a missing driver: before any model loads
            except UsageError as exc:
                raise click.UsageError(str(exc)) from None
        encoder = TextIndex.open(index_dir, device=device).encoder if index_dir else \
            ClipEncoder(model or "ViT-B-32", pretrained, device=device)
        with torch_threads_if(threads):
            if reference:
                from coder_index.stores.corpus_reference import build_reference_corpus

                m = build_reference_corpus(corpus_dir, encoder.fingerprint, encoder.embed_dim, embeddings,
                                           index_file=index_file, factory=index_factory, train_size=train_size,
                                           nprobe=nprobe if index_file is None or _given("nprobe") else None,
                                           use_text_embeddings=use_text_embeddings, progress=not quiet)
            elif shard_specs:
                from coder_index.pipeline.ingest_corpus import ingest_shards

                m = ingest_shards(corpus_dir, encoder, shard_list, factory=index_factory, nprobe=nprobe,
                                  batch_size=batch_size, workers=workers, threads=threads, progress=not quiet,
                                  decode=decode)
                if m.get("uncaptioned"):
                    click.echo(f"{m['uncaptioned']} image(s) without a caption (no KEY.txt) left out", err=True)
            elif images:
                m = ingest_folder(corpus_dir, encoder, images[0], captions, factory=index_factory, nprobe=nprobe,
                                  batch_size=batch_size, workers=workers, threads=threads, progress=not quiet,
                                  decode=decode)
            elif engine == "ray":
                from coder_index.engines.ray_text import RayTextEncoder

                with RayTextEncoder(encoder, address=ray_address, actors=ray_actors, gpus_per_actor=ray_gpus) as enc:
                    m = ingest_laion(corpus_dir, encoder, embeddings, factory=index_factory, nprobe=nprobe,
                                     train_size=train_size, progress=not quiet, encode=enc)
            else:
                m = ingest_laion(corpus_dir, encoder, embeddings, factory=index_factory, nprobe=nprobe,
                                 train_size=train_size, progress=not quiet, use_text_embeddings=use_text_embeddings)
        for path, reason in m.get("skipped", []):
            click.echo(f"skipped {path}: {reason}", err=True)
        how = f"by reference to {m['sources']['embeddings']}, " if m.get("kind") == "reference" else ""
        click.echo(f"{corpus_dir}: {m['rows']} rows ({how}{m['factory']}) in {m['ingest_seconds']:.1f}s"
                   + (f"; {len(m['skipped'])} unreadable image(s) skipped" if m.get("skipped") else ""))

    @corpus.command("info")
    @click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
    @friendly_errors
    def info(corpus_dir: str, as_json: bool) -> None:
        """Show a corpus's manifest.

        \b
        Examples:
          coder-index corpus info my-corpus
        """
        from coder_index.stores.corpus import Corpus

        c = Corpus(corpus_dir)  # checks what a corpus by reference refers to
        if as_json:
            print_json(c.manifest)
            return
        m = c.manifest
        model = m["model"]
        tag = f", pretrained={model['pretrained']}" if model.get("pretrained") else ""
        click.echo(f"corpus:     {corpus_dir} (created {m.get('created_at', '-')})")
        click.echo(f"rows:       {m['rows']}")
        click.echo(f"index:      FAISS {m['factory']}, width {m['dim']}"
                   + (f" ({m['index']['path']}, memory-mapped)" if m.get("kind") == "reference" else ""))
        if m.get("kind") == "reference":
            click.echo(f"refers to:  {m['embeddings']['root']} ({len(m['embeddings']['shards'])} shards; "
                       "nothing copied)")
        click.echo(f"model:      {model['model']}{tag} (weights sha256 {model['weights_sha256'][:12]}…)")
        click.echo(f"captions:   embedded as {m.get('caption_template', 'a photo of a {caption}')!r}")
        for k, v in (m.get("sources") or {}).items():
            click.echo(f"source:     {k} = {v}")

    @corpus.command("search")
    @click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
    @click.argument("image", type=click.Path(exists=True, dir_okay=False))
    @click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1),
                  help="Nearest corpus images to show.")
    @click.option("--model", default=None, help="Default: the corpus's model.")
    @options("pretrained", "device")
    @click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
    @friendly_errors
    def search(corpus_dir: str, image: str, k: int, model: str | None, pretrained: str | None, device: str | None,
               as_json: bool) -> None:
        """The captions of the corpus images nearest to IMAGE.

        \b
        Examples:
          coder-index corpus search my-corpus cat.jpg -k 5
        """
        from coder_index.core.decode import load_image
        from coder_index.model.encoder import ClipEncoder
        from coder_index.stores.corpus import Corpus

        c = Corpus(corpus_dir)
        mm = c.manifest["model"]
        enc = ClipEncoder(model or mm["model"], pretrained or mm.get("pretrained"), device=device)
        c.check_model(enc.fingerprint)
        sims, ids = c.search(enc.encode_images([load_image(image)]), k)
        rows = c.rows(ids[0].tolist())
        hits = [{"cosine": float(s), **rows[int(i)]} for s, i in zip(sims[0], ids[0], strict=True) if i >= 0]
        if as_json:
            print_json(hits)
            return
        for h in hits:
            where = " ".join(f"{k}={h[k]}" for k in ("url", "key", "image_path") if k in h) or h.get("source", "")
            click.echo(f"{h['cosine']:8.4f}  {h['caption']}  [{where}]")


def _given(name: str) -> bool:
    """Whether the option ``name`` was given (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"
