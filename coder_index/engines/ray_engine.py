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
        s1_ids, s1_scores = np.full(len(paths), -1, np.int64), np.zeros(len(paths))
        if loaded.pixels is not None:
            emb = self.index.encoder.encode_image_batch(loaded.pixels)
            scored = self.scorer(emb)
            i, s = scored
            at = [row[p] for p in loaded.paths]
            ids[at, : i.shape[1]] = i
            scores[at, : s.shape[1]] = s
            if getattr(scored, "stage1", None) is not None:  # CODER*: stage 1's first class travels too
                s1_ids[at], s1_scores[at] = scored.stage1
            if self.embeddings:
                vectors[at] = emb
        for p, reason in loaded.errors:
            errors[row[p]] = reason
        out = {"path": np.array(paths, dtype=object), "error": errors, "ids": ids, "scores": scores,
               "s1_ids": s1_ids, "s1_scores": s1_scores}
        if self.embeddings:
            out["emb"] = vectors
        return out


class ShardWorker(ClassifyWorker):
    """A Ray Data actor for streamed shards (remote or compressed): each call streams one shard where
    the actor runs (no shared disk: the shard is read by its URL), through the same feed, and returns
    all its rows, its error rows, then one ``done`` row with the shard's counts. A shard whose task is
    lost with its node is streamed again elsewhere; the driver writes each row once."""

    def __init__(self, *args: Any, batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
        import json

        from coder_index.pipeline.shard_stream import ShardPlan

        k = self.spec.top_k
        paths: list[str] = []
        kinds: list[str] = []
        reasons: list[str] = []
        sidecars: list[str] = []  # a sample's key, caption and JSON, for --save-embeddings' metadata
        s1_ids: list[np.ndarray] = []
        s1_scores: list[np.ndarray] = []
        id_rows: list[np.ndarray] = []
        score_rows: list[np.ndarray] = []
        emb_rows: list[np.ndarray] = []
        dim = self.index.dim if self.embeddings else 0
        for spec, name, done_json in zip(batch["shard"], batch["name"], batch["done"], strict=True):
            plan = ShardPlan([str(spec)], {str(name): set(json.loads(str(done_json)))})
            for fed in self.feed.batches(self.root, plan, batch_size=self.batch_size, workers=0):
                crash_once("ray.worker.batch")  # tests: a worker killed with a shard in hand
                if fed.pixels is not None:
                    emb = self.index.encoder.encode_image_batch(fed.pixels)
                    scored = self.scorer(emb)
                    i, sc = scored
                    stage1 = getattr(scored, "stage1", None) or (np.full(len(i), -1), np.zeros(len(i)))
                    s1_ids.append(np.asarray(stage1[0], np.int64))
                    s1_scores.append(np.asarray(stage1[1], np.float64))
                    paths += [str(p) for p in fed.paths]
                    kinds += ["row"] * len(fed.paths)
                    reasons += [""] * len(fed.paths)
                    sidecars += [json.dumps([p.key, p.caption, p.meta]) for p in fed.paths]
                    id_rows.append(_pad(i, k, -1))
                    score_rows.append(_pad(sc, k, 0.0))
                    emb_rows.append(emb if self.embeddings else np.zeros((len(emb), 0), np.float32))
                # rows without an image (an error, a shard read to its end): the same columns, empty
                for path, kind, reason in [*((str(p), "error", r) for p, r in fed.errors),
                                           *((n, "done", json.dumps(c)) for n, c in fed.done_shards)]:
                    paths.append(path)
                    kinds.append(kind)
                    reasons.append(reason)
                    sidecars.append("null")
                    s1_ids.append(np.full(1, -1, np.int64))
                    s1_scores.append(np.zeros(1))
                    id_rows.append(np.full((1, k), -1, np.int64))
                    score_rows.append(np.zeros((1, k)))
                    emb_rows.append(np.zeros((1, dim), np.float32))
        out = {"path": np.array(paths, dtype=object), "kind": np.array(kinds, dtype=object),
               "error": np.array(reasons, dtype=object), "sidecars": np.array(sidecars, dtype=object),
               "ids": np.concatenate(id_rows) if id_rows else np.zeros((0, k), np.int64),
               "scores": np.concatenate(score_rows) if score_rows else np.zeros((0, k)),
               "s1_ids": np.concatenate(s1_ids) if s1_ids else np.zeros(0, np.int64),
               "s1_scores": np.concatenate(s1_scores) if s1_scores else np.zeros(0)}
        if self.embeddings:
            out["emb"] = np.concatenate(emb_rows) if emb_rows else np.zeros((0, dim), np.float32)
        return out


def _pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    out = np.full((len(a), k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
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
        from coder_index.pipeline.shard_stream import ShardPlan

        given = iter(todo_chunks)
        head = next(given, None)
        if isinstance(head, ShardPlan):
            return self._run_streamed(root, head, write, write_errors, bar, on_batch, counts)
        chunks = rechunk(_with_first(head, given) if head is not None else iter(()), self.chunk)
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


    def _kwargs(self, ray: Any, root: Path) -> dict[str, Any]:
        expect = {"index_id": self.index.index_id, "generation": self.index.generation,
                  "pairs_generation": self.index.pairs_generation,
                  "weights_sha256": self.index.fingerprint.weights_sha256}
        return {"source": self.source, "expect": expect, "spec": self.spec.to_dict(),
                "root": str(Path(root).resolve()), "device": "cuda" if self.gpus else "cpu",
                "threads": max(1, int(self.cpus)), "decode": self.decode, "embeddings": self.return_embeddings}

    def _run_streamed(self, root: Path, plan: Any, write: Callable, write_errors: Callable, bar: Any,
                      on_batch: Callable[[int], None] | None, counts: dict[str, int]) -> None:
        """One task per shard not yet complete: an actor streams it by its URL and returns its rows."""
        import json

        from coder_index.core.remote import public_url

        todo = [(spec, public_url(spec)) for spec in plan.specs if public_url(spec) not in plan.complete]
        if not todo:
            return
        with ray_session(self.address) as ray:
            n_actors = min(len(todo), pool_size(ray, self.actors, self.gpus, self.cpus))
            kwargs = {**self._kwargs(ray, root), "batch_size": self.batch_size}
            log.info("Ray engine: %d shard(s) over %d actor(s)", len(todo), n_actors)
            items = [{"shard": spec, "name": name, "done": json.dumps(sorted(plan.done_keys.get(name, ())))}
                     for spec, name in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardWorker, fn_constructor_kwargs=kwargs, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=self.cpus,
                num_gpus=self.gpus or None, batch_format="numpy", runtime_env={"env_vars": worker_env()})
            seen: set[str] = set()
            for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                kinds = np.array([str(x) for x in out["kind"]], dtype=object)
                rows = {k: v[kinds != "done"] for k, v in out.items()}
                sources = {}  # the rows' samples, with their sidecars (--save-embeddings' metadata)
                for p, side in zip(rows["path"], rows["sidecars"], strict=True):
                    meta = json.loads(str(side))
                    if meta:
                        name = str(p)[: -len(meta[0]) - 1]
                        sources[str(p)] = Member(str(p), name, 0, 0, meta[0], "", meta[1], meta[2])
                _write_batch(rows, seen, write, write_errors, sources)
                done = [(str(p), json.loads(str(c))) for p, c, kd in zip(out["path"], out["error"], kinds, strict=True)
                        if kd == "done"]
                done = [(p, c) for p, c in done if p not in seen]
                seen.update(p for p, _ in done)
                if done:
                    write([], None, None, None, done)
                bar.update(int((kinds != "done").sum()))
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
        stage1 = (out["s1_ids"][ok], out["s1_scores"][ok]) if "s1_ids" in out and (out["s1_ids"][ok] >= 0).any() \
            else None
        write(chosen, out["ids"][ok][:, :k], out["scores"][ok][:, :k], emb, (), stage1)
    bad = fresh & failed
    if bad.any():
        write_errors([(p, str(e)) for p, e, b in zip(paths, out["error"], bad, strict=True) if b])


def _with_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest
