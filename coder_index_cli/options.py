"""Every option that more than one command takes, declared once: the same name, default and help
wherever it appears (tests/test_cli_options.py compares them across commands).

* model: ``--model``, ``--pretrained``, ``--device`` of the commands that use an index's model
  (classify, explain, serve, eval, fewshot fit); the ``--model`` of a new index or file (build,
  generate, corpus build); ``--pretrained`` and ``--device`` everywhere.
* method: ``--method``, ``--rerank``, ``--gap-threshold``, ``--adapter``, ``--corpus``,
  ``--retrieve-k`` (classify, explain, serve; eval takes the last four).
* LLM: the endpoint and budget options (generate, build, classify, eval), the Auto Text
  Generator's (generate, build --generate).
* ``--preset`` (build, generate), ``--decode`` (classify, eval, corpus build, fewshot fit),
  ``--workers``/``--threads``, ``--engine`` and the Ray settings.

Options are applied with ``options("name", ...)`` in the order given (they appear so in --help).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from coder_index.core.choices import (
    DECODE_CHOICES,
    PRESETS,
    XMORE_NORMALIZERS,
    XMORE_RETRIEVALS,
    ZERO_SHOT_METHODS,
)


class GapThreshold(click.ParamType):
    """A number in [0, 1], or 'preset' for the released code's per-dataset threshold."""

    name = "G|preset"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "preset":
            return "preset"
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number in [0, 1] nor 'preset'", param, ctx)
        if not 0 <= v <= 1:
            self.fail(f"{v} is not in [0, 1]", param, ctx)
        return v


GAP_THRESHOLD = GapThreshold()
_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _CorpusParam(click.ParamType):
    """A corpus directory, or the URL of a kNN service (kept as the string given)."""

    name = "CORPUS_DIR|URL"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            return value
        return _DIR.convert(value, param, ctx)


_CORPUS = _CorpusParam()

