"""Classify on Ray Data: a pool of actors decodes, encodes and scores; the driver writes every row.

The driver lists the folder (streamed, the done-set of a resumed run already removed), hands the
paths to ``map_batches`` over actors that each hold the model and the index once, and writes rows
as batches complete, through the same ``OutputRun`` as the local engine: one output file, the same
format, the same lock, provenance and resume. Rows are written by one process only, so a batch that
Ray runs again after a worker died cannot add a second row (the driver also drops a repeated path).

Every actor opens the index itself, from the same path (a shared filesystem) or from a copy it makes
from a path or URI (``index_source``), and refuses to work if that is not the index the driver opened
(same ``index_id`` and generation) or its model's weights differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.faults import crash_once
from coder_index.engines.ray_common import pool_size, ray_session, rechunk, require_ray, worker_env
from coder_index.engines.worker_index import open_worker_index
from coder_index.pipeline.shards import Member

if TYPE_CHECKING:
    from coder_index.methods.scorer_spec import ScorerSpec
    from coder_index.methods.text_index import TextIndex

log = logging.getLogger(__name__)

RAY_CHUNK = 100_000  # paths per Ray dataset: the list is never one object, actors start once per chunk


class ClassifyWorker:
    """A Ray Data actor: open the index, build the scorer, then turn batches of paths into rows."""

    def __init__(self, source: str, expect: dict[str, Any], spec: dict[str, Any], root: str,
                 device: str | None, threads: int, decode: str = "cpu", embeddings: bool = False) -> None:
        import torch

        from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
        from coder_index.pipeline.feed import make_feed

        torch.set_num_threads(max(1, threads))
        self.index = open_worker_index(source, expect, device)
        self.spec = ScorerSpec(**spec)
        self.scorer = build_scorer(self.index, self.spec)
        if not self.spec.rerank:
            self.index.encoder.release_text_tower()  # this actor encodes images only
        self.root = Path(root)
        # the same feed as the local engine: on a GPU actor, JPEGs decoded on its GPU (--decode gpu)
        self.feed = make_feed(decode, self.index.encoder.preprocess, self.index.encoder.device)
        self.embeddings = embeddings  # --save-embeddings: the rows' image embeddings go back too

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        items = _sources(batch, paths)
        loaded = next(self.feed.batches(self.root, items, batch_size=max(1, len(paths)), workers=0))
        crash_once("ray.worker.batch")  # tests: a worker killed with a batch in hand
        k = self.spec.top_k
        ids = np.full((len(paths), k), -1, np.int64)
        scores = np.zeros((len(paths), k), np.float64)
        errors = np.array([""] * len(paths), dtype=object)
        row = {p: i for i, p in enumerate(paths)}
        vectors = np.zeros((len(paths), self.index.dim if self.embeddings else 0), np.float32)
        if loaded.pixels is not None:
            emb = self.index.encoder.encode_image_batch(loaded.pixels)
            i, s = self.scorer(emb)
            at = [row[p] for p in loaded.paths]
            ids[at, : i.shape[1]] = i
            scores[at, : s.shape[1]] = s
            if self.embeddings:
                vectors[at] = emb
        for p, reason in loaded.errors:
            errors[row[p]] = reason
        out = {"path": np.array(paths, dtype=object), "error": errors, "ids": ids, "scores": scores}
        if self.embeddings:
            out["emb"] = vectors
        return out


class RayEngine:
    """``classify_folder(..., engine=RayEngine(index, spec))``: see the module docstring.

    ``address``: None starts a local Ray instance, "auto" joins the running cluster, or a
    ``ray://`` address. ``actors``: how many (default: one per CPU, or per GPU with
    ``gpus_per_actor``). ``index_source``: where actors read the index (default: its path here).
    """

    def __init__(self, index: TextIndex, spec: ScorerSpec, *, address: str | None = None, actors: int | None = None,
                 batch_size: int = 64, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                 index_source: str | None = None, progress: bool = True, chunk: int = RAY_CHUNK,
                 decode: str = "cpu") -> None:
        require_ray()
        self.decode = decode
        self.index, self.spec = index, spec
        self.address, self.actors, self.batch_size = address, actors, batch_size
        self.gpus, self.cpus = gpus_per_actor, cpus_per_actor
        self.source = index_source or str(index.path.resolve())
        self.progress, self.chunk = progress, chunk
        self.return_embeddings = False  # set by classify_folder for --save-embeddings

    def run(self, root: Path, todo_chunks: Iterator[list[str]], write: Callable, write_errors: Callable, bar: Any,
            on_batch: Callable[[int], None] | None, counts: dict[str, int]) -> None:
        chunks = rechunk(todo_chunks, self.chunk)
        first = next(chunks, None)
        if first is None:
            return  # nothing to do: no cluster is started for a finished run
        with ray_session(self.address) as ray:
            n_actors = pool_size(ray, self.actors, self.gpus, self.cpus)
            expect = {"index_id": self.index.index_id, "generation": self.index.generation,
                      "pairs_generation": self.index.pairs_generation,
                      "weights_sha256": self.index.fingerprint.weights_sha256}
            device = "cuda" if self.gpus else "cpu"
            kwargs = {"source": self.source, "expect": expect, "spec": self.spec.to_dict(),
                      "root": str(Path(root).resolve()), "device": device, "threads": max(1, int(self.cpus)),
                      "decode": self.decode, "embeddings": self.return_embeddings}
            log.info("Ray engine: %d actor(s), %s CPU / %s GPU each", n_actors, self.cpus, self.gpus)
            for todo in _with_first(first, chunks):
                bar.total = (bar.total or 0) + len(todo)
                bar.refresh()
                by_path = {str(p): p for p in todo}  # a shard's sample keeps its caption for the embeddings
                ds = ray.data.from_items([_item(p) for p in todo]).map_batches(
                    ClassifyWorker, fn_constructor_kwargs=kwargs, batch_size=self.batch_size,
                    compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=self.cpus,
                    num_gpus=self.gpus or None, batch_format="numpy",
                    runtime_env={"env_vars": worker_env()})  # also on a cluster joined, not started
                seen: set[str] = set()
                for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                    _write_batch(out, seen, write, write_errors, by_path)
                    bar.update(len(out["path"]))
                    if on_batch is not None:
                        on_batch(counts["ok"] + counts["err"])


def _item(p: str) -> dict[str, Any]:
    """A row of the Ray dataset: the path, and where a shard's sample lies in its tar."""
    if isinstance(p, Member):
        return {"path": str(p), "shard": p.shard, "offset": p.offset, "size": p.size, "key": p.key, "ext": p.ext}
    return {"path": str(p), "shard": "", "offset": 0, "size": 0, "key": "", "ext": ""}


