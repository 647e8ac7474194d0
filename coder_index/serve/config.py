"""What a server is started with: the index and method, the predictions it browses, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
MAX_FILE_BYTES = 25 * 1024 * 1024     # one uploaded image
MAX_FILES = 32                        # images per request
MAX_PIXELS = 40_000_000               # width x height of one image, read from its header before decoding
MAX_BATCH = 64                        # images encoded together across concurrent requests


@dataclass(frozen=True)
class ServeConfig:
    index: Path
    device: str | None = None
    model: str | None = None               # refuse to serve unless the index was built with this model
    pretrained: str | None = None          # (TextIndex.require_model)
    top_k: int = 5
    method: str = "coder"                  # coder | xmore | coder+xmore (the latter two need corpus)
    rerank: bool = False                   # CODER*, with the pair texts stored in the index
    gap_threshold: float | str | None = None  # or "preset": the released threshold of the index's dataset
    adapter: Path | None = None
    corpus: Path | None = None
    retrieve_k: int = 16
    xmore_normalizer: str | None = None    # corpus | set | running (None: the index's default)
    xmore_retrieval: str | None = None     # nearest | released (None: the index's default)
    token: str | None = field(default=None, repr=False)  # every request must carry it (serve/auth.py)
    explain_k: int = 10                    # nearest texts per explanation, unless the request asks for another
    predictions: Path | None = None        # a classify output (.csv or .jsonl) to browse
    images_root: Path | None = None        # the folder its paths are relative to: the only images served
    report: Path | None = None             # an `eval --out` folder (report.json, tsne.png)
    max_file_bytes: int = MAX_FILE_BYTES
    max_files: int = MAX_FILES
    max_pixels: int = MAX_PIXELS
    max_batch: int = MAX_BATCH
    header_timeout: float = 10.0           # seconds for a request's line and headers (slow senders cut off)
    body_timeout: float = 120.0            # seconds for a request's whole body
    max_connections: int = 256             # open connections at once; one more is closed at once

    @property
    def max_request_bytes(self) -> int:
        """A whole multipart body: every file at its limit, plus room for the form's headers."""
        return self.max_files * self.max_file_bytes + 1024 * 1024

    def check(self) -> None:
        if self.images_root is not None and self.predictions is None:
            raise ValueError("--images-root serves the images of a predictions file: add --predictions FILE")
        if self.images_root is not None and not Path(self.images_root).is_dir():
            raise NotADirectoryError(f"--images-root {self.images_root} is not a directory")
        if self.predictions is not None and not Path(self.predictions).is_file():
            raise FileNotFoundError(f"--predictions {self.predictions} does not exist (or is not a file)")
        if self.report is not None and not (Path(self.report) / "report.json").is_file():
            raise FileNotFoundError(f"--report {self.report} holds no report.json: give the folder passed to "
                                    "`coder-index eval --out`")
        for name in ("max_file_bytes", "max_files", "max_pixels", "max_batch", "top_k", "explain_k", "header_timeout",
                     "body_timeout", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