# name -> the click.option that declares it
OPTIONS: dict[str, Callable[[Callable], Callable]] = {
    # ------------------------------------------------------------------ the index, the batches
    "index": click.option(
        "--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
        help="The text index (a folder made by `coder-index build`): its texts, and its CLIP model, which encodes "
             "the images."),
    "model_index": click.option(
        "--index", "index_dir", default=None, type=click.Path(exists=True, file_okay=False),
        help="Use this text index's CLIP model instead of --model (nothing is downloaded when the index's model is "
             "local: local-dir:, a checkpoint file)."),
    "batch_size": click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
                               help="Images per batch."),
    # ------------------------------------------------------------------ the model
    "model": click.option(
        "--model", default=None, metavar="NAME",
        help="Refuse to run unless the index was built with this CLIP model (an open_clip name, local-dir:PATH or "
             "hf-hub:ORG/NAME; a local model is compared by its weights) [default: the index's model]."),
    "new_model": click.option(
        "--model", default=None, metavar="NAME",
        help="CLIP model: an open_clip name, local-dir:PATH or hf-hub:ORG/NAME [default: the model of --index, or "
             "of the index added to; else ViT-B-32]."),
    "pretrained": click.option(
        "--pretrained", default=None, metavar="TAG|FILE",
        help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k) or a local checkpoint file. 'random' "
             "builds the model with untrained, seeded weights: the whole pipeline runs, offline, with meaningless "
             "labels (trials, tests, benchmarks; the README's main job)."),
    "device": click.option("--device", default=None, help="cuda, mps or cpu (default: the best available)."),
    # ------------------------------------------------------------------ the method
    "method": click.option(
        "--method", "zs_method", type=click.Choice(ZERO_SHOT_METHODS), default="coder", show_default=True,
        help="Zero-shot method; xmore and coder+xmore need --corpus (X-MoRe's normalisers: see "
             "--xmore-normalizer)."),
    "rerank": click.option(
        "--rerank", is_flag=True,
        help="CODER*: rerank each image's top-5 with one-to-one pair texts (classify generates missing pairs with "
             "the LLM options unless --llm none; explain and serve use the pairs stored in the index)."),
    "gap_threshold": click.option(
        "--gap-threshold", default=None, type=GAP_THRESHOLD,
        help="Rerank only images whose softmax top-1 minus top-2 is below this [default: all; eval's coder*-gated "
             "row: 0.3]; 'preset' takes the released code's threshold for the index's dataset."),
    "adapter": click.option(
        "--adapter", "adapter_dir", default=None, type=_DIR,
        help="Few-shot: a CODER-Adapter (from `coder-index fewshot fit`). classify and serve predict with it, "
             "explain explains its prediction, eval adds its tip-adapter and coder-adapter rows."),
    "corpus": click.option(
        "--corpus", "corpus_dir", default=None, type=_CORPUS,
        help="X-MoRe: an image-text corpus (from `coder-index corpus build`), or a clip-retrieval kNN service "
             "(http://HOST:PORT/knn-service?indice=NAME) for --method xmore/coder+xmore. "
             "classify and serve predict with it, explain also shows the captions of the nearest corpus images, "
             "eval adds its xmore and coder+xmore rows."),
    "retrieve_k": click.option(
        "--retrieve-k", default=16, show_default=True, type=click.IntRange(1),
        help="Corpus images retrieved per image for X-MoRe."),
    "xmore_normalizer": click.option(
        "--xmore-normalizer", default=None, type=click.Choice(XMORE_NORMALIZERS),
        help="X-MoRe: what each modality's confidence is divided by. corpus: its mean over a fixed sample of the "
             "corpus's own images (an image's answer depends on that image alone); set: its mean over the images "
             "of this run (the evaluated set); running: the released code's running sums (order-dependent) "
             "[default: running for a --preset cvpr24 index, else corpus]."),
    "xmore_retrieval": click.option(
        "--xmore-retrieval", default=None, type=click.Choice(XMORE_RETRIEVALS),
        help="X-MoRe: which corpus captions an image gets. nearest: those of its --retrieve-k nearest corpus "
             "images, as they come; released: the released code's (200 neighbours, the first 128 captions, "
             "duplicates removed, ordered by image-caption similarity, the first --retrieve-k, prompted "
             "'a_photo_of_a {caption}'; encodes up to 128 captions per new image) [default: released for a "
             "--preset cvpr24 index, else nearest]."),
    # ------------------------------------------------------------------ texts
    "preset": click.option(
        "--preset", type=click.Choice(PRESETS), default=None,
        help="Text recipe and prompts: coder-index's own (default), or exactly those of the authors' released CODER "
             "code (cvpr24: its templates, needing --dataset, and its generator's prompts word for word; see "
             "docs: Fidelity). An existing index keeps its own."),
    # ------------------------------------------------------------------ reading images
    "decode": click.option(
        "--decode", default="auto", show_default=True, type=click.Choice(DECODE_CHOICES),
        help="cpu: open_clip's reference preprocessing (Pillow in the workers), byte for byte; gpu: JPEGs decoded "
             "in batches where the encoder runs (nvJPEG on a GPU, libjpeg-turbo on the CPU), resized and "
             "normalised there, other files the reference way; auto: gpu on a CUDA device, else cpu (always cpu "
             "for a --preset cvpr24 index). fewshot fit's augmented support views are always Pillow's. See "
             "docs, On a GPU: Decoding."),
    "workers": click.option(
        "--workers", default=None, type=click.IntRange(0),
        help="Decoding processes, 0 = decode in the main process [default: chosen from the cores and the model: a "
             "small model leaves the cores to decoding, a large one to encoding]."),
    "threads": click.option(
        "--threads", default=None, type=click.IntRange(1),
        help="Torch threads of the encoding process [default: chosen from the cores and the model]."),
    # ------------------------------------------------------------------ engines
    "engine": click.option(
        "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
        help="Where the work runs: here, or on a Ray cluster (pip install 'coder-index[ray]'; the model and inputs "
             "must be readable on every node: see the docs, At scale)."),
    "ray_address": click.option(
        "--ray-address", default=None, metavar="auto|ADDR",
        help="With --engine ray: 'auto' joins the running cluster, ray://HOST:10001 a remote one; unset starts a "
             "local Ray instance."),
    "ray_actors": click.option(
        "--ray-actors", default=None, type=click.IntRange(1),
        help="With --engine ray: actors, each holding the model once [default: one per CPU of the cluster, or per "
             "GPU with --ray-gpus-per-actor]."),
    "ray_gpus": click.option(
        "--ray-gpus-per-actor", "ray_gpus", default=0.0, show_default=True, type=click.FloatRange(0),
        help="With --engine ray: GPUs per actor (0: CPU actors)."),
    # ------------------------------------------------------------------ the LLM endpoint
    "llm": click.option(
        "--llm", "llm_kind", type=click.Choice(["openai", "none"]), default="openai", show_default=True,
        help="openai: any OpenAI-compatible endpoint (key from --api-key-env); none: no LLM requests (generate "
             "and build use the offline WordNet generator; classify --rerank and eval's coder* rows use the pair "
             "texts already in the index, missing pairs counting as ties)."),
    "base_url": click.option(
        "--base-url", default=None,
        help="Endpoint, e.g. http://localhost:8000/v1 (vLLM, Ollama, llama.cpp). Default: OpenAI."),
    "llm_model": click.option("--llm-model", default="gpt-4o-mini", show_default=True,
                              help="Model name at the endpoint."),
    "api_key_env": click.option(
        "--api-key-env", default="OPENAI_API_KEY", show_default=True,
        help="Environment variable holding the API key (never logged or stored)."),
    "concurrency": click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1),
                                help="Requests in flight at once."),
    "max_requests": click.option(
        "--max-requests", default=None, type=click.IntRange(0),
        help="Request budget (retries included); the run stops cleanly before exceeding it."),
    "temperature": click.option("--temperature", default=0.0, show_default=True, type=float,
                                help="Sampling temperature."),
    "max_tokens": click.option(
        "--max-tokens", default=None, type=click.IntRange(0), metavar="N",
        help="max_tokens sent with each request; 0 sends none (the endpoint's own limit) [default: 600; under "
             "--preset cvpr24 none, as the released generator sends the model name only]."),
    "max_retries": click.option(
        "--max-retries", default=6, show_default=True, type=click.IntRange(0),
        help="Retries of a request after 429, 5xx, timeouts, connection errors or malformed bodies (exponential "
             "backoff with jitter, honouring retry-after)."),
    "max_answer_chars": click.option(
        "--max-answer-chars", default=4000, show_default=True, type=click.IntRange(100),
        help="Longer answers are cut to this many characters (whole lines) before parsing."),
    "cache": click.option(
        "--cache", "cache_path", default=None, type=click.Path(dir_okay=False),
        help="LLM answer cache (SQLite) [default: ~/.cache/coder-index/llm-cache.sqlite]."),
    # ------------------------------------------------------------------ the Auto Text Generator
    "synonyms_from": click.option(
        "--synonyms-from", type=click.Choice(["wordnet", "llm"]), default="wordnet", show_default=True,
        help="Where synonyms come from: WordNet (the noun sense nearest in CLIP space), or the LLM."),
    "analogous_threshold": click.option(
        "--analogous-threshold", default=0.9, show_default=True, type=float,
        help="Drop analogous names whose CLIP similarity to another class exceeds this."),
    "filter_model": click.option(
        "--filter-model", default=None, metavar="MODEL",
        help="CLIP model of the analogous filter [default: the target model]. The released code always uses "
             "ViT-L-14 (e.g. --filter-model ViT-L-14 --filter-pretrained openai)."),
    "filter_pretrained": click.option("--filter-pretrained", default=None, metavar="TAG|FILE",
                                      help="Pretrained tag or checkpoint of --filter-model."),
    "dry_run": click.option("--dry-run", is_flag=True, help="Print how many prompts would be sent, send none."),
    # ------------------------------------------------------------------ parquet inputs
    "image_column": click.option(
        "--image-column", default=None, metavar="NAME",
        help="Parquet inputs: the column of the images (bytes, a {bytes, path} struct as Hugging Face datasets "
             "writes, or image URLs) [default: found from the schema: image, img, jpg, url, ...]."),
    "key_column": click.option(
        "--key-column", default=None, metavar="NAME",
        help="Parquet inputs: the column whose values name the rows (FILE/KEY) [default: key if there is one, else "
             "the row's number in the file]."),
    "label_column": click.option(
        "--label-column", default=None, metavar="NAME",
        help="Parquet inputs: the column of the class (an id, or a name; Hugging Face ClassLabel ids are read as "
             "their names) [default: label, labels, cls or class]."),
}

