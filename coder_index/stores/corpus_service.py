"""An X-MoRe corpus that is a kNN service: clip-retrieval's back-end, as the released X-MoRe queries it.

    --corpus http://HOST:PORT/knn-service?indice=NAME

Each image is one request (the service takes one embedding at a time: they are sent several at once),
``POST /knn-service`` with the normalised image embedding, ``modality: image``, ``num_images: K`` and
``deduplicate: false`` (the released code's setting; clip-retrieval's own client sends true, which
drops near-duplicate hits). The answer's captions are encoded here, prompted as a local corpus's
are, through the text-embedding cache. On open, ``GET /indices-list`` must name the indice, and one
query must succeed (the service says nothing else of a wrong width or model: every error of its is a
bare HTTP 500). Retries, timeouts and the URL's secrets go through ``core.remote``.

A service has no images of its own to give, so it cannot calibrate X-MoRe's default normaliser:
with a service, ``--xmore-normalizer set`` (the run's images) or ``running`` (the released sums).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from coder_index.core.errors import CoderIndexError, InputFormatError
from coder_index.core.redaction import public_url
from coder_index.core.remote import RemoteError, RetryPolicy, request_json
from coder_index.stores.corpus_base import CAPTION_TEMPLATE, normalize_rows

SERVICE = "service"
CONCURRENT_REQUESTS = 8
UNBOUNDED = 1 << 62  # a service's rows are not known: as many as asked for


def is_service(spec: str) -> bool:
    """Whether ``--corpus`` names a kNN service (an http(s) URL) rather than a corpus directory."""
    return str(spec).startswith(("http://", "https://"))


class ServiceCorpus:
    """A kNN service as a corpus (see the module docstring)."""

    def __init__(self, spec: str, fingerprint: Any = None, *, device: Any = None,
                 policy: RetryPolicy | None = None) -> None:
        parts = urlsplit(spec)
        query = dict(parse_qsl(parts.query))
        self.indice = query.pop("indice", None) or query.pop("indice_name", None)
        path = parts.path.rstrip("/") or "/knn-service"
        if not path.endswith("/knn-service"):
            path += "/knn-service"
        self.url = urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))
        self.root = urlunsplit((parts.scheme, parts.netloc, path[: -len("/knn-service")], "", ""))
        self.public = public_url(spec)
        self.path = Path(self.public)  # what run records and messages name
        self.policy = policy or RetryPolicy.from_env()
        indices = request_json(self.root + "/indices-list", policy=self.policy)
        if not isinstance(indices, list):
            raise RemoteError(f"{self.public}: /indices-list is not a list: not a clip-retrieval back-end?", fatal=True)
        if self.indice is None:
            if len(indices) != 1:
                raise InputFormatError(f"{self.public}: name the indice (?indice=NAME); the service has "
                                       f"{', '.join(map(str, indices)) or 'none'}")
            self.indice = str(indices[0])
        elif self.indice not in indices:
            raise InputFormatError(f"{self.public}: the service has no indice {self.indice!r} (it has "
                                   f"{', '.join(map(str, indices)) or 'none'})")
        self.manifest: dict[str, Any] = {"kind": SERVICE, "url": self.public, "indice": self.indice,
                                         "caption_template": CAPTION_TEMPLATE, "rows": None}
        self._captions: dict[int, str] = {}
        self._trace: dict[int, dict[str, Any]] = {}
        self._checked_width: int | None = None

    @property
    def ntotal(self) -> int:
        return UNBOUNDED

    def check_model(self, fp: Any) -> None:
        """A service does not say which model built it: the width is checked by the first query."""

    def set_nprobe(self, nprobe: int) -> None:
        raise InputFormatError("--nprobe is the service's own setting; a kNN service corpus takes none")

    def _query(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        payload = {"embedding_input": [float(v) for v in vector], "modality": "image", "num_images": int(k),
                   "indice_name": self.indice, "deduplicate": False, "use_safety_model": False,
                   "use_violence_detector": False}
        try:
            answer = request_json(self.url, payload, self.policy, retry_500=self._checked_width is not None)
        except RemoteError as exc:
            if self._checked_width is None and "HTTP 500" in str(exc):
                raise InputFormatError(f"{self.public}: the service fails a {len(vector)}-wide image query on "
                                       f"indice {self.indice!r} (HTTP 500): its index holds embeddings of "
                                       "another model (or width); query it with the model that built it") from None
            raise
        if not isinstance(answer, list):
            raise RemoteError(f"{self.public}: the answer is not a list of hits", fatal=True)
        self._checked_width = len(vector)
        return answer

    def search(self, image_emb: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [N, k], ids [N, k]; -1 past the hits the service gave) of each image."""
        x = normalize_rows(image_emb)
        if self._checked_width is None and len(x):
            first = [self._query(x[0], k)]
            rest = list(self._pool_map(lambda v: self._query(v, k), x[1:]))
            answers = first + rest
        else:
            answers = list(self._pool_map(lambda v: self._query(v, k), x))
        sims = np.zeros((len(x), k), np.float32)
        ids = np.full((len(x), k), -1, np.int64)
        self._captions.clear()
        self._trace.clear()
        for i, hits in enumerate(answers):
            for j, hit in enumerate(hits[:k]):
                try:
                    row = int(hit["id"])
                    caption = str(hit["caption"])
                except (KeyError, TypeError, ValueError):
                    raise RemoteError(f"{self.public}: a hit without an id or a caption (columns_to_return must "
                                      "include caption)", fatal=True) from None
                ids[i, j] = row
                sims[i, j] = float(hit.get("similarity", 0.0))
                self._captions[row] = caption
                self._trace[row] = {key: str(hit[key]) for key in ("url", "key") if hit.get(key) is not None}
        return sims, ids

    def _pool_map(self, fn: Callable[[np.ndarray], Any], rows: np.ndarray) -> Any:
        if len(rows) <= 1:
            return [fn(v) for v in rows]
        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            return list(pool.map(fn, rows))

    def captions(self, ids: np.ndarray) -> list[str]:
        """The captions of rows returned by the last search."""
        try:
            return [self._captions[int(i)] for i in np.asarray(ids, np.int64).ravel()]
        except KeyError as exc:
            raise ValueError(f"row {exc} was not returned by the last search of the service") from None

    def caption_embeddings(self, ids: np.ndarray, encode: Callable[[list[str]], np.ndarray] | None = None
                           ) -> np.ndarray:
        flat = np.asarray(ids, np.int64).ravel()
        valid = flat >= 0
        if encode is None:
            raise ValueError("a kNN service corpus encodes its captions: pass encode")
        dim = None
        out: np.ndarray | None = None
        if valid.any():
            unique, back = np.unique(flat[valid], return_inverse=True)
            vecs = np.asarray(encode([CAPTION_TEMPLATE.replace("{caption}", c.strip())
                                      for c in self.captions(unique)]), np.float32)
            dim = vecs.shape[1]
            out = np.zeros((flat.size, dim), np.float32)
            out[valid] = vecs[back]
        if out is None:
            dim = self._checked_width or 1
            out = np.zeros((flat.size, dim), np.float32)
        return out.reshape(*np.shape(ids), -1)

    def sample_images(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        raise CoderIndexError(f"{self.public} is a kNN service: it has no images of its own to calibrate X-MoRe's "
                              "default normaliser on; pass --xmore-normalizer set (the mean over this run's "
                              "images) or running (the released code's running sums)")

    def calibration(self, key: dict[str, Any]) -> None:
        return None

    def keep_calibration(self, key: dict[str, Any], values: tuple[float, float]) -> None:
        return None

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        return {int(i): {"caption": self._captions[int(i)], "source": f"{self.indice}:{int(i)}",
                         **self._trace.get(int(i), {})} for i in ids if int(i) in self._captions}

    def close(self) -> None:
        self._captions.clear()
