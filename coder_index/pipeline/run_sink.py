"""Where a classify run's results go, whatever the source and the engine: one object instead of
closures and a mutable dict.

An engine hands the sink what it computed (rows with their scores and embeddings, the units read to
their end), what could not be classified (final errors) and what could not be read (failures a rerun
retries); the sink writes them to OUT through ``runrecord.OutputRun``, keeps the counts the summary
reports, and moves the progress bar. Rows of one image are written once per run, even when an engine
hands them twice (a Ray task run again after its node died).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coder_index.core.faults import crash_point
from coder_index.pipeline.runrecord import OutputRun
from coder_index.pipeline.sources.base import ItemError, ReadFailure, Sample, UnitDone


@dataclass
class RunCounts:
    classified: int = 0
    image_errors: int = 0        # final errors written by this run (decoding, and inputs skipped before it)
    seen: int = 0                # images read this run (classified or not)
    already_done: int = 0        # this run's inputs OUT held already
    hidden: int = 0
    other_files: int = 0
    special: Counter = field(default_factory=Counter)        # inputs skipped before decoding, by kind
    failures: list[tuple[str, str]] = field(default_factory=list)  # (what, why) this run could not read


class RunSink:
    """The rows, errors, read failures, units done, counts and progress of one run on one OUT."""

    def __init__(self, run: OutputRun, *, names: list[str], method: str, saver: Any = None, bar: Any = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run, self.names, self.method, self.saver, self.bar = run, names, method, saver, bar
        self.on_batch = on_batch
        self.counts = RunCounts()
        self._written: set[str] = set()       # rows of this run (an engine's retried task never doubles one)
        self._failed_units: set[str] = set()
        self._parts: dict[str, set[int]] = {}

    # ------------------------------------------------------------------ from the engines
    def rows(self, samples: list[Sample], ids: np.ndarray | None, scores: np.ndarray | None,
             emb: np.ndarray | None = None, stage1: Any = None, done: list[UnitDone] = ()) -> None:
        """Write the rows of a scored batch (and their embeddings, first), then the units it finished."""
        if samples:
            keep = [i for i, s in enumerate(samples) if s.row not in self._written]
            if len(keep) < len(samples):
                samples = [samples[i] for i in keep]
                ids, scores = ids[keep], scores[keep]  # type: ignore[index]
                emb = emb[keep] if emb is not None else None
                stage1 = (stage1[0][keep], stage1[1][keep]) if stage1 is not None else None
            rows = [s.row for s in samples]
            self._written.update(rows)
        if samples:
            if self.saver is not None:  # embeddings first: a kill never leaves a row without its embedding
                self.saver.append(rows, emb, samples)
            self.run.results.write(prediction_rows(rows, ids, scores, self.names, self.method, stage1))
            crash_point("classify.rows_written")  # tests: killed with these rows written, the run not done
            self.counts.classified += len(samples)
            if self.saver is not None:
                self.saver.commit()
        self.units_done(list(done))

    def errors(self, errors: list[ItemError]) -> None:
        """Final errors: what cannot be classified (written once each)."""
        fresh = [e for e in errors if e.row not in self._written]
        if not fresh:
            return
        self._written.update(e.row for e in fresh)
        self.run.errors.write([(e.row, e.reason) for e in fresh])
        self.counts.image_errors += len(fresh)
        self.counts.special.update(e.kind for e in fresh if e.kind)

    def failures(self, failures: list[ReadFailure]) -> None:
        """What could not be read: rows a rerun retries; the unit they name is not marked done."""
        fresh = [f for f in failures if f.row not in self._failed_units]
        if not fresh:
            return
        self._failed_units.update(f.row for f in fresh)
        self.run.errors.write([(f.row, f.reason) for f in fresh], retry=True)
        self.counts.failures += [(f.row, f.reason) for f in fresh]

    def units_done(self, marks: list[UnitDone]) -> None:
        """Units whose every part was read to its end, with nothing failed: written after their rows."""
        finished = []
        for m in marks:
            self.counts.hidden += m.counts.get("hidden", 0)
            self.counts.other_files += m.counts.get("other", 0)
            parts = self._parts.setdefault(m.unit, set())
            parts.add(m.part)
            if len(parts) == m.parts and m.unit not in self._failed_units:
                finished.append(m.unit)
                del self._parts[m.unit]
        self.run.mark_units_done(finished)

    def seen(self, n: int) -> None:
        """``n`` more images (or inputs that gave an error) handled: the progress bar and callback."""
        if self.bar is not None:
            self.bar.update(n)
        if self.on_batch is not None:
            self.on_batch(self.counts.classified + self.counts.image_errors)

    @property
    def written(self) -> int:
        return self.counts.classified + self.counts.image_errors


def prediction_rows(paths: list[str], ids: np.ndarray, scores: np.ndarray, names: list[str],
                    method: str, stage1: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One output row per image (what .jsonl holds; .csv flattens ``top_k``), best class first.
    ``stage1`` (CODER* rows): CODER's own first class and probability per row, kept as ``stage1``."""
    rows = [{"path": p, "label": names[i[0]], "score": float(s[0]), "method": method,
             "top_k": [{"label": names[c], "score": float(v)} for c, v in zip(i, s, strict=True)]}
            for p, i, s in zip(paths, ids, scores, strict=True)]
    if stage1 is not None:
        for row, c, v in zip(rows, stage1[0], stage1[1], strict=True):
            if c >= 0:
                row["stage1"] = {"label": names[int(c)], "score": float(v)}
    return rows