MODEL = ("model", "pretrained", "device")
METHOD = ("method", "rerank", "gap_threshold", "adapter", "corpus", "retrieve_k", "xmore_normalizer",
          "xmore_retrieval")
PARALLEL = ("workers", "threads")
ENGINE = ("engine", "ray_address", "ray_actors", "ray_gpus")
LLM_CLIENT = ("llm", "base_url", "llm_model", "api_key_env", "concurrency", "max_requests", "temperature",
              "max_tokens", "max_retries", "max_answer_chars", "cache")
PARQUET = ("image_column", "key_column")
GENERATOR = ("synonyms_from", "analogous_threshold", "filter_model", "filter_pretrained", "dry_run")


def options(*names: str) -> Callable[[Callable], Callable]:
    """Apply the named shared options (groups: MODEL, METHOD, ...; pass them with *), in order."""
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise KeyError(f"no shared option {unknown}")

    def wrap(fn: Callable) -> Callable:
        for name in reversed(names):
            fn = OPTIONS[name](fn)
        return fn

    return wrap


def check_engine_options(engine: str, ray_address: str | None, ray_actors: int | None, ray_gpus: float) -> None:
    if engine != "ray" and (ray_address is not None or ray_actors is not None or ray_gpus):
        raise click.UsageError("--ray-address, --ray-actors and --ray-gpus-per-actor need --engine ray")
