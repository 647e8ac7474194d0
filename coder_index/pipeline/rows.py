"""A row of a predictions file, back to what made it: the image's bytes and the method's settings.

``classify`` names each row after what it read: ``FOLDER/relative/path``, a listed file as given, a
URL, ``SHARD/KEY`` for a webdataset sample (the shard a local path, a URL or a ``.tar.gz``), or
``FILE.parquet/KEY`` for a parquet row. The run
record (``OUT.run.json``) holds the settings that made the rows, the state a method kept (X-MoRe's
normalisers) and, since 0.4, what classify read and from which working directory (``inputs``).

``explain --predictions OUT --row N`` and ``serve --predictions OUT`` read images through here, so that
every row can be explained and shown, whatever classify read. A row is data: a ``pipe:`` command
named by a row is never run (a predictions file may come from anyone).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coder_index.core.decode import ImageDecodeError
from coder_index.core.errors import InputFormatError
from coder_index.core.remote import RemoteError, fetch_bytes, is_remote, is_url, local_path
from coder_index.pipeline.runrecord import sidecar_path
from coder_index.pipeline.sources.lookup import container_image, split_container_row
from coder_index.pipeline.sources.parquet import ParquetOptions

MAX_IMAGE_BYTES = 256 << 20


@dataclass
class RunRecord:
    """What ``OUT.run.json`` says: the settings that made the rows, a method's saved state, and the
    inputs classify read (working directory, kind, folders or shards), when it recorded them."""

    out: Path
    provenance: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, out: str | Path) -> RunRecord:
        out = Path(out)
        side = sidecar_path(out)
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputFormatError(f"{side} does not exist: --predictions takes a file `coder-index classify` "
                                   "wrote (its run record lies beside it)") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputFormatError(f"{side} is damaged ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict):
            raise InputFormatError(f"{side} is not a coder-index run record")
        inputs = data.get("inputs") if isinstance(data.get("inputs"), list) else []
        return cls(out, data["provenance"], data.get("state") or {}, [i for i in inputs if isinstance(i, dict)])

    @property
    def method(self) -> str:
        return str(self.provenance.get("method", "coder"))

    def spec(self) -> dict[str, Any]:
        """The ``ScorerSpec`` fields of the method that made the rows."""
        p = self.provenance
        out: dict[str, Any] = {"method": "coder"}
        m = self.method
        if m == "coder*":
            out["rerank"] = True
            out["gap_threshold"] = (p.get("rerank") or {}).get("gap_threshold")
        elif m == "coder-adapter":
            out["adapter"] = (p.get("adapter") or {}).get("path")
        elif m in ("xmore", "coder+xmore"):
            # a run recorded before 0.5 normalised over its set (its normalisers are in its state)
            out.update(method=m, corpus=(p.get("corpus") or {}).get("path"), retrieve_k=int(p.get("retrieve_k", 16)),
                       normalizer=str(p.get("normalizer", "set")), retrieval=str(p.get("retrieval", "nearest")))
        if p.get("candidates"):
            out["candidates"] = int(p["candidates"])
        return out

    def working_dirs(self) -> list[Path]:
        """Where classify ran (rows of listed files and shards are relative to it), newest first."""
        dirs = [Path(i["cwd"]) for i in reversed(self.inputs) if isinstance(i.get("cwd"), str)]
        return list(dict.fromkeys(dirs))

    def roots(self) -> list[Path]:
        """The folders classify read (absolute), for a folder run."""
        out = []
        for i in self.inputs:
            for f in i.get("folders", []) if isinstance(i.get("folders"), list) else []:
                if isinstance(f, str):
                    out.append(Path(f))
        return list(dict.fromkeys(out))

    def shards(self) -> set[str]:
        """The public names of the containers classify read (shards, parquet files)."""
        return {s for i in self.inputs for key in ("shards", "files") for s in (i.get(key) or [])
                if isinstance(s, str)}

    def parquet_options(self) -> ParquetOptions:
        """The columns a parquet run was told to read (its rows are found by them)."""
        given = next((i for i in self.inputs if i.get("kind") == "parquet"), {})
        return ParquetOptions(**{k: given.get(k) for k in ("image_column", "key_column", "label_column")
                                 if isinstance(given.get(k), str)})


def predictions_rows(out: str | Path, numbers: list[int]) -> list[str]:
    """The paths of rows ``numbers`` (1-based, in the file's order) of a predictions file, read by the
    one reader (``predictions_file``: a name that is not UTF-8 comes back as it was written)."""
    from coder_index.pipeline.predictions_file import read_rows

    out = Path(out)
    wanted = set(numbers)
    found: dict[int, str] = {}
    count = 0
    for count, row in enumerate(read_rows(out, paths_only=True), 1):
        if count in wanted:
            found[count] = row.path
    missing = sorted(wanted - set(found))
    if missing:
        raise InputFormatError(f"{out} has no row {missing[0]} (rows are numbered from 1; it holds {count})")
    return [found[n] for n in numbers]


def split_shard_row(row: str) -> tuple[str, str] | None:
    """(container, key) of a ``SHARD/KEY`` or ``FILE.parquet/KEY`` row (``sources.lookup``)."""
    return split_container_row(row)


def row_bytes(row: str, cwd: Path | None = None, parquet: ParquetOptions | None = None) -> bytes:
    """The image bytes of a row (a file, a URL, a shard's sample or a parquet row), or
    ``ImageDecodeError`` naming why not. ``cwd``: the directory classify ran in (relative rows are
    relative to it); ``parquet``: the columns of a parquet run."""
    from coder_index.core.untrusted import NotARegularFile, open_regular_file

    if row.startswith("pipe:"):
        raise ImageDecodeError("read from a pipe: command, which is never run again from a row (a predictions "
                               "file is data); classify the image as a file to explain it")
    if is_url(row) and not split_shard_row(row):
        try:
            return fetch_bytes(row, max_bytes=MAX_IMAGE_BYTES)
        except RemoteError as exc:
            raise ImageDecodeError(str(exc)) from None
    base = Path(cwd) if cwd is not None else Path.cwd()
    path = Path(local_path(row))
    full = path if path.is_absolute() else base / path
    if os.path.lexists(full) or not split_shard_row(row):
        try:
            with open_regular_file(full) as f:
                return f.read(MAX_IMAGE_BYTES + 1)
        except (NotARegularFile, IsADirectoryError):
            raise ImageDecodeError("not a regular file") from None
        except FileNotFoundError:
            raise ImageDecodeError("file not found (moved or deleted since it was classified?)") from None
        except OSError as exc:
            raise ImageDecodeError(f"could not be read: {exc.strerror or exc}") from None
    container, key = split_shard_row(row)  # type: ignore[misc]
    if not is_remote(container):
        local = Path(local_path(container))
        container = str(local if local.is_absolute() else base / local)
    return container_image(container, key, parquet)


def run_scorer(index: Any, record: RunRecord | str | Path, *, top_k: int = 5, note: Any = None) -> Any:
    """The scorer that made a run's rows, over ``index``: the run's method and settings (its rerank
    gate, adapter, corpus and K) and, for X-MoRe over a set, the normalisers its record kept. Every
    view of a row uses it (``explain --predictions``, ``serve``'s rows, the Python API:
    ``index.explain(images, scorer=run_scorer(index, "preds.csv"))``), so each shows the row's own
    numbers. ``record``: a ``RunRecord`` or the predictions file."""
    from dataclasses import replace

    from coder_index.core.presets import resolve_gap_threshold
    from coder_index.methods.scorer_spec import ScorerSpec, build_scorer

    if not isinstance(record, RunRecord):
        record = RunRecord.load(record)
    made_with = record.provenance.get("index", {}).get("index_id")
    if made_with not in (None, index.index_id):
        raise InputFormatError(f"{record.out} was classified against another index than {index.path}: read its rows "
                               "with that index")
    given = record.spec()
    spec = ScorerSpec(top_k=min(top_k, len(index.class_names())),
                      **{k: v for k, v in given.items() if k != "gap_threshold"})
    spec = replace(spec, gap_threshold=resolve_gap_threshold(given.get("gap_threshold"), index.recipe))
    scorer = build_scorer(index, spec, note=note)
    if scorer.two_pass and "normalizers" in record.state:  # X-MoRe over its set: the run's own normalisers
        scorer.prepare(None, record.state)
    if getattr(scorer, "normalizer", None) == "running" and note is not None:
        note("these rows were scored with X-MoRe's running normaliser (--xmore-normalizer running), which depends "
             "on the order of their run: an image is explained on its own")
    return scorer
