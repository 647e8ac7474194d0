"""Text encoding spread over Ray actors, for index builds and corpus ingests of large vocabularies.

``RayTextEncoder(encoder)`` is a context manager around a Ray session; inside, calling it on a list
of texts returns their embeddings in input order, exactly as ``encoder.encode_texts`` would (the
workers run that same method). Texts are handed out sorted by length, so that each worker batch is
cut to a similar context length (see ``encoder.encode_texts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.errors import CoderIndexError
from coder_index.engines.ray_common import pool_size, ray_session, require_ray, worker_env

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder


class TextWorker:
    """A Ray Data actor holding the CLIP model once; checks it loaded the driver's weights."""

    def __init__(self, model: str, pretrained: str | None, weights_sha256: str, device: str | None,
                 threads: int) -> None:
        import os

        import torch

        from coder_index.model.encoder import ClipEncoder

        torch.set_num_threads(max(1, threads))
        self.encoder = ClipEncoder(model, pretrained, device=device)
        if self.encoder.fingerprint.weights_sha256 != weights_sha256:
            raise CoderIndexError(f"a Ray worker on {os.uname().nodename} loaded other weights for {model}: make "
                                  "the same model files available on every node")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode_texts([str(t) for t in batch["text"]])
        return {"i": batch["i"], "emb": emb}


class RayTextEncoder:
    def __init__(self, encoder: ClipEncoder, *, address: str | None = None, actors: int | None = None,
                 batch_size: int = 1024, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                 progress: bool = False) -> None:
        require_ray()
        fp = encoder.fingerprint
        self.kwargs = {"model": fp.model, "pretrained": fp.pretrained, "weights_sha256": fp.weights_sha256,
                       "device": "cuda" if gpus_per_actor else "cpu", "threads": max(1, int(cpus_per_actor))}
        self.dim = encoder.embed_dim
        # the actors' encoders run in their device's default precision: the text cache keys by it
        self.precision = "fp16" if gpus_per_actor else "fp32"
        self.address, self.actors, self.batch_size = address, actors, batch_size
        self.gpus, self.cpus, self.progress = gpus_per_actor, cpus_per_actor, progress
        self._session: Any = None
        self._ray: Any = None

    def __enter__(self) -> Callable[[Sequence[str]], np.ndarray]:
        self._session = ray_session(self.address)
        self._ray = self._session.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._session.__exit__(*exc)
        self._ray = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._ray is None:
            raise RuntimeError("use RayTextEncoder as a context manager: `with RayTextEncoder(enc) as encode:`")
        from tqdm import tqdm

        texts = list(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        ray = self._ray
        ds = ray.data.from_items([{"i": int(i), "text": texts[i]} for i in order]).map_batches(
            TextWorker, fn_constructor_kwargs=self.kwargs, batch_size=self.batch_size,
            compute=ray.data.ActorPoolStrategy(size=pool_size(ray, self.actors, self.gpus, self.cpus)),
            num_cpus=self.cpus,
            num_gpus=self.gpus or None, batch_format="numpy", runtime_env={"env_vars": worker_env()})
        done = np.zeros(len(texts), bool)
        with tqdm(total=len(texts), unit="text", desc="encoding texts (Ray)", disable=not self.progress) as bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                out[b["i"]] = b["emb"]
                done[b["i"]] = True
                bar.update(len(b["i"]))
        if not done.all():
            raise CoderIndexError(f"the Ray workers returned {int(done.sum())} of {len(texts)} text embeddings")
        return out
