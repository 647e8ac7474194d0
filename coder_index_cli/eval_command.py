"""`coder-index eval`: reproduce the paper's tables on labelled data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from coder_index.core.choices import RERANK_METHODS

from .common import EXIT_INCOMPLETE, friendly_errors, resolve_gap_threshold
from .options import LLM_CLIENT, MODEL, PARALLEL, PARQUET, options
from .textgen_commands import make_generator

GATED_DEFAULT = 0.3  # the gate of the coder*-gated row when --gap-threshold is not given


def _check_llm_key(llm: dict[str, Any], wanted: list[str]) -> None:
    from coder_index.textgen.llm import LLMClient, LLMConfig, LLMError

    client = LLMClient(LLMConfig(model=llm["llm_model"], base_url=llm["base_url"], api_key_env=llm["api_key_env"]),
                       cache=_NoCache())
    try:
        client.check_credentials()
    except LLMError as exc:
        others = ",".join(m for m in wanted if m not in RERANK_METHODS) or "clip,vcd,coder"
        raise click.ClickException(
            f"{exc}. The coder* rows generate one-to-one texts with an LLM: evaluate them from the pair texts "
            f"already in the index with --llm none, or leave them out with --methods {others}") from None


class _NoCache:
    """The key check needs no answer cache."""


def register(cli: click.Group) -> None:
    from coder_index.core.choices import ALL_METHODS, PROMPT_CHOICES

    @cli.command("eval")
    @click.argument("data", metavar="DATA")
    @options("index")
    @click.option("--methods", default=",".join(ALL_METHODS), show_default=True,
                  help="Comma-separated methods: clip, vcd, coder, the ablations P, P+Att, P+Att+Ana, "
                       "P+Att+Ana+Syn, coder* (rerank) and coder*-gated; with --adapter also tip-adapter and "
                       "coder-adapter.")
    @click.option("--out", "out_dir", default="eval-report", show_default=True, type=click.Path(file_okay=False),
                  help="Folder for report.md, report.json and tsne.png.")
    @click.option("--mapping", type=click.Path(exists=True, dir_okay=False),
                  help="CSV label,class or JSON {label: class} when folder/label names differ from the classes.")
    @options("gap_threshold")
    @click.option("--prompts", type=click.Choice(PROMPT_CHOICES), default="auto", show_default=True,
                  help="Prompts of the clip row (and of the few-shot/X-MoRe zero-shot weights): auto = CLIP's "
                       "published list for the index's dataset (the released few-shot list for a cvpr24 few-shot "
                       "index); clip; names = the index's name texts; cvpr24 = the released few-shot list.")
    @click.option("--report-format", "report_formats", multiple=True, type=click.Choice(["clip_benchmark"]),
                  help="Also write CLIP_benchmark's result JSON (metrics.acc1, acc5, mean_per_class_recall).")
    @options("batch_size")
    @options(*PARALLEL, "decode")
    @click.option("--embedding-cache", type=click.Path(dir_okay=False),
                  help="Image embedding cache [default: ~/.cache/coder-index/image-embeddings.sqlite].")
    @click.option("--tsne-samples", default=1000, show_default=True, type=click.IntRange(0),
                  help="Images in the t-SNE figure (0: no figure).")
    @options("adapter", "corpus", "retrieve_k", "xmore_normalizer", "xmore_retrieval", *MODEL, *LLM_CLIENT, *PARQUET,
             "label_column")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    @friendly_errors
    def eval_cmd(data: str, index_dir: str, methods: str, out_dir: str, mapping: str | None,
                 gap_threshold: float | str | None, batch_size: int, workers: int | None, threads: int | None,
                 decode: str, embedding_cache: str | None, tsne_samples: int, adapter_dir: Path | None,
                 corpus_dir: Path | None, retrieve_k: int, xmore_normalizer: str | None,
                 xmore_retrieval: str | None, model: str | None,
                 pretrained: str | None,
                 device: str | None, quiet: bool, prompts: str, report_formats: tuple[str, ...],
                 image_column: str | None, key_column: str | None, label_column: str | None, **llm: Any) -> None:
        """Accuracy of CLIP, VCD, CODER, CODER* and the text-kind ablations on labelled DATA.

        DATA is a folder with one subfolder per class (names matched to the index's classes;
        --mapping when they differ), such a folder in an object store (s3://bucket/test/, gs://...),
        a CSV of path,label (paths relative to the CSV, or image URLs), labelled webdataset shards
        (KEY.cls holds the class id, in the index's class order, as webdataset and CLIP_benchmark
        write it, or a class name; local, by URL or a brace pattern), or parquet files with a label
        column (Hugging Face datasets' ClassLabel ids are read as their names). Image embeddings of
        local files are computed once and cached, so rerunning with other methods or texts does not
        re-encode. What could not be read (a missing file or shard, a 404) is left out of the report,
        named, and the command exits with status 3.

        \b
        Examples:
          coder-index eval cifar10-test/ --index cifar-index --out cifar-report --llm none   # offline
          OPENAI_API_KEY=... coder-index eval labels.csv --index in1k --methods clip,coder,coder* \\
              --llm-model gpt-4o-mini                  # coder* generates missing pair texts with the LLM
          coder-index eval data/ --index idx --mapping names.csv --llm none --tsne-samples 0
          coder-index eval test/ --index pets-index --adapter pets-16shot
          coder-index eval test/ --index pets-index --corpus my-corpus        # clip, xmore, coder, coder+xmore
          coder-index eval test/ --index in1k-cvpr24 --gap-threshold preset --report-format clip_benchmark
          coder-index eval 'wds/test-{000..009}.tar' --index cifar-index --llm none     # KEY.cls labels
          coder-index eval hf-cifar10/test-00000-of-00001.parquet --index cifar-index --image-column img \\
              --llm none
        """
        from coder_index.core.atomic import check_writable
        from coder_index.core.remote import is_url, public_url
        from coder_index.evaluation.run import evaluate
        from coder_index.methods.pair_stage import PairReranker
        from coder_index.methods.text_index import TextIndex
        from coder_index.pipeline.labelled import load_labelled

        if not is_url(data) and "{" not in data and not Path(data).exists():  # before anything else
            raise click.UsageError(f"DATA {data} does not exist: a folder with one subfolder per class, a CSV of "
                                   "path,label, or a folder's URL (s3://bucket/test/)")
        check_writable(Path(out_dir), "--out", is_dir=True)
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        if methods == ",".join(ALL_METHODS) and adapter_dir:     # the default: the paper's Figure 4 comparison
            wanted = ["clip", "tip-adapter", "coder-adapter"]
        elif methods == ",".join(ALL_METHODS) and corpus_dir:
            wanted = ["clip", "xmore", "coder", "coder+xmore"]
        if any(m in RERANK_METHODS for m in wanted) and llm["llm_kind"] != "none":
            _check_llm_key(llm, wanted)  # fails before any model loads or image is encoded
        index = TextIndex.open(index_dir, device=device)
        index.require_model(model, pretrained)
        gap_threshold = resolve_gap_threshold(GATED_DEFAULT if gap_threshold is None else gap_threshold, index)
        fewshot = None
        if adapter_dir:
            from coder_index.methods.fewshot.model import FewShotModel

            fewshot = FewShotModel(Path(adapter_dir), index)
        xmore = None
        if corpus_dir:
            from coder_index.methods.xmore.predict import XMore
            from coder_index.stores.corpus import Corpus

            corpus = Corpus(corpus_dir, index.fingerprint, device=index.compute_device)
            xmore = XMore(index, corpus, k=retrieve_k, prompts=prompts, retrieval=xmore_retrieval or (
                "released" if index.recipe.is_released else "nearest"))
        from coder_index.pipeline.sources.parquet import ParquetOptions

        labelled = load_labelled(data, index.class_names(), mapping,
                                 ParquetOptions(image_column, key_column, label_column))
        generator = None

        def reranker_factory(gap: float | None) -> PairReranker | None:
            nonlocal generator
            if llm["llm_kind"] == "none" and index.counts()["pair_texts"] == 0:
                return None
            if llm["llm_kind"] != "none" and generator is None:
                generator = make_generator(index.encoder, **llm, prompts=index.recipe.preset)
            return PairReranker(index, generator, gap_threshold=gap, progress=not quiet)

        report = evaluate(index, labelled, out_dir, methods=wanted, reranker_factory=reranker_factory,
                          gap_threshold=gap_threshold, cache_path=embedding_cache, batch_size=batch_size,
                          workers=workers, threads=threads, tsne_samples=tsne_samples, data_name=public_url(data),
                          progress=not quiet,
                          fewshot=fewshot, xmore=xmore, prompts=prompts, report_formats=report_formats,
                          decode=decode, xmore_normalizer=xmore_normalizer or (
                              "running" if index.recipe.is_released else "corpus"))
        from coder_index.evaluation.report import markdown

        click.echo(markdown(report))
        written = ["report.json", *(["tsne.png"] if "tsne" in report else []), *report.get("clip_benchmark_files", [])]
        click.echo(f"wrote {Path(out_dir) / 'report.md'}, " + ", ".join(written), err=True)
        if report.get("unread"):
            first = "; ".join(f"{what}: {why}" for what, why in report.get("unread_first", [])[:3])
            click.echo(f"incomplete: {report['unread']} input(s) could not be read and are not in the report: "
                       f"{first}; rerun to try them again (exit status {EXIT_INCOMPLETE})", err=True)
            sys.exit(EXIT_INCOMPLETE)