def _sources(batch: dict[str, np.ndarray], paths: list[str]) -> list[str]:
    """The feed's items for a Ray batch: paths, or shard samples (``Member``) rebuilt from their columns."""
    if "shard" not in batch:
        return paths
    return [Member(p, str(sh), int(off), int(size), str(key), str(ext)) if sh else p
            for p, sh, off, size, key, ext in zip(paths, batch["shard"], batch["offset"], batch["size"], batch["key"],
                                                  batch["ext"], strict=True)]


def _write_batch(out: dict[str, np.ndarray], seen: set[str], write: Callable, write_errors: Callable,
                 by_path: dict[str, str] | None = None) -> None:
    paths = [str(p) for p in out["path"]]
    fresh = np.array([p not in seen for p in paths], dtype=bool)  # a retried batch never writes twice
    seen.update(paths)
    failed = np.array([bool(e) for e in out["error"]], dtype=bool)
    ok = fresh & ~failed
    if ok.any():
        k = int((out["ids"][ok] >= 0).sum(axis=1).min())
        chosen = [(by_path or {}).get(p, p) for p, g in zip(paths, ok, strict=True) if g]
        emb = out["emb"][ok] if "emb" in out else None
        write(chosen, out["ids"][ok][:, :k], out["scores"][ok][:, :k], emb)
    bad = fresh & failed
    if bad.any():
        write_errors([(p, str(e)) for p, e, b in zip(paths, out["error"], bad, strict=True) if b])


def _with_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest
