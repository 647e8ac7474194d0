"""``TextStore``: one directory holding a vocabulary's texts, their CLIP embeddings and metadata.

The store only stores. ``coder_index.TextIndex`` (``methods.text_index``) is this store with the
methods attached (classify, explain, nearest texts, pair texts for the rerank).

    INDEX_DIR/
      manifest.json   format version, CLIP model fingerprint, dim, counts (written last: its
                      presence marks a complete index)
      texts.faiss     IndexIDMap2(IndexFlatIP): general texts, ids = meta.sqlite texts.id
      pairs.faiss     the same for one-to-one pair texts, ids = meta.sqlite pair_texts.id
      meta.sqlite     classes, texts, pair_texts, state (FAISS generations and fingerprints, the
                      model, the text recipe), runs
      .lock           the writers' lock

Every write (creation included) happens under the directory's exclusive lock, and every check of
the directory's state is made after the lock is taken. One write (``add_texts``,
``add_pair_texts``) to a vector file F:

1. write the new FAISS index to ``F.g<G+1>`` and fsync it;
2. insert the rows, set F's generation to G+1 and record the new file's size and digests, in one
   SQLite transaction;
3. rename ``F.g<G+1>`` over ``F``.

A crash before 2 leaves a pending file that is not committed: ignored by readers, deleted by the
next writer. A crash between 2 and 3 leaves a pending file whose generation is the committed one:
readers read it, the next writer renames it. FAISS ids and SQLite rows therefore never disagree,
and opening an index for reading never creates or modifies a file.

``open`` checks at once what is cheap: the manifest, the SQLite state, each vector file's type,
width, count and exact size, and a quick digest (headers, ids, sampled vector pages) against the
recorded one. ``verify`` (``coder-index verify``) adds the full sha256, the id sets and the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select

from coder_index.core.atomic import (
    atomic_write_json,
    fsync_dir,
    is_temp_name,
    remove_stale_temps,
    translate_disk_full,
    write_faiss_durably,
)
from coder_index.core.errors import IndexFormatError
from coder_index.core.faults import crash_point, pause_point
from coder_index.core.locking import FileLock
from coder_index.core.records import AddResult, TextItem, TextTable
from coder_index.core.validation import TEXT_KINDS, as_float_matrix, l2_normalize
from coder_index.model.index_model import IndexModel
from coder_index.stores import schema
from coder_index.stores.faissfile import VectorFileError, digest, fingerprint, open_matrix, read_info, write_matrix
from coder_index.stores.text_encoding import CachedTextEncoding
from coder_index.stores.textcache import TextEmbeddingCache, TextEncodeStats

if TYPE_CHECKING:
    from coder_index.core.presets import TextRecipe
    from coder_index.model.encoder import ClipEncoder, ModelFingerprint

log = logging.getLogger(__name__)
FORMAT = "coder-index/text-index"
FORMAT_VERSION = 2  # 2: text weights, the text recipe, the model and vector-file fingerprints in the state table
MANIFEST = "manifest.json"
TEXTS_FAISS = "texts.faiss"
PAIRS_FAISS = "pairs.faiss"
META_DB = "meta.sqlite"
LOCK = ".lock"
# An index's writers take turns: the slow part of a write (encoding) happens before the lock, so a
# writer holds it for the file write and the commit only; a waiter gives up after this, naming it.
INDEX_LOCK_WAIT = 600.0
REBUILD = ("rebuild it with `coder-index build INDEX_DIR --overwrite` and the options it was built with (or restore "
           "the directory from a backup)")


def rebuild_fix(path: str | Path) -> str:
    """The fix for a damaged index, with its path: a command that works when followed literally
    (the options are the ones the index was built with)."""
    return REBUILD.replace("INDEX_DIR", str(path))


META_DIGEST = "meta_digest"  # state key: sha256 of what decides a prediction (see ``metadata_digest``)


def metadata_digest(conn: Any, on_damage: Any = None) -> str:
    """sha256 of everything in meta.sqlite that decides a prediction: each class's id and name, each
    text's id, class, kind and weight, each pair text's id, classes and weight. Recorded in the
    transaction of every write, checked when an index is opened (about 1.5 s at a million texts,
    milliseconds at ten thousand) and by ``verify``: metadata edited or damaged outside coder-index is
    named, never answered from."""
    h = hashlib.sha256()
    kinds = " ".join(f"WHEN '{k}' THEN {i + 1}" for i, k in enumerate(TEXT_KINDS))
    # the DBAPI cursor of this connection (its transaction): plain tuples, which numpy reads ~20x faster
    # than SQLAlchemy's Row objects
    import sqlite3

    cur = conn.connection.dbapi_connection.cursor()
    try:
        cur.execute("SELECT id, name FROM classes ORDER BY id")
        while block := cur.fetchmany(100_000):
            h.update(np.array([r[0] for r in block], dtype=np.int64).tobytes())
            h.update("".join(f"{r[1]}\x00" for r in block).encode("utf-8", "surrogatepass"))
        for sql in (f"SELECT id, class_id, weight, CASE kind {kinds} ELSE -1 END FROM texts ORDER BY id",
                    "SELECT id, class_a, class_b, weight FROM pair_texts ORDER BY id"):
            h.update(b"|")
            cur.execute(sql)
            while block := cur.fetchmany(200_000):
                h.update(np.array(block, dtype=np.int64).tobytes())
    except sqlite3.DatabaseError as exc:  # the raw cursor is not SQLAlchemy's: damage is named here
        reason = schema.damaged_reason(exc)
        if reason is None:
            raise
        raise (on_damage(reason) if on_damage else
               IndexFormatError(f"meta.sqlite is damaged ({reason}); {REBUILD}")) from None
    finally:
        cur.close()
    return h.hexdigest()


def record_metadata_digest(conn: Any, on_damage: Any = None) -> None:
    """Store the digest of the rows this transaction sees (its own writes included)."""
    conn.execute(insert(schema.state).prefix_with("OR REPLACE"),
                 {"key": META_DIGEST, "value": metadata_digest(conn, on_damage)})


@dataclass(frozen=True)
class VectorFile:
    """A FAISS file of the index with its SQLite table and generation counter."""

    file: str
    state_key: str
    table: Any

    @property
    def fingerprint_key(self) -> str:
        return f"file:{self.file}"


TEXT_VECTORS = VectorFile(TEXTS_FAISS, "generation", schema.texts)
PAIR_VECTORS = VectorFile(PAIRS_FAISS, "pairs_generation", schema.pair_texts)
VECTOR_FILES = (TEXT_VECTORS, PAIR_VECTORS)


def index_lock(path: Path) -> FileLock:
    """The lock an index's writers take turns on (``INDEX/.lock``)."""
    return FileLock(Path(path) / LOCK, f"the index {path}", wait=INDEX_LOCK_WAIT)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _empty_faiss(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def pending_name(vf: VectorFile, generation: int) -> str:
    return f"{vf.file}.g{generation}"


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked for shape; IndexFormatError with the file and the fix otherwise."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise IndexFormatError(f"{path} is not a directory; pass an index directory made by `coder-index build`")
    others = {"coder-index/corpus": "an image-text corpus, not a text index: pass it as --corpus",
              "coder-index/adapter": "a few-shot adapter, not a text index: pass it as --adapter"}
    if not mpath.is_file():
        hint = f" (this is {others['coder-index/corpus']})" if (path / "corpus.faiss").exists() else ""
        raise IndexFormatError(f"{path} is not a coder-index index (no {MANIFEST}){hint}; create one with "
                               "`coder-index build`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise IndexFormatError(f"{mpath} is not valid JSON ({exc}); `coder-index verify {path} --repair` rewrites "
                               "it from meta.sqlite") from None
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{mpath} is not a JSON object; `coder-index verify {path} --repair` rewrites it")
    if manifest.get("format") in others:
        raise IndexFormatError(f"{path} is {others[manifest['format']]}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{path} has index format version {version!r}; this coder-index reads version "
                               f"{FORMAT_VERSION}. Rebuild the index with this version.")
    model = manifest.get("model")
    if not isinstance(model, dict) or not all(k in model for k in ("model", "weights_sha256", "embed_dim")):
        raise IndexFormatError(f"{mpath} has no valid 'model' record; `coder-index verify {path} --repair` rewrites "
                               "it from meta.sqlite")
    if not isinstance(manifest.get("dim"), int) or manifest["dim"] != model.get("embed_dim"):
        raise IndexFormatError(f"{mpath}: 'dim' {manifest.get('dim')!r} disagrees with the model's embed_dim "
                               f"{model.get('embed_dim')!r}; `coder-index verify {path} --repair` rewrites it")
    return manifest


class TextStore:
    """Open with ``TextStore.open(path)``, create with ``TextStore.create(path, encoder)`` (the same
    on ``TextIndex``, which adds the methods)."""

    def __init__(self, path: Path, manifest: dict[str, Any], encoder: ClipEncoder | None = None,
                 device: str | None = None, precision: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        # reads never create or modify; a damaged file is one line naming it and the fix
        self.engine = schema.make_engine(path / META_DB, read_only=True, on_damage=self._damaged)
        self._write_engine: Any = None
        # the index's CLIP model, loaded on first use and checked against the manifest (model/index_model)
        self.model = IndexModel(self.fingerprint, device=device, precision=precision, encoder=encoder)
        # vector file -> (generation, ids, vectors): memory-mapped, the only copy of each matrix
        self._matrices: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._files: dict[str, Path] = {}      # vector file -> the committed file to read
        self._cache: dict[str, Any] = {}       # what is derived from the committed files (``derived``)
        # text embeddings of the model, through the text cache (stores/text_encoding)
        self.text_encoding = CachedTextEncoding(self.model, int(manifest.get("dim") or 0))

    @property
    def fix(self) -> str:
        """What to do about damage to this index (a literal command)."""
        return rebuild_fix(self.path)

    @property
    def compute_device(self):  # -> torch.device
        """Where the per-image numeric work runs: the encoder's device (or the one it will load on)."""
        return self.model.compute_device()

    def derived(self, key: str, compute: Any) -> Any:
        """``compute()``, kept until the index is written again (a classifier, zero-shot weights, the
        pair order): what other modules derive from the store is kept here, by key, and dropped with
        every write."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def forget(self, *keys: str) -> None:
        """Drop derived data (``derived``) that a change made stale."""
        for key in keys:
            self._cache.pop(key, None)

    def _damaged(self, reason: str) -> IndexFormatError:
        return IndexFormatError(f"{self.path / META_DB} is damaged ({reason}); {self.fix}")

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | Path, encoder: ClipEncoder, *, exist_ok: bool = False,
               recipe: TextRecipe | None = None, overwrite: bool = False) -> TextStore:
        """A new, empty index for ``encoder``'s model whose texts follow ``recipe`` (default preset
        without a dataset if None). With ``exist_ok`` an existing index of the same model and recipe
        is opened instead (another model or recipe is refused). ``overwrite`` first deletes the
        index files already there, damaged or not, without reading them (a directory holding other
        files is refused). Safe against concurrent creators: the first creates, the others then find
        the index (and open it, or are refused)."""
        from coder_index.core.presets import TextRecipe

        path = Path(path)
        recipe = recipe or TextRecipe.make()
        if path.exists() and not path.is_dir():
            raise IndexFormatError(f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        fp = encoder.fingerprint
        with index_lock(path), translate_disk_full(path):
            pause_point("index.create_locked")
            if overwrite:
                _delete_index_files(path)
            if (path / MANIFEST).exists():
                if not exist_ok:
                    raise IndexFormatError(f"{path} already holds an index; open it, or choose another directory")
                index = cls.open(path, encoder=encoder)
                index.check_recipe(recipe)
                return index
            remove_stale_temps(path)
            ours = (META_DB, TEXTS_FAISS, PAIRS_FAISS)
            leftovers = [p.name for p in path.iterdir()
                         if p.name != LOCK and not p.name.startswith(ours) and not is_temp_name(p.name)]
            if leftovers:
                raise IndexFormatError(f"{path} is not empty ({leftovers[:5]}); use an empty or new directory")
            # No manifest while we hold the lock: anything of ours here is from a creator that died
            # before finishing. Start over.
            for p in path.iterdir():
                if p.name.startswith(ours):
                    p.unlink()
            index_id = uuid.uuid4().hex  # identifies this index wherever it is copied or moved
            engine = schema.make_engine(path / META_DB, journal="DELETE")
            try:
                schema.metadata.create_all(engine)
                files = {}
                for vf in VECTOR_FILES:
                    write_faiss_durably(_empty_faiss(fp.embed_dim), path / vf.file)
                    files[vf.fingerprint_key] = json.dumps(fingerprint(path / vf.file))
                with engine.begin() as conn:
                    conn.execute(insert(schema.state), [
                        {"key": "generation", "value": "0"}, {"key": "pairs_generation", "value": "0"},
                        {"key": "dim", "value": str(fp.embed_dim)},
                        {"key": "index_id", "value": index_id},
                        {"key": "model", "value": json.dumps(fp.to_dict())},
                        {"key": "text_recipe", "value": json.dumps(recipe.to_dict())},
                        *({"key": k, "value": v} for k, v in files.items())])
                    record_metadata_digest(conn)
            finally:
                engine.dispose()
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "index_id": index_id,
                "created_at": now_iso(),
                "model": fp.to_dict(),
                "dim": fp.embed_dim,
                "metric": "inner_product (cosine on L2-normalised vectors)",
                "files": {"texts": TEXTS_FAISS, "pairs": PAIRS_FAISS, "metadata": META_DB},
                "texts": recipe.to_dict(),
                "counts": {"classes": 0, "texts": {}},
            }
            atomic_write_json(path / MANIFEST, manifest)
        return cls.open(path, encoder=encoder)

    @classmethod
    def open(cls, path: str | Path, *, encoder: ClipEncoder | None = None, device: str | None = None,
             full_check: bool = False, precision: str | None = None) -> TextStore:
        """Open an existing index, checking its files (``full_check``: the full sha256 of every
        vector file too). If ``encoder`` is given it must be the index's model; otherwise the index's
        own model is loaded on first use (``precision``: see ``ClipEncoder``). Nothing is created or
        modified."""
        path = Path(path)
        index = cls(path, read_manifest(path), None, device, precision)
        index._check(full=full_check)
        if encoder is not None:
            index.model.use(encoder)
        return index

    # ----------------------------------------------------------------- checks
    def _state(self) -> dict[str, str]:
        meta = self.path / META_DB
        if not meta.is_file():
            raise IndexFormatError(f"{meta} is missing: the texts and their ids are gone; {self.fix}")
        try:
            with self.engine.connect() as conn:
                return dict(conn.execute(select(schema.state.c.key, schema.state.c.value)).all())
        except sa_exc.DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            raise IndexFormatError(f"{meta} cannot be read ({reason}); {self.fix}") from None

    def _check(self, full: bool = False) -> None:
        """Check the files against the state; a writer committing meanwhile (the state changed under
        us) is retried, not reported as damage."""
        for attempt in range(4):
            state = self._state()
            try:
                try:
                    self._check_state(state, full)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a state value that is garbage
                    what = f"{exc.__class__.__name__}: {str(exc)[:100]}"
                    raise IndexFormatError(f"{self.path / META_DB} holds a damaged state record ({what}); "
                                           f"{self.fix}") from None
                return
            except IndexFormatError:
                if attempt == 3 or self._state() == state:
                    raise

    def _check_state(self, state: dict[str, str], full: bool) -> None:
        missing = [k for k in ("generation", "pairs_generation", "dim", "index_id", "model", "text_recipe",
                               *(vf.fingerprint_key for vf in VECTOR_FILES)) if k not in state]
        if missing:
            raise IndexFormatError(f"{self.path / META_DB} has no {', '.join(missing)} record(s); {self.fix}")
        model = json.loads(state["model"])
        if model != self.manifest["model"] or int(state["dim"]) != self.dim:
            raise IndexFormatError(f"{self.path / MANIFEST} names another model or width than {META_DB} records; "
                                   f"`coder-index verify {self.path} --repair` rewrites the manifest from "
                                   f"{META_DB}")
        counts = self._row_counts()
        for vf in VECTOR_FILES:
            self._files[vf.file] = self._committed_file(vf, int(state[vf.state_key]))
            self._check_vector_file(vf, json.loads(state[vf.fingerprint_key]), counts[vf.file], full)
        self._check_metadata(state)

    def _check_metadata(self, state: dict[str, str]) -> None:
        """The classes, kinds and weights the texts have now are those recorded at the last write.
        (An index written before coder-index 0.3 has no digest: ``verify --repair`` records one.)"""
        recorded = state.get(META_DIGEST)
        if recorded is None:
            return
        with self.engine.connect() as conn:
            if metadata_digest(conn, self._damaged) != recorded:
                raise IndexFormatError(
                    f"{self.path / META_DB}: the classes, kinds or weights of its texts are not those this index "
                    f"recorded at its last write (edited or damaged outside coder-index); {self.fix}")

    def _row_counts(self) -> dict[str, int]:
        try:
            with self.engine.connect() as conn:
                return {vf.file: int(conn.execute(select(func.count()).select_from(vf.table)).scalar())
                        for vf in VECTOR_FILES}
        except sa_exc.DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            raise IndexFormatError(f"{self.path / META_DB} cannot be read ({reason}); {self.fix}") from None

    def _committed_file(self, vf: VectorFile, generation: int) -> Path:
        """The file holding generation ``generation``: the pending one if a write was interrupted
        after its commit and before its rename, else the file itself."""
        pending = self.path / pending_name(vf, generation)
        return pending if pending.is_file() else self.path / vf.file

    def _check_vector_file(self, vf: VectorFile, recorded: dict[str, Any], rows: int, full: bool) -> None:
        p = self._files[vf.file]
        where = f"{self.path / vf.file}"
        try:
            info = read_info(p)
        except VectorFileError as exc:
            raise IndexFormatError(f"{where}: {exc}; {self.fix}") from None
        if info.dim != self.dim:
            raise IndexFormatError(f"{where} holds vectors of width {info.dim}, the index's model has {self.dim}; "
                                   f"the file comes from another index. {self.fix}")
        if info.ntotal != rows:
            raise IndexFormatError(f"{where} holds {info.ntotal} vectors but {META_DB} {rows} rows; the files were "
                                   f"changed outside coder-index. {self.fix}")
        if info.size != recorded.get("size") or digest(p, info) != recorded.get("quick") or \
                (full and digest(p, info, full=True) != recorded.get("sha256")):
            raise IndexFormatError(f"{where} is not the file this index wrote (its content differs from the recorded "
                                   f"checksum: copied from another index, or its ids or vectors were changed). "
                                   f"{self.fix}")

    # ----------------------------------------------------------------- writing
    @property
    def write_engine(self) -> Any:
        if self._write_engine is None:
            self._write_engine = schema.make_engine(self.path / META_DB, journal="DELETE", on_damage=self._damaged)
        return self._write_engine

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's lock for a write: finish or discard an interrupted write first, then
        re-read the state (another writer may have changed it while we waited)."""
        with index_lock(self.path), translate_disk_full(self.path):
            pause_point("index.write_locked")
            self._recover()
            self._check_metadata(self._state())  # never record a digest over damaged metadata
            self._cache.clear()
            self._matrices.clear()
            yield
        self._cache.clear()

    def _recover(self) -> None:
        recover_interrupted_writes(self.path, self._state())
        for vf in VECTOR_FILES:
            self._files[vf.file] = self.path / vf.file


    # ----------------------------------------------------------------- model
    @property
    def fingerprint(self) -> ModelFingerprint:
        from coder_index.model.encoder import ModelFingerprint

        return ModelFingerprint.from_dict(self.manifest["model"])

    def check_model(self, fp: ModelFingerprint) -> None:
        """Refuse a model other than the one that built the index (``IndexModel.check``)."""
        self.model.check(fp)

    def require_model(self, model: str | None, pretrained: str | None) -> None:
        """Refuse to go on unless ``model`` / ``pretrained`` name this index's model (``IndexModel.require``)."""
        self.model.require(model, pretrained)

    @property
    def encoder(self) -> ClipEncoder:
        """The index's CLIP model, loaded on first use."""
        return self.model.encoder

    def images_only(self) -> None:
        """Only images will be encoded from here on: the text tower is freed (``IndexModel.images_only``)."""
        self.model.images_only()

    # ----------------------------------------------------------------- texts recipe
    @property
    def recipe(self) -> TextRecipe:
        """How this index turns words into texts (preset, dataset, task, templates)."""
        from coder_index.core.presets import TextRecipe

        if "recipe" not in self._cache:
            with self.engine.connect() as conn:
                value = conn.execute(select(schema.state.c.value).where(schema.state.c.key == "text_recipe")).scalar()
            if value is None:
                raise IndexFormatError(f"{self.path / META_DB} has no text_recipe record; the index is damaged")
            self._cache["recipe"] = TextRecipe.from_dict(json.loads(value))
        return self._cache["recipe"]

    def check_recipe(self, recipe: TextRecipe) -> None:
        mine = self.recipe
        if mine != recipe:
            raise IndexFormatError(
                f"{self.path} holds texts of {mine.describe()}; this build asks for {recipe.describe()}. Texts of "
                "two recipes do not mix in one index: leave --preset/--dataset/--task out to add to it as it is, "
                "or build into a new directory.")

    # ----------------------------------------------------------------- state
    def _generation(self, vf: VectorFile) -> int:
        value = self._state().get(vf.state_key)
        if value is None:
            raise IndexFormatError(f"{self.path / META_DB} has no {vf.state_key} record; {self.fix}")
        return int(value)

    @property
    def generation(self) -> int:
        return self._generation(TEXT_VECTORS)

    @property
    def pairs_generation(self) -> int:
        return self._generation(PAIR_VECTORS)

    @property
    def index_id(self) -> str:
        return self._state().get("index_id", "")

    def provenance(self) -> dict[str, Any]:
        """What identifies the texts behind predictions: this index (wherever it lies), its text
        generation, recipe and model. Predictions made with another value are not comparable."""
        return {"path": str(self.path.resolve()), "index_id": self.index_id, "generation": self.generation,
                "recipe": self.recipe.to_dict(), "model": self.fingerprint.to_dict()}

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def class_names(self) -> list[str]:
        if "classes" not in self._cache:
            with self.engine.connect() as conn:
                rows = conn.execute(select(schema.classes.c.name).order_by(schema.classes.c.id)).all()
            self._cache["classes"] = [r[0] for r in rows]
        return self._cache["classes"]

    def matrix(self, vf: VectorFile = TEXT_VECTORS, conn: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [K], vectors [K, D]) of the committed generation, memory-mapped from the vector file
        (texts.faiss is class-ordered: see ``_layout_order``). Called inside a read transaction
        (``conn``), it is the generation of the rows that transaction sees: a writer cannot commit
        while the transaction is open. Mapped once per generation; a writer replacing the file later
        does not disturb a mapping already made (it keeps the old file's inode)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.matrix(vf, c)
        generation = int(conn.execute(select(schema.state.c.value).where(schema.state.c.key == vf.state_key))
                         .scalar())
        cached = self._matrices.get(vf.file)
        if cached is not None and cached[0] == generation:
            return cached[1], cached[2]
        rows = int(conn.execute(select(func.count()).select_from(vf.table)).scalar())
        for attempt in range(3):
            path = self._committed_file(vf, generation)
            try:
                info = read_info(path)
                ids, vectors = open_matrix(path, info)
                break
            except VectorFileError as exc:
                if attempt < 2 and not path.exists():  # the pending file was renamed into place meanwhile
                    continue
                raise IndexFormatError(f"{self.path / vf.file}: {exc}; {self.fix}") from None
        if info.ntotal != rows or info.dim != self.dim:
            raise IndexFormatError(
                f"{self.path / vf.file} holds {info.ntotal} vectors of width {info.dim} but {META_DB} has {rows} "
                f"rows of width {self.dim}; the files were changed outside coder-index. {self.fix}")
        self._files[vf.file] = path
        self._matrices[vf.file] = (generation, ids, vectors)
        return ids, vectors

    def counts(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            n_classes = conn.execute(select(func.count()).select_from(schema.classes)).scalar()
            per_kind = dict(conn.execute(select(schema.texts.c.kind, func.count()).group_by(schema.texts.c.kind)).all())
            n_pairs = conn.execute(select(func.count()).select_from(schema.pair_texts)).scalar()
        return {"classes": int(n_classes), "texts": {k: int(per_kind.get(k, 0)) for k in TEXT_KINDS},
                "pair_texts": int(n_pairs)}

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "manifest": self.manifest, "generation": self.generation,
                "counts": self.counts()}

    # ----------------------------------------------------------------- writes
    def add_classes(self, names: Sequence[str]) -> list[int]:
        """Register classes in label order; existing names keep their ids. Returns the ids."""
        clean = [str(n).strip() for n in names]
        if any(not n for n in clean):
            raise ValueError("class names must be non-empty")
        with self.writing():
            with self.write_engine.begin() as conn:
                existing = dict(conn.execute(select(schema.classes.c.name, schema.classes.c.id)).all())
                next_id = max(existing.values(), default=-1) + 1
                new_rows = []
                for name in dict.fromkeys(clean):
                    if name not in existing:
                        existing[name] = next_id
                        new_rows.append({"id": next_id, "name": name})
                        next_id += 1
                if new_rows:
                    conn.execute(insert(schema.classes), new_rows)
                    record_metadata_digest(conn, self._damaged)
            if new_rows:
                self.write_manifest_counts()
        return [existing[n] for n in clean]

    def add_texts(self, items: Iterable[TextItem], *, batch_size: int | None = None, progress: bool = False,
                  desc: str = "encoding texts", embeddings: Any = None,
                  encode: Any = None) -> AddResult:
        """Embed and store texts; (class, kind, text) already present are counted, not stored again.

        ``embeddings`` [len(items), D] stores precomputed embeddings of this index's model instead
        of encoding (they are normalised here); ``encode(texts) -> [n, D]`` replaces the index's own
        encoder (e.g. a pool of Ray actors). The slow part (text encoding) runs before the lock; the
        write itself is atomic.
        """
        items = list(items)
        if not items:
            return AddResult(0, 0)
        given = None
        if embeddings is not None:
            given = l2_normalize(as_float_matrix(embeddings, "embeddings"), "embeddings")
            if given.shape != (len(items), self.dim):
                raise ValueError(f"embeddings must have shape {(len(items), self.dim)}, got {given.shape}")
        class_ids = {n: i for i, n in enumerate(self.class_names())}
        unknown_kinds = sorted({it.kind for it in items} - set(TEXT_KINDS))
        if unknown_kinds:
            raise ValueError(f"unknown text kind(s) {unknown_kinds}; allowed: {list(TEXT_KINDS)}")
        bad_weight = [it for it in items if isinstance(it.weight, bool) or not isinstance(it.weight, int)
                      or it.weight < 1]
        if bad_weight:
            raise ValueError(f"text weights must be positive integers (first: {bad_weight[0]!r})")
        missing = sorted({it.class_name for it in items} - class_ids.keys())
        if missing:
            raise ValueError(f"{len(missing)} text(s) name classes that are not in the index "
                             f"(first: {missing[:5]}); add them with add_classes() first")
        unique: dict[tuple[int, str, str], TextItem] = {}
        given_row: dict[str, int] = {}
        for n, it in enumerate(items):
            text = " ".join(it.text.split())
            if text:
                unique.setdefault((class_ids[it.class_name], it.kind, text), it)
                given_row.setdefault(text, n)
        new_keys = self._absent(list(unique))
        if not new_keys:
            return AddResult(0, len(items))
        distinct_texts = list(dict.fromkeys(k[2] for k in new_keys))
        if given is not None:
            emb = given[[given_row[t] for t in distinct_texts]]
        else:
            emb = self.encode_texts_cached(distinct_texts, batch_size=batch_size, progress=progress, desc=desc,
                                           encode=encode)
        row_of = {t: i for i, t in enumerate(distinct_texts)}

        with self.writing():
            new_keys = self._absent(new_keys)  # another writer may have added some meanwhile
            if not new_keys:
                return AddResult(0, len(items))
            vectors = emb[[row_of[k[2]] for k in new_keys]]
            rows = [{"class_id": k[0], "kind": k[1], "text": k[2], "template": unique[k].template,
                     "source": unique[k].source, "weight": int(unique[k].weight)} for k in new_keys]
            self.append_rows(TEXT_VECTORS, rows, vectors)
            self.write_manifest_counts()
        return AddResult(len(new_keys), len(items) - len(new_keys))

    def append_rows(self, vf: VectorFile, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Append rows + vectors to ``vf`` with the crash-safe protocol. Caller holds ``writing()``.

        The new file is streamed from the old (memory-mapped) one and the new vectors: the matrix is
        never loaded whole, so adding texts costs no second copy of it."""
        self._matrices.pop(vf.file, None)
        old_ids, old_vectors = self.matrix(vf)
        generation = self._generation(vf)
        with self.engine.connect() as conn:
            next_id = int(conn.execute(select(func.max(vf.table.c.id))).scalar() or 0) + 1
        ids = np.arange(next_id, next_id + len(rows), dtype=np.int64)
        rows = [{"id": int(i), **r} for i, r in zip(ids, rows, strict=True)]
        sources = [(old_ids, old_vectors), (ids, np.ascontiguousarray(vectors, dtype=np.float32))]
        order = self._layout_order(old_ids, rows) if vf is TEXT_VECTORS else None
        pending = self.path / pending_name(vf, generation + 1)
        try:
            self._write_pending_vectors(pending, sources, order)
            crash_point("index.faiss_written")
            self._commit_rows(vf, rows, generation + 1, fingerprint(pending))
            crash_point("index.committed")
            self._promote_pending_vectors(vf, pending)
            crash_point("index.renamed")
        except BaseException:
            self._matrices.pop(vf.file, None)
            if self._generation(vf) != generation + 1:
                pending.unlink(missing_ok=True)  # not committed: nothing refers to it
            raise

    def _layout_order(self, old_ids: np.ndarray, new_rows: list[dict[str, Any]]) -> np.ndarray:
        """Row order of the new texts.faiss, as positions in [old rows..., new rows...]: name and
        synonym texts first, then attribute and analogous texts, each group by class and then by id.
        It is the order the CODER classifier reduces in (``coder.TextLayout``), so the memory-mapped
        file *is* its text matrix: nothing is permuted or copied when an index is opened."""
        # (id, class, is-extra) of the committed rows, fetched in blocks into arrays (no dict of K rows)
        parts = []
        with self.engine.connect() as conn:
            res = conn.exec_driver_sql("SELECT id, class_id, kind NOT IN ('name', 'synonym') FROM texts ORDER BY id")
            while block := res.fetchmany(100_000):
                parts.append(np.array(block, dtype=np.int64).reshape(-1, 3))
        parts.append(np.array([(r["id"], r["class_id"], r["kind"] not in ("name", "synonym")) for r in new_rows],
                              dtype=np.int64).reshape(-1, 3))
        table = np.concatenate(parts)   # sorted by id: old ids < new ids
        all_ids = np.concatenate([np.asarray(old_ids, dtype=np.int64), [r["id"] for r in new_rows]]).astype(np.int64)
        at = np.searchsorted(table[:, 0], all_ids)
        return np.lexsort((all_ids, table[at, 1], table[at, 2]))

    @property
    def text_cache_path(self) -> Any:
        """Where text embeddings are cached: None the default cache, False none, or a file."""
        return self.text_encoding.cache_path

    @text_cache_path.setter
    def text_cache_path(self, value: Any) -> None:
        self.text_encoding.cache_path = value

    def text_cache(self, encode: Any = None) -> TextEmbeddingCache | None:
        """The text embedding cache of this index's weights (``CachedTextEncoding.cache``)."""
        return self.text_encoding.cache(encode)

    def text_encode_stats(self) -> TextEncodeStats:
        """Texts encoded and read from the text cache by this object so far (all precisions)."""
        return self.text_encoding.stats()

    def encode_texts_cached(self, texts: list[str], *, batch_size: int | None = None, progress: bool = False,
                            desc: str = "encoding texts", encode: Any = None, normalize: bool = True) -> np.ndarray:
        """Embeddings of ``texts`` by this index's model, through the text cache (``CachedTextEncoding``)."""
        return self.text_encoding.encode(texts, batch_size=batch_size, progress=progress, desc=desc, encode=encode,
                                         normalize=normalize)

    def _absent(self, keys: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
        if not keys:
            return []
        cls_ids = sorted({k[0] for k in keys})
        present: set[tuple[int, str, str]] = set()
        t = schema.texts
        with self.engine.connect() as conn:
            for i in range(0, len(cls_ids), 500):
                q = select(t.c.class_id, t.c.kind, t.c.text).where(t.c.class_id.in_(cls_ids[i:i + 500]))
                present.update(tuple(r) for r in conn.execute(q))
        return [k for k in keys if k not in present]

    # The three steps of a write are separate methods so that crash tests can kill the process
    # between any two of them.
    @staticmethod
    def _write_pending_vectors(pending: Path, sources: list[tuple[np.ndarray, np.ndarray]], order: Any) -> None:
        dim = next(v.shape[1] for _, v in sources)
        write_matrix(pending, sources, dim, order)
        fsync_dir(pending.parent)

    def _commit_rows(self, vf: VectorFile, rows: list[dict[str, Any]], generation: int,
                     file_fingerprint: dict[str, Any]) -> None:
        with self.write_engine.begin() as conn:
            for i in range(0, len(rows), 5000):
                conn.execute(insert(vf.table), rows[i:i + 5000])
            for key, value in ((vf.state_key, str(generation)), (vf.fingerprint_key, json.dumps(file_fingerprint))):
                conn.execute(schema.state.update().where(schema.state.c.key == key).values(value=value))
            record_metadata_digest(conn, self._damaged)

    def _promote_pending_vectors(self, vf: VectorFile, pending: Path) -> None:
        os.replace(pending, self.path / vf.file)
        fsync_dir(self.path)

    def write_manifest_counts(self) -> None:
        """Counts in the manifest are informational (SQLite is authoritative). Lock held."""
        manifest = dict(self.manifest)
        manifest["counts"] = self.counts()
        manifest["updated_at"] = now_iso()
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest

    def record_run(self, command: str, detail: dict[str, Any]) -> None:
        with self.writing(), self.write_engine.begin() as conn:
            conn.execute(insert(schema.runs).values(started_at=now_iso(), command=command,
                                                    detail=json.dumps(detail, ensure_ascii=False)))

    # ----------------------------------------------------------------- reads
    def text_table(self, kinds: Sequence[str] = TEXT_KINDS) -> TextTable:
        """Texts of the given kinds with their embeddings, in the file's (class-ordered) row order.
        With every text selected (the CODER text set of an index of general texts), the embeddings
        are the memory-mapped matrix itself: no copy."""
        key = f"table:{','.join(kinds)}"
        if key in self._cache:
            return self._cache[key]
        marks = ", ".join("?" * len(kinds))
        with self.engine.connect() as conn:  # one read transaction: rows and vectors of one generation
            file_ids, vectors = self.matrix(TEXT_VECTORS, conn)
            res = conn.exec_driver_sql(f"SELECT id, class_id, weight, kind FROM texts WHERE kind IN ({marks}) "
                                       "ORDER BY id", tuple(kinds))
            numbers, kind_blocks = [np.zeros((0, 3), np.int64)], [np.zeros(0, dtype=str)]
            while block := res.fetchmany(100_000):  # arrays a block at a time: never a Python row per text
                numbers.append(np.array([r[:3] for r in block], dtype=np.int64).reshape(-1, 3))
                kind_blocks.append(np.array([r[3] for r in block], dtype=str))
        sel, sel_kinds = np.concatenate(numbers), np.concatenate(kind_blocks)
        # the file's (class-ordered) rows, restricted to the selected kinds
        order_ids = np.asarray(file_ids)
        at = np.clip(np.searchsorted(sel[:, 0], order_ids), 0, max(len(sel) - 1, 0))
        keep = (sel[at, 0] == order_ids) if len(sel) else np.zeros(len(order_ids), bool)
        pos = np.flatnonzero(keep)
        at = at[pos]
        ids, class_ids, weights, kinds_arr = order_ids[pos], sel[at, 1], sel[at, 2], sel_kinds[at]
        if (weights > 1).any():  # see TextTable: a text of weight w is w columns, as in the released code
            pos, ids, class_ids, kinds_arr = (np.repeat(a, weights) for a in (pos, ids, class_ids, kinds_arr))
        embeddings = vectors if len(pos) == len(order_ids) and (weights <= 1).all() else np.asarray(vectors[pos])
        table = TextTable(np.asarray(ids), class_ids, kinds_arr, embeddings)
        self._cache[key] = table
        return table

    def texts_by_id(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = [int(i) for i in ids]
        t, c = schema.texts, schema.classes
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 900):
                q = (select(t.c.id, t.c.text, t.c.kind, t.c.template, t.c.source, c.c.name, c.c.id)
                     .join(c, c.c.id == t.c.class_id).where(t.c.id.in_(ids[i:i + 900])))
                for r in conn.execute(q):
                    out[r[0]] = {"id": r[0], "text": r[1], "kind": r[2], "template": r[3], "source": r[4],
                                 "class": r[5], "class_id": r[6]}
        return out

    def search_texts(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search over the general texts: (cosines [N, k], text ids [N, k]); -1 ids pad
        short results. FAISS's brute-force kNN reads the memory-mapped matrix itself (on a GPU where the
        index's device is one and FAISS can: ``faiss_gpu``)."""
        ids, vectors = self.matrix()
        q = np.ascontiguousarray(embeddings, dtype=np.float32)
        k = min(k, max(len(ids), 1))
        if len(ids) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        from coder_index.model.faiss_gpu import knn

        sims, pos = knn(q, vectors, k, self.compute_device)
        return sims, np.where(pos >= 0, np.asarray(ids)[np.clip(pos, 0, None)], -1)


def _delete_index_files(path: Path) -> None:
    """What ``--overwrite`` removes: the index's own files only. Anything else in the directory means
    it is not (only) an index, and nothing is deleted. The caller holds the lock."""
    ours = (MANIFEST, META_DB, TEXTS_FAISS, PAIRS_FAISS)
    foreign = sorted(p.name for p in path.iterdir()
                     if p.name != LOCK and not p.name.startswith(ours) and not is_temp_name(p.name))
    if foreign:
        raise IndexFormatError(f"{path} holds files that are not an index's ({foreign[:5]}); --overwrite deletes "
                               "only an index: choose an empty or new directory, or move those files away")
    for p in path.iterdir():
        if p.name != LOCK:
            if p.is_dir() and not p.is_symlink():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
    fsync_dir(path)


def recover_interrupted_writes(path: Path, state: dict[str, str]) -> list[str]:
    """Roll an interrupted write forward or back (see the module docstring) and remove temp files of
    dead writers. The caller holds the index's lock. Returns the names it acted on."""
    acted = []
    for vf in VECTOR_FILES:
        committed = int(state[vf.state_key])
        for p in path.glob(f"{vf.file}.g*"):
            if p.name == pending_name(vf, committed):
                os.replace(p, path / vf.file)
            else:
                p.unlink()
            acted.append(p.name)
    acted += remove_stale_temps(path)
    if acted:
        fsync_dir(path)
    return acted
