"""`coder-index verify`: check everything an index's correctness rests on, say what is wrong and how
to repair it.

Checked: the manifest (shape, and agreement with meta.sqlite), meta.sqlite (SQLite's integrity check,
tables, state records), each vector file (FAISS type and width, size, counts, the full sha256
against the one recorded at its last write, the id set against the SQLite rows), interrupted writes
and temp files left by killed writers, and the model (its weights' fingerprint, and a sample of
stored vectors re-encoded from their texts).

``repair`` fixes what can be fixed without losing anything: the manifest is rewritten from
meta.sqlite, an interrupted write is finished or discarded, stale temp files are removed. Damaged
vector files or a damaged meta.sqlite cannot be repaired from the index alone: the fix is a rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text

from coder_index.core.atomic import atomic_write_json, is_temp_name
from coder_index.core.errors import CoderIndexError
from coder_index.stores import schema
from coder_index.stores.faissfile import VectorFileError, digest, read_info
from coder_index.stores.text_index import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_DB,
    META_DIGEST,
    VECTOR_FILES,
    TextStore,
    index_lock,
    metadata_digest,
    now_iso,
    pending_name,
    read_manifest,
    rebuild_fix,
    record_metadata_digest,
    recover_interrupted_writes,
)


@dataclass
class Problem:
    file: str
    what: str
    fix: str


@dataclass
class VerifyReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_index(path: str | Path, *, check_model: bool = True, repair: bool = False,
                 device: str | None = None) -> VerifyReport:
    path = Path(path)
    rep = VerifyReport(str(path))
    if not path.is_dir():
        rep.problems.append(Problem(str(path), "not a directory",
                                    "pass an index directory made by `coder-index build`"))
        return rep
    meta = path / META_DB
    state = _check_sqlite(meta, rep)
    if state is None:
        return rep
    _check_metadata_digest(path, state, rep, repair)
    _check_manifest(path, state, rep, repair)
    if repair:
        _finish_interrupted_writes(path, state, rep)
    engine = schema.make_engine(meta, read_only=True)
    try:
        for vf in VECTOR_FILES:
            _check_vector_file(path, vf, state, engine, rep)
    finally:
        engine.dispose()
    leftovers = [p.name for p in path.iterdir() if is_temp_name(p.name) or ".faiss.g" in p.name]
    if leftovers:
        rep.notes.append(f"files of interrupted writes: {', '.join(sorted(leftovers)[:5])} (harmless; "
                         "`--repair` or the next write removes them)")
    if check_model and rep.ok:
        _check_model(path, device, rep)
    return rep


def _check_sqlite(meta: Path, rep: VerifyReport) -> dict[str, str] | None:
    path = meta.parent
    if not meta.is_file():
        rep.problems.append(Problem(str(meta), "missing: the texts and their ids are gone", rebuild_fix(path)))
        return None
    engine = schema.make_engine(meta, read_only=True)
    try:
        with engine.connect() as conn:
            result = conn.execute(text("PRAGMA integrity_check")).scalar()
            if result != "ok":
                rep.problems.append(Problem(str(meta), f"SQLite integrity check failed: {result}",
                                            rebuild_fix(path)))
                return None
            tables = {r[0] for r in conn.execute(text("select name from sqlite_master where type = 'table'"))}
            missing = {"classes", "texts", "pair_texts", "state", "runs"} - tables
            if missing:
                rep.problems.append(Problem(str(meta), f"tables {sorted(missing)} are missing", rebuild_fix(path)))
                return None
            state = dict(conn.execute(select(schema.state.c.key, schema.state.c.value)).all())
    except (sa_exc.DBAPIError, CoderIndexError) as exc:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        rep.problems.append(Problem(str(meta), f"cannot be read: {reason}", rebuild_fix(path)))
        return None
    finally:
        engine.dispose()
    needed = ["generation", "pairs_generation", "dim", "index_id", "model", "text_recipe",
              *(vf.fingerprint_key for vf in VECTOR_FILES)]
    absent = [k for k in needed if k not in state]
    if absent:
        rep.problems.append(Problem(str(meta), f"state records {absent} are missing", rebuild_fix(path)))
        return None
    rep.checked.append(f"{META_DB}: integrity check ok, tables and state records present")
    return state


def _check_metadata_digest(path: Path, state: dict[str, str], rep: VerifyReport, repair: bool) -> None:
    """The classes, kinds and weights of the texts against the digest recorded at the last write."""
    meta = path / META_DB
    engine = schema.make_engine(meta, read_only=True)
    try:
        with engine.connect() as conn:
            now = metadata_digest(conn)
    except (sa_exc.DBAPIError, CoderIndexError) as exc:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        rep.problems.append(Problem(str(meta), f"its rows cannot be read: {reason}", rebuild_fix(path)))
        return
    finally:
        engine.dispose()
    recorded = state.get(META_DIGEST)
    if recorded == now:
        rep.checked.append(f"{META_DB}: classes, kinds and weights of the texts equal the digest of the last write")
    elif recorded is not None:
        rep.problems.append(Problem(str(meta), "the classes, kinds or weights of its texts are not those recorded at "
                                               "its last write (edited or damaged outside coder-index)",
                                    rebuild_fix(path)))
    elif repair:
        writer = schema.make_engine(meta, journal="DELETE")
        try:
            with index_lock(path), writer.begin() as conn:
                record_metadata_digest(conn)
        finally:
            writer.dispose()
        rep.repaired.append(f"{META_DB}: digest of the texts' classes, kinds and weights recorded (the index was "
                            "written by an older coder-index)")
    else:
        rep.notes.append(f"{META_DB} records no digest of its texts' classes, kinds and weights (written by an older "
                         f"coder-index): `coder-index verify {path} --repair` records one, so that edits are found")


def manifest_from_state(path: Path, state: dict[str, str]) -> dict[str, Any]:
    model = json.loads(state["model"])
    engine = schema.make_engine(path / META_DB, read_only=True)
    try:
        with engine.connect() as conn:
            n_classes = conn.execute(text("select count(*) from classes")).scalar()
            per_kind = dict(conn.execute(text("select kind, count(*) from texts group by kind")).all())
            n_pairs = conn.execute(text("select count(*) from pair_texts")).scalar()
    finally:
        engine.dispose()
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "index_id": state["index_id"], "created_at": None,
            "model": model,
            "dim": int(state["dim"]), "metric": "inner_product (cosine on L2-normalised vectors)",
            "files": {"texts": "texts.faiss", "pairs": "pairs.faiss", "metadata": META_DB},
            "texts": json.loads(state["text_recipe"]),
            "counts": {"classes": int(n_classes), "texts": per_kind, "pair_texts": int(n_pairs)},
            "updated_at": now_iso(), "repaired_at": now_iso()}


def _check_manifest(path: Path, state: dict[str, str], rep: VerifyReport, repair: bool) -> None:
    problem = None
    try:
        manifest = read_manifest(path)
        if manifest["model"] != json.loads(state["model"]) or manifest["dim"] != int(state["dim"]):
            problem = "names another model or width than meta.sqlite records"
    except CoderIndexError as exc:
        problem = str(exc).split("; `coder-index verify")[0]
    if problem is None:
        rep.checked.append(f"{MANIFEST}: valid, agrees with {META_DB}")
        return
    if repair:
        with index_lock(path):
            atomic_write_json(path / MANIFEST, manifest_from_state(path, state))
        rep.repaired.append(f"{MANIFEST} rewritten from {META_DB} (it was: {problem})")
        return
    rep.problems.append(Problem(str(path / MANIFEST), problem,
                                f"`coder-index verify {path} --repair` rewrites it from {META_DB}"))


def _finish_interrupted_writes(path: Path, state: dict[str, str], rep: VerifyReport) -> None:
    with index_lock(path):
        acted = recover_interrupted_writes(path, state)
    if acted:
        rep.repaired.append(f"interrupted writes finished or discarded: {', '.join(sorted(acted)[:5])}")


def _check_vector_file(path: Path, vf: Any, state: dict[str, str], engine: Any, rep: VerifyReport) -> None:
    generation = int(state[vf.state_key])
    pending = path / pending_name(vf, generation)
    p = pending if pending.is_file() else path / vf.file
    where = str(path / vf.file)
    recorded = json.loads(state[vf.fingerprint_key])
    try:
        info = read_info(p)
    except VectorFileError as exc:
        rep.problems.append(Problem(where, str(exc), rebuild_fix(path)))
        return
    dim = int(state["dim"])
    if info.dim != dim:
        rep.problems.append(Problem(where, f"vectors of width {info.dim}; the model's is {dim}",
                                    rebuild_fix(path)))
        return
    with engine.connect() as conn:
        ids = np.array([r[0] for r in conn.execute(select(vf.table.c.id).order_by(vf.table.c.id))], dtype=np.int64)
    if info.ntotal != len(ids):
        rep.problems.append(Problem(where, f"{info.ntotal} vectors but {META_DB} has {len(ids)} rows",
                                    rebuild_fix(path)))
        return
    full = digest(p, info, full=True)
    if info.size != recorded.get("size") or full != recorded.get("sha256"):
        rep.problems.append(Problem(where, "its content differs from the checksum recorded at its last write "
                                           "(copied from another index, or changed)", rebuild_fix(path)))
        return
    file_ids = np.fromfile(p, dtype=np.int64, count=info.ntotal, offset=info.ids_offset)
    if not np.array_equal(np.sort(file_ids), ids):
        rep.problems.append(Problem(where, "its ids are not the ids of the SQLite rows", rebuild_fix(path)))
        return
    note = " (read from the committed pending file of an interrupted write)" if p == pending else ""
    rep.checked.append(f"{vf.file}: IndexIDMap2(IndexFlatIP), width {dim}, {info.ntotal} vectors, sha256 "
                       f"{full[:12]}…, ids equal to {META_DB}'s{note}")


def _check_model(path: Path, device: str | None, rep: VerifyReport) -> None:
    try:
        index = TextStore.open(path, device=device)
        encoder = index.encoder  # loads the index's model and compares its weights' fingerprint
    except CoderIndexError as exc:
        rep.notes.append(f"model not checked: {exc}")
        return
    table = index.text_table()
    if len(table) == 0:
        rep.checked.append(f"model: {index.fingerprint.describe()} (no texts to re-encode)")
        return
    sample = np.unique(np.linspace(0, len(table) - 1, min(16, len(table))).astype(int))
    rows = index.texts_by_id(table.ids[sample])
    again = encoder.encode_texts([rows[int(i)]["text"] for i in table.ids[sample]])
    cos = np.sum(again * table.embeddings[sample], axis=1)
    if cos.min() < 0.999:
        bad = int(np.argmin(cos))
        rep.problems.append(Problem(str(path / "texts.faiss"), f"stored vectors are not this model's embeddings of "
                                    f"their texts (text {int(table.ids[sample][bad])}: cosine {cos[bad]:.4f})",
                                    rebuild_fix(path)))
        return
    rep.checked.append(f"model: {index.fingerprint.describe()}; {len(sample)} stored vectors re-encoded from their "
                       f"texts (cosine >= {cos.min():.6f})")
