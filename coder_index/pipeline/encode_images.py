"""The one way from image items to embeddings, for every command that reads images.

items -> the feed (``feed.make_feed``: read, decode, preprocess in worker processes; ``--decode gpu``
JPEGs decoded where the encoder runs) -> batches made ahead by a thread on a CUDA device
(``feed.Prefetched``) -> the encoder. ``classify``, ``eval``, ``corpus build`` and ``fewshot fit``
all come through here, so they share the decoders, the per-format error reasons, ``--decode``, the
prefetch and the choice of workers and threads (``parallelism.choose``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.startup import process_age
from coder_index.pipeline.feed import Prefetched, Views, make_feed
from coder_index.pipeline.sources.base import ItemError, ReadFailure, Sample, UnitDone

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder

log = logging.getLogger(__name__)


@dataclass
class EncodedBatch:
    samples: list[Sample]             # the images that gave an embedding, in order (their bytes dropped)
    embeddings: np.ndarray | None     # [n, D] float32, L2-normalised
    errors: list[ItemError]           # images that gave none (final)
    failures: list[ReadFailure] = field(default_factory=list)  # what could not be read (a rerun retries it)
    done: list[UnitDone] = field(default_factory=list)         # units (or parts) read to their end
    # with views: {n: [n_items, D]} the L2-normalised means of each image's first n views (``Views.prefixes``)
    prefix_embeddings: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def items(self) -> list[str]:
        """The rows of the images that gave an embedding."""
        return [s.row for s in self.samples]

    @property
    def positions(self) -> list[int]:
        """Where each image's unit stands in the list given."""
        return [s.position for s in self.samples]


class _NoClock:
    measured = False

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


def prefetch_batches(device: Any) -> bool:
    """Whether batches are made by a thread ahead of the encoder on this device. On a GPU the next
    batch is made (decoded, resized, copied) while this one encodes. On a CPU the cores are already
    busy encoding: a thread made --decode gpu 5-10% slower on 2 cores, so batches are made in line."""
    return getattr(device, "type", str(device)) == "cuda"


def encoded_batches(encoder: ClipEncoder, units: Sequence[Any], *, batch_size: int, workers: int,
                    decode: str = "cpu", views: Views | None = None, clock: Any = None,
                    first_batch: dict[str, bool] | None = None) -> Iterator[EncodedBatch]:
    """Embeddings of the images of ``units`` (``sources``: files, URLs, shards, row groups), batch
    after batch; the errors, read failures and units done of each batch come with it. ``workers`` is
    the number of decoding processes (``parallelism.parallel_encoding`` chooses it and the torch
    threads; hold it around the call).

    ``views`` (the few-shot support set): each image's augmented views are encoded and their raw
    features averaged, then L2-normalised, as the released few-shot code builds its keys.
    ``clock`` (a ``classify.StageClock``) charges each stage its time and makes batches in line;
    ``first_batch`` ({"pending": True}, shared across calls) makes -v announce the run's first batch."""
    clock = clock or _NoClock()
    feed = make_feed(decode, encoder.preprocess, encoder.device)

    def made() -> Iterator[Any]:
        return feed.batches(list(units), batch_size=batch_size, workers=workers, views=views)

    ahead = prefetch_batches(encoder.device) and not getattr(clock, "measured", False)
    batches = Prefetched(made, encoder.device) if ahead else made()
    first_batch = first_batch if first_batch is not None else {"pending": True}
    try:
        while True:
            with clock.stage("feed"):
                batch = next(batches, None)
            if batch is None:
                return
            emb = None
            prefix_emb: dict[int, np.ndarray] = {}
            if batch.pixels is not None:
                ready = process_age() if first_batch["pending"] else None
                with clock.stage("encode"):
                    if views is None:
                        emb = encoder.encode_image_batch(batch.pixels)
                    else:
                        raw = encoder.encode_image_batch(batch.pixels, normalize=False)
                        raw = raw.reshape(len(batch.paths), views.count, -1)
                        emb = _normalised_mean(raw)
                        prefix_emb = {n: _normalised_mean(raw[:, :n]) for n in views.prefixes if 0 < n < views.count}
                if first_batch["pending"]:
                    first_batch["pending"] = False
                    _say_first_batch(len(batch.paths), ready)
            yield EncodedBatch(list(batch.samples), emb, list(batch.errors), list(batch.failures), list(batch.done),
                               prefix_emb)
    finally:
        batches.close()


def _normalised_mean(raw: np.ndarray) -> np.ndarray:
    """[n, views, D] raw features -> [n, D]: their mean, L2-normalised (the released few-shot keys)."""
    mean = raw.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def _say_first_batch(n: int, ready: float | None) -> None:
    """-v: when the first batch was ready to encode (the fixed cost of a run: imports, index, model,
    the first decode) and when it was encoded, counted from the process's start
    (benchmarks/bench_start.py reads this line)."""
    encoded = process_age()
    if ready is not None and encoded is not None:
        log.info("first batch (%d images) ready %.2f s after the process started, encoded at %.2f s", n, ready,
                 encoded)
