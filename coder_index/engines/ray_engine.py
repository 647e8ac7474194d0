"""Classify on Ray Data: a pool of actors decodes, encodes and scores; the driver writes every row.

The driver lists the source's units (streamed, what a resumed run finished already left out), hands
them to ``map_batches`` over actors that each hold the model and the index once and read the units
themselves (no shared disk is needed for shards and URLs), and writes rows as batches complete,
through the same sink as the local engine: one output file, the same format, the same lock,
provenance and resume. Rows are written by one process only, so a task that Ray runs again after a
worker died cannot add a second row (the sink drops a repeated row).

Every actor opens the index itself, from the same path (a shared filesystem) or from a copy it makes
from a path or URI (``index_source``), and refuses to work if that is not the index the driver opened
(same ``index_id`` and generation) or its model's weights differ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.faults import crash_once
from coder_index.engines.ray_common import pool_size, ray_session, rechunk, require_ray, worker_env
from coder_index.engines.worker_index import open_worker_index
from coder_index.pipeline.sources.base import ItemError, ReadFailure, Sample, UnitDone

if TYPE_CHECKING:
    from coder_index.methods.scorer_spec import ScorerSpec
    from coder_index.methods.text_index import TextIndex
    from coder_index.pipeline.run_sink import RunSink

log = logging.getLogger(__name__)

RAY_CHUNK = 100_000  # units per Ray dataset: the list is never one object, actors start once per chunk


class UnitWorker:
    """A Ray Data actor: open the index, build the scorer, then read whole units (files, URLs, shards,
    row groups: any source's, through the same feed as the local engine) and return their rows, their
    errors, their read failures and the units read to their end, as one table."""

    def __init__(self, source: str, expect: dict[str, Any], spec: dict[str, Any], device: str | None,
                 threads: int, decode: str = "cpu", embeddings: bool = False, batch_size: int = 64) -> None:
        import torch

        from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
        from coder_index.pipeline.feed import make_feed

        torch.set_num_threads(max(1, threads))
        self.index = open_worker_index(source, expect, device)
        self.spec = ScorerSpec(**spec)
        self.scorer = build_scorer(self.index, self.spec)
        if not self.spec.rerank:
            self.index.encoder.release_text_tower()  # this actor encodes images only
        # the same feed as the local engine: on a GPU actor, JPEGs decoded on its GPU (--decode gpu)
        self.feed = make_feed(decode, self.index.encoder.preprocess, self.index.encoder.device)
        self.embeddings = embeddings  # --save-embeddings: the rows' image embeddings go back too
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _Table(self.spec.top_k, self.index.dim if self.embeddings else 0)
        for fed in self.feed.batches(list(batch["unit"]), batch_size=self.batch_size, workers=0):
            crash_once("ray.worker.batch")  # tests: a worker killed with a batch in hand
            if fed.pixels is not None:
                emb = self.index.encoder.encode_image_batch(fed.pixels)
                out.rows(fed.samples, self.scorer(emb), emb)
            out.events(fed.errors, fed.failures, fed.done)
        return out.columns()


class _Table:
    """The columns an actor returns: one row per image, error, read failure or unit done (``kind``)."""

    def __init__(self, k: int, dim: int) -> None:
        self.k, self.dim = k, dim
        self.kind: list[str] = []
        self.path: list[str] = []
        self.detail: list[str] = []   # JSON: a row's sidecars, an error's reason and kind, a unit's counts
        self.ids: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.s1: list[np.ndarray] = []
        self.s1_scores: list[np.ndarray] = []
        self.emb: list[np.ndarray] = []

    def rows(self, samples: list[Sample], scored: Any, emb: np.ndarray) -> None:
        ids, scores = scored
        stage1 = getattr(scored, "stage1", None) or (np.full(len(ids), -1), np.zeros(len(ids)))
        for s in samples:
            self.kind.append("row")
            self.path.append(s.row)
            self.detail.append(json.dumps([s.key, s.container, s.caption, s.meta]))
        self.ids.append(_pad(np.asarray(ids), self.k, -1))
        self.scores.append(_pad(np.asarray(scores, np.float64), self.k, 0.0))
        self.s1.append(np.asarray(stage1[0], np.int64))
        self.s1_scores.append(np.asarray(stage1[1], np.float64))
        self.emb.append(emb if self.dim else np.zeros((len(emb), 0), np.float32))

    def events(self, errors: list[ItemError], failures: list[ReadFailure], done: list[UnitDone]) -> None:
        entries = [("error", e.row, [e.reason, e.kind]) for e in errors] + \
                  [("failed", f.row, [f.reason]) for f in failures] + \
                  [("done", d.unit, [d.part, d.parts, d.counts]) for d in done]
        for kind, path, detail in entries:
            self.kind.append(kind)
            self.path.append(path)
            self.detail.append(json.dumps(detail))
        n = len(entries)
        if n:
            self.ids.append(np.full((n, self.k), -1, np.int64))
            self.scores.append(np.zeros((n, self.k)))
            self.s1.append(np.full(n, -1, np.int64))
            self.s1_scores.append(np.zeros(n))
            self.emb.append(np.zeros((n, self.dim), np.float32))

    def columns(self) -> dict[str, np.ndarray]:
        def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
            return np.concatenate(parts) if parts else empty

        return {"kind": np.array(self.kind, dtype=object), "path": np.array(self.path, dtype=object),
                "detail": np.array(self.detail, dtype=object),
                "ids": cat(self.ids, np.zeros((0, self.k), np.int64)),
                "scores": cat(self.scores, np.zeros((0, self.k))),
                "s1_ids": cat(self.s1, np.zeros(0, np.int64)), "s1_scores": cat(self.s1_scores, np.zeros(0)),
                "emb": cat(self.emb, np.zeros((0, self.dim), np.float32))}


def _pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    out = np.full((len(a), k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def write_table(out: dict[str, np.ndarray], sink: RunSink) -> None:
    """An actor's table through the run's sink: errors and failures, then the rows, then the units done
    (after their rows); a row already written by this run (a task run again) is not written twice."""
    kinds = np.array([str(k) for k in out["kind"]], dtype=object)
    details = [json.loads(str(d)) for d in out["detail"]]
    paths = [str(p) for p in out["path"]]
    sink.errors([ItemError(p, d[0], d[1]) for p, d, k in zip(paths, details, kinds, strict=True) if k == "error"])
    sink.failures([ReadFailure(p, d[0]) for p, d, k in zip(paths, details, kinds, strict=True) if k == "failed"])
    done = [UnitDone(p, int(d[0]), int(d[1]), dict(d[2])) for p, d, k in zip(paths, details, kinds, strict=True)
            if k == "done"]
    rows = kinds == "row"
    samples = [Sample(p, key=d[0], container=d[1], caption=d[2], meta=d[3])
               for p, d, k in zip(paths, details, kinds, strict=True) if k == "row"]
    ids = scores = emb = stage1 = None
    if samples:
        k = int((out["ids"][rows] >= 0).sum(axis=1).min())
        ids, scores = out["ids"][rows][:, :k], out["scores"][rows][:, :k]
        emb = out["emb"][rows] if out["emb"].shape[1] else None
        if (out["s1_ids"][rows] >= 0).any():
            stage1 = (out["s1_ids"][rows], out["s1_scores"][rows])
    sink.rows(samples, ids, scores, emb, stage1, done)
    sink.seen(int((kinds != "done").sum()))


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

    def _kwargs(self) -> dict[str, Any]:
        expect = {"index_id": self.index.index_id, "generation": self.index.generation,
                  "pairs_generation": self.index.pairs_generation,
                  "weights_sha256": self.index.fingerprint.weights_sha256}
        return {"source": self.source, "expect": expect, "spec": self.spec.to_dict(),
                "device": "cuda" if self.gpus else "cpu", "threads": max(1, int(self.cpus)),
                "decode": self.decode, "embeddings": self.return_embeddings, "batch_size": self.batch_size}

    def run(self, work: Iterator[list[Any]], sink: RunSink) -> None:
        """Each chunk of units as a Ray dataset over a pool of actors: one-image units ``batch_size`` to a
        task, larger units (a shard, a row group) one to a task, so that a task lost with its node is one
        unit read again elsewhere."""
        chunks = rechunk(work, self.chunk)
        first = next(chunks, None)
        if first is None:
            return  # nothing to do: no cluster is started for a finished run
        with ray_session(self.address) as ray:
            n_actors = pool_size(ray, self.actors, self.gpus, self.cpus)
            log.info("Ray engine: %d actor(s), %s CPU / %s GPU each", n_actors, self.cpus, self.gpus)
            for units in _with_first(first, chunks):
                per_task = self.batch_size if units[0].single else 1
                if units[0].single:
                    sink.bar.total = (sink.bar.total or 0) + len(units)
                    sink.bar.refresh()
                ds = ray.data.from_items([{"unit": u} for u in units],
                                         override_num_blocks=max(1, min(len(units) // per_task, 10_000))
                                         ).map_batches(
                    UnitWorker, fn_constructor_kwargs=self._kwargs(), batch_size=per_task,
                    compute=ray.data.ActorPoolStrategy(size=min(n_actors, max(1, -(-len(units) // per_task)))),
                    num_cpus=self.cpus, num_gpus=self.gpus or None, batch_format="numpy",
                    runtime_env={"env_vars": worker_env()})  # also on a cluster joined, not started
                for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                    write_table(out, sink)


def _with_first(first: list[Any], rest: Iterator[list[Any]]) -> Iterator[list[Any]]:
    yield first
    yield from rest
