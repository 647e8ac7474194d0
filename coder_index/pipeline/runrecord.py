"""Who owns an output file, and where its rows came from.

    OUT               the predictions (.csv or .jsonl)
    OUT.errors.csv    what produced no prediction (p.csv -> p.csv.errors.csv: two outputs that
                      differ by their extension never share it); rows marked ``retry`` (what could
                      not be read) are dropped when a run starts, and read again
    OUT.run.json      provenance: index (id, text generation, recipe), model, method, top-k, and the
                      rerank / adapter / corpus settings; plus state a resumed run must reuse (the
                      X-MoRe normalisers); and inputs: what each run read (its working directory,
                      the folder or the shards' public names), so that explain and serve find
                      every row's image without a guess
    OUT.lock          held while a run writes (pid and command inside)
    OUT.units-done    units of many images (shards, parquet row groups) read to their end with
                      nothing left unread, one name per line, each written after the rows of its
                      images: a resumed run does not open them again (``OUT.shards-done``, its
                      name before coder-index 0.5, is read too)

A second run on the same OUT is refused at once, naming the running process. A rerun with other
settings is refused with what differs, so a resumed file never mixes rows of different settings;
``--overwrite`` starts afresh, another ``--out`` keeps both.
"""

from __future__ import annotations

import json
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from coder_index.core.atomic import atomic_write_json, translate_disk_full
from coder_index.core.atomic import check_writable as _check_writable
from coder_index.core.errors import InputFormatError
from coder_index.core.locking import FileLock
from coder_index.pipeline.output import ErrorWriter, ResultWriter, errors_path_for, legacy_errors_path

FORMAT = "coder-index/predictions"
IGNORED = {"index.path"}  # an index moved or copied elsewhere is still the same index


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def units_done_path(out: Path) -> Path:
    return out.with_name(out.name + ".units-done")


def legacy_units_done_path(out: Path) -> Path:
    return out.with_name(out.name + ".shards-done")


def check_writable(out: Path) -> None:
    """Fail before anything expensive if OUT cannot be written, naming the path."""
    _check_writable(Path(out), "--out")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


# provenance keys as the options that set them
_OPTIONS = (("top_k", "--top-k"), ("method", "the method (--rerank/--adapter/--method)"), ("index.model", "the model"),
            ("index", "--index"), ("rerank.gap_threshold", "--gap-threshold"), ("rerank", "--rerank"),
            ("adapter", "--adapter"), ("corpus", "--corpus"), ("retrieve_k", "--retrieve-k"),
            ("normalizers", "X-MoRe's normalisers (the corpus or the index changed)"),
            ("normalizer", "--xmore-normalizer"), ("retrieval", "--xmore-retrieval"))


def _label(key: str) -> str:
    for prefix, option in _OPTIONS:
        if key == prefix or key.startswith(prefix + "."):
            return f"{option} ({key})" if key != prefix else option
    return key


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{_label(k)}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b))
            if k not in IGNORED and a.get(k) != b.get(k)]


