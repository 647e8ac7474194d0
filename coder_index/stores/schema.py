"""SQLite schema of an index directory's meta.sqlite (SQLAlchemy Core).

FAISS vector ids are the ``texts.id`` row ids, so one integer joins a search hit to its text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)

metadata = MetaData()

classes = Table(
    "classes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # the label index, 0-based
    Column("name", Text, nullable=False, unique=True),
)

texts = Table(
    "texts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # == FAISS id in texts.faiss
    Column("class_id", Integer, ForeignKey("classes.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("template", Text, nullable=True),
    Column("source", Text, nullable=True),
    # how many times the text counts in its class's mean (the released lists repeat some texts)
    Column("weight", Integer, nullable=False, server_default="1"),
    UniqueConstraint("class_id", "kind", "text", name="uq_text_per_class_kind"),
    Index("ix_texts_kind", "kind"),
)

# One-to-one texts of ordered class pairs (a described as different from b), grown on demand.
pair_texts = Table(
    "pair_texts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # == FAISS id in pairs.faiss
    Column("class_a", Integer, ForeignKey("classes.id"), nullable=False),
    Column("class_b", Integer, ForeignKey("classes.id"), nullable=False),
    Column("feature", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("source", Text, nullable=True),
    Column("weight", Integer, nullable=False, server_default="1"),
    UniqueConstraint("class_a", "class_b", "text", name="uq_pair_text"),
    Index("ix_pair_texts_pair", "class_a", "class_b"),
)

# Key/value state; holds the FAISS generation each vector file's committed rows belong to.
state = Table(
    "state", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Text, nullable=False),
    Column("command", Text, nullable=False),
    Column("detail", Text, nullable=True),  # JSON; never holds secrets
)


def damaged_reason(exc: BaseException) -> str | None:
    """SQLite's reason when ``exc`` says the file is damaged (not a database, malformed, text that is
    not UTF-8); None for errors that are not damage (a lock held by a writer, a full disk)."""
    import sqlite3

    orig = getattr(exc, "orig", exc)
    if not isinstance(orig, sqlite3.DatabaseError):
        return None
    reason = (str(orig).splitlines() or [orig.__class__.__name__])[0]
    transient = ("locked", "busy", "disk is full", "unable to open", "readonly", "read-only", "interrupted")
    if isinstance(orig, sqlite3.OperationalError) and any(t in reason.lower() for t in transient):
        return None
    return reason


def make_engine(path: Path, synchronous: str = "FULL", *, journal: str = "WAL", read_only: bool = False,
                on_damage: Callable[[str], Exception] | None = None) -> Engine:
    """SQLite engine. FULL fsyncs every commit (index metadata: a commit must be on disk before FAISS
    files are renamed); NORMAL suits caches, where losing the last answers to a power cut only costs
    a repeated request. Caches use WAL (many concurrent writers); index metadata uses a rollback
    journal, so that a reader (``read_only``: the file is opened with mode=ro and never created)
    creates no -wal/-shm files beside the index."""
    from urllib.parse import quote

    if read_only:
        engine = create_engine(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true", future=True)
    else:
        engine = create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DBAPI hook signature
        # SQLAlchemy's documented recipe for real SQLite transactions: the driver issues no BEGIN of
        # its own, SQLAlchemy's ("begin" below) does, so that reads inside one connection block see
        # one snapshot (SQLite's shared lock is held until the transaction ends).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")  # wait for a writer's transaction instead of failing
        if not read_only:
            cur.execute(f"PRAGMA journal_mode={journal}")
            cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001 - event hook signature
        conn.exec_driver_sql("BEGIN")

    @event.listens_for(engine, "handle_error")
    def _damaged(context):  # noqa: ANN001 - event hook signature
        # A damaged file is the user's to fix: one line naming the file and the fix, from whichever
        # query first meets the damage, instead of SQLAlchemy's traceback.
        reason = damaged_reason(context.original_exception)
        if reason is not None:
            return (on_damage or _default_damage(path))(reason)
        return None

    return engine


def _default_damage(path: Path) -> Callable[[str], Exception]:
    from coder_index.core.errors import CoderIndexError

    return lambda reason: CoderIndexError(f"{path} is damaged ({reason}); delete it (coder-index rebuilds what it "
                                          "holds, at the cost of repeating the work) or restore it from a backup")