class OutputRun:
    """The writers of one OUT, its lock and its provenance, for the length of a run."""

    def __init__(self, out: str | Path, top_k: int, provenance: dict[str, Any], *, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.top_k = top_k
        self.provenance = {"format": FORMAT, "version": 1, **provenance}
        self.overwrite = overwrite
        self.state: dict[str, Any] = {}
        self.inputs: list[dict[str, Any]] = []
        self._lock = FileLock(lock_path(self.out), f"--out {self.out}", remove=True)
        self.results: ResultWriter | None = None
        self.errors: ErrorWriter | None = None
        self.earlier = {"rows": 0, "errors": 0}  # what the files held before this run
        self.retried: list[str] = []  # rows of earlier runs that could not be read: tried again
        self._created_record = False

    def __enter__(self) -> OutputRun:
        ResultWriter(self.out, self.top_k)  # the file name is checked before anything else
        check_writable(self.out)
        for p in (errors_path_for(self.out), sidecar_path(self.out), lock_path(self.out), units_done_path(self.out),
                  legacy_units_done_path(self.out)):
            if p.exists() and not p.is_file():
                raise InputFormatError(f"{p} exists and is not a regular file (a FIFO, socket, device or directory); "
                                       "remove it or choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            with translate_disk_full(self.out):
                self._claim()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _claim(self) -> None:
        side = sidecar_path(self.out)
        err = errors_path_for(self.out)
        if self.overwrite:
            for p in (self.out, err, side, units_done_path(self.out), legacy_units_done_path(self.out)):
                p.unlink(missing_ok=True)
        else:
            self._adopt_legacy_errors(err)
        holding = [p for p in (self.out, err) if p.exists() and p.stat().st_size > 0]
        if side.exists():
            try:
                saved = json.loads(side.read_text(encoding="utf-8"))
                if not isinstance(saved, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise InputFormatError(f"{side} is damaged ({exc}); rerun with --overwrite to start afresh, or "
                                       "choose another --out") from None
            diff = differences(saved.get("provenance", {}), self.provenance)
            if diff:
                raise InputFormatError(
                    f"{self.out} holds rows made with other settings ({'; '.join(diff[:6])}). Resuming would mix "
                    "them: rerun with --overwrite to start afresh, or choose another --out to keep both")
            self.state = saved.get("state", {})
            self.inputs = [i for i in saved.get("inputs", []) if isinstance(i, dict)]
        elif holding:
            what = " and ".join(str(p) for p in holding)
            raise InputFormatError(f"{what} {'hold' if len(holding) > 1 else 'holds'} rows of an unknown run (no "
                                   f"{side.name} beside {'them' if len(holding) > 1 else 'it'}); rerun with "
                                   f"--overwrite to start afresh (it deletes {what}), or choose another --out")
        else:
            self._save()
            self._created_record = True  # removed at the end if the run wrote nothing at all
        self.results = ResultWriter(self.out, self.top_k, stage1=self.provenance.get("method") == "coder*")
        self.errors = ErrorWriter(err)
        self.retried = self.errors.drop_retried()  # what could not be read before is read again

    def _adopt_legacy_errors(self, err: Path) -> None:
        """A run begun by coder-index 0.2 listed its errors in ``p.errors.csv``; take that file over
        when it can only be this output's (this OUT has a run record, no sibling output has one)."""
        legacy = legacy_errors_path(self.out)
        if legacy == err or err.exists() or not legacy.is_file() or not sidecar_path(self.out).is_file():
            return
        siblings = [p for p in self.out.parent.glob(glob_escape(self.out.stem) + ".*.run.json")
                    if p != sidecar_path(self.out)]
        if not siblings:
            legacy.rename(err)

    def _save(self) -> None:
        atomic_write_json(sidecar_path(self.out), {"provenance": self.provenance, "state": self.state,
                                                   "inputs": self.inputs})

    def record_inputs(self, inputs: dict[str, Any]) -> None:
        """Note what this run reads (a resumed run from elsewhere adds its own), before any row."""
        if inputs not in self.inputs:
            self.inputs.append(inputs)
            with translate_disk_full(self.out):
                self._save()

    def save_state(self, **state: Any) -> None:
        """Persist what a resumed run must reuse (e.g. X-MoRe's normalisers)."""
        self.state.update(state)
        with translate_disk_full(self.out):
            self._save()

    def done_paths(self) -> set[str]:
        """Paths with a row or an error already; also counts them (``earlier``) for the summary."""
        assert self.results is not None and self.errors is not None
        rows, errors = self.results.done_paths(), self.errors.done_paths()
        self.earlier = {"rows": len(rows), "errors": len(errors)}
        return rows | errors

    def units_done(self) -> set[str]:
        """Units of many images an earlier run read to their end (their rows and errors are in OUT)."""
        done: set[str] = set()
        for path in (units_done_path(self.out), legacy_units_done_path(self.out)):
            if path.is_file():
                lines = path.read_bytes().split(b"\n")
                done |= {ln.decode("utf-8", "surrogateescape") for ln in lines[:-1] if ln}  # a cut last line is not one
        return done

    def mark_units_done(self, names: list[str]) -> None:
        """Record units read to their end (call after their rows are written): appended and fsynced."""
        if not names:
            return
        import os

        with translate_disk_full(self.out), open(units_done_path(self.out), "ab") as f:
            f.write("".join(n + "\n" for n in names).encode("utf-8", "surrogateescape"))
            f.flush()
            os.fsync(f.fileno())

    def __exit__(self, *exc: Any) -> None:
        try:
            for w in (self.results, self.errors):
                if w is not None:
                    w.close()
            self._drop_record_of_nothing()
        finally:
            self._lock.release()

    def _drop_record_of_nothing(self) -> None:
        """A run that wrote no row, no error and no unit done (refused before its first row, or given
        nothing to read) leaves no run record behind: the next run starts afresh, with any settings."""
        if not self._created_record:
            return
        written = [p for p in (self.out, errors_path_for(self.out), units_done_path(self.out))
                   if p.exists() and p.stat().st_size > 0]
        if not written:
            sidecar_path(self.out).unlink(missing_ok=True)
