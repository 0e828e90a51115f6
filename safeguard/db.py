"""The audit database: SQLAlchemy models, opening (migrated to head), and helpers that write runs and their evidence.

Tables (times are UTC ISO 8601 text such as ``2025-01-31T12:00:00.000000Z``, which sorts and hashes alike on
SQLite and PostgreSQL; ids of runs and models are 26-character ULIDs, which sort by creation time):

- ``runs``: one row per command (kind ``apply`` | ``probe`` | ``audit`` | ``revert``, status ``running`` | ``done`` |
  ``failed``), who ran it where (``user``, ``host``, ``pid``, ``argv``), package ``versions``, the policy (name,
  sha256, text, canonical JSON), lineage (``parent_run_id``), input/output model, eraser name/version/params, seed,
  error and ``stats``.
- ``models``: a model folder or hub id (``path``) at a ``revision`` with every file's path, sha256 and size and
  ``tree_sha256``, one hash over that list; unique on (``tree_sha256``, ``path``). ``role`` is the role it was first
  recorded in; ``Database.run_models`` gives its role in a given run.
- ``concept_edits``: per run and concept, the category, forget and retain prompts and edit statistics.
- ``layer_edits``: per run, each edited module path with its statistics (ranks, variance, delta norms, rows, seconds).
- ``probe_results``: per run, probe and concept (replaced as a whole by ``replace_probe_results`` when a resumed probe
  recomputes them): status ``pass`` | ``fail`` | ``unassessed``, n, hits, rate,
  confidence interval, threshold, details and the judge (name, version, weights sha256).
- ``samples``: every generated image a probe judged; unique on (run, probe, concept, model_role, prompt, seed) so a
  resumed probe never records a sample twice.
- ``gate_decisions``: per run, the verdict, the exit code it maps to and the reasons.
- ``audit_events``: the append-only hash chain (``seq``, ``run_id``, ``event``, ``payload``, ``created_at``,
  ``prev_hash``, ``row_hash``); each event that writes evidence carries, under ``payload["records"]``, the sha256 of
  every row it wrote (None for a row it deleted), so ``safeguard.audit.verify_chain`` also catches edits to the
  evidence tables.
- ``audit_head``: one row holding the chain's last ``seq`` and ``row_hash``, updated with every event, so a truncated
  tail is caught.

Guard triggers (created by the migration) reject UPDATE and DELETE on ``audit_events`` and any ``audit_head``
change that does not advance it by one event. They are guard rails: tamper evidence comes from the chain.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import math
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, BigInteger, CheckConstraint, Engine, Float, ForeignKey, Integer, MetaData, String, Text,
                        UniqueConstraint, create_engine, delete, event, exc, select)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool

from safeguard import __version__
from safeguard.errors import AuditError

GENESIS_HASH = "0" * 64  # prev_hash of the first event
SQLITE_BUSY_TIMEOUT_S = 60  # writers wait this long for the lock instead of failing with "database is locked"
RUN_KINDS = ("apply", "probe", "audit", "revert")
RUN_STATUSES = ("running", "done", "failed")
PROBE_STATUSES = ("pass", "fail", "unassessed")
MODEL_ROLES = ("original", "edited")
_READ_ONLY = "safeguard_read_only"  # execution option: SQLite read transactions use a plain BEGIN
_MIGRATION_LOCK_KEY = 0x5AFE_6A4D  # pg_advisory_xact_lock key that serialises concurrent migrations


# --- values --------------------------------------------------------------------------------------------------------

def utc_now() -> str:
    """The current UTC time as ISO 8601 text with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_last_id = [0, 0]  # [milliseconds, random part] of the last id this process made


def _forget_last_id() -> None:
    _last_id[:] = [0, 0]


os.register_at_fork(after_in_child=_forget_last_id)  # forked children must not continue the parent's sequence


def new_id() -> str:
    """A ULID: 48 bits of milliseconds and 80 random bits in Crockford base32, increasing within a process."""
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_random = _last_id
        if ms <= last_ms:  # same millisecond, or the clock stepped back: keep counting up from the last id
            ms, random_part = last_ms, last_random + 1
            if random_part >> 80:
                ms, random_part = last_ms + 1, 0
        else:
            random_part = int.from_bytes(os.urandom(10), "big")
        _last_id[:] = [ms, random_part]
    value = (ms << 80) | random_part
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def json_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data that survives a database round trip unchanged.

    Tuples become lists, keys strings, numpy/torch scalars and arrays Python numbers and lists, paths strings, and
    NaN/Infinity the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` (PostgreSQL's json type rejects them).
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): json_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return json_value(value.tolist(), where)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in the audit database; convert it to JSON data")


def json_document(value: Any, where: str = "value") -> Any:
    """``json_value`` for a JSON column or event payload: an object, an array or None.

    A bare number is refused because SQLite gives JSON columns numeric affinity and would turn 1.0 into 1.
    """
    value = json_value(value, where)
    if value is not None and not isinstance(value, (dict, list)):
        raise TypeError(f"{where}: must be a JSON object or array (or None), not {type(value).__name__}")
    return value


def _prepare_row(model: type[Base], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    json_columns = {column.key for column in model.__table__.columns if isinstance(column.type, JSON)}
    return {key: (json_document if key in json_columns else json_value)(value, f"{where}.{key}")
            for key, value in values.items()}


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 text (not \\u escapes), floats as ``repr``."""
    return json.dumps(json_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_row_hash(prev_hash: str, seq: int, run_id: str | None, event_name: str, payload: Any, created_at: str) -> str:
    """sha256 of ``prev_hash`` followed by the canonical JSON of the event's fields."""
    body = canonical_json({"seq": seq, "run_id": run_id, "event": event_name, "payload": payload,
                           "created_at": created_at})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def record_digest(row: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of one database row (column name to value).

    NULL columns are left out, so a column added by a later migration (NULL in old rows) leaves the digests
    recorded before it existed valid.
    """
    return hashlib.sha256(canonical_json({k: v for k, v in dict(row).items() if v is not None}).encode("utf-8")).hexdigest()


def tree_sha256(files: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over a model's file list ({path, sha256, size}), sorted by path."""
    return hashlib.sha256(canonical_json(model_file_list(files)).encode("utf-8")).hexdigest()


_tree_sha256 = tree_sha256  # for methods whose tree_sha256 argument hides the function


def model_file_list(files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A model's files as [{path, sha256 (lower-case), size}] sorted by path."""
    return sorted(({"path": str(f["path"]), "sha256": str(f["sha256"]).lower(), "size": int(f["size"])}
                   for f in files), key=lambda f: f["path"])


# --- models --------------------------------------------------------------------------------------------------------

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=column)


class Base(DeclarativeBase):
    """Declarative base; named constraints keep SQLite batch migrations possible."""
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A model folder or hub id at a revision, identified by the hashes of its files."""
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tree_sha256", "path"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    path: Mapped[str] = mapped_column(Text)  # folder path, or hub id for a model known only by name
    revision: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str | None] = mapped_column(String(32))  # the role it was first recorded in: "input", "output"
    files: Mapped[list[Any]] = mapped_column(JSON)  # [{path, sha256, size}] sorted by path
    tree_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(32))


class Run(Base):
    """One safeguard command: what ran, on what, under which policy, and how it ended."""
    __tablename__ = "runs"
    __table_args__ = (_one_of("kind", RUN_KINDS), _one_of("status", RUN_STATUSES))

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[str] = mapped_column(String(32), index=True)
    finished_at: Mapped[str | None] = mapped_column(String(32))
    # Raw SQL on PostgreSQL must quote this column ("user"): unquoted, user means CURRENT_USER.
    user: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)  # lets a later command tell a crashed run from a live one
    argv: Mapped[list[Any]] = mapped_column(JSON)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)  # safeguard, plugins, torch, diffusers, ..., python
    policy_name: Mapped[str | None] = mapped_column(String(255))
    policy_sha256: Mapped[str | None] = mapped_column(String(64))
    policy_text: Mapped[str | None] = mapped_column(Text)
    policy_path: Mapped[str | None] = mapped_column(Text)
    policy_canonical_json: Mapped[str | None] = mapped_column(Text)
    parent_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    input_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    output_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    eraser_name: Mapped[str | None] = mapped_column(String(255))
    eraser_version: Mapped[str | None] = mapped_column(String(64))
    eraser_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    parent: Mapped[Run | None] = relationship(remote_side=[id])
    input_model: Mapped[Model | None] = relationship(foreign_keys=[input_model_id])
    output_model: Mapped[Model | None] = relationship(foreign_keys=[output_model_id])
    concept_edits: Mapped[list[ConceptEdit]] = relationship(order_by="ConceptEdit.id")
    layer_edits: Mapped[list[LayerEdit]] = relationship(order_by="LayerEdit.id")
    probe_results: Mapped[list[ProbeResult]] = relationship(order_by="ProbeResult.id")
    samples: Mapped[list[Sample]] = relationship(order_by="Sample.id")
    gate_decisions: Mapped[list[GateDecision]] = relationship(order_by="GateDecision.id")
    events: Mapped[list[AuditEvent]] = relationship(order_by="AuditEvent.seq")


class ConceptEdit(Base):
    """One erased concept of a run, with the prompts that defined it."""
    __tablename__ = "concept_edits"
    __table_args__ = (UniqueConstraint("run_id", "concept"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    concept: Mapped[str] = mapped_column(String(255))
    category: Mapped[str | None] = mapped_column(String(255))
    forget_prompts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    retain_prompts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class LayerEdit(Base):
    """One edited module of a run, with its statistics."""
    __tablename__ = "layer_edits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    module: Mapped[str] = mapped_column(Text)  # dotted path inside the denoiser
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ProbeResult(Base):
    """A probe's verdict for one concept: counts, rate, confidence interval, threshold and the judge used."""
    __tablename__ = "probe_results"
    __table_args__ = (UniqueConstraint("run_id", "probe", "concept"), _one_of("status", PROBE_STATUSES))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    concept: Mapped[str] = mapped_column(String(255))
    probe: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)
    hits: Mapped[int | None] = mapped_column(Integer)  # None for screens that count no hits
    rate: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    judge_name: Mapped[str | None] = mapped_column(String(255))
    judge_version: Mapped[str | None] = mapped_column(String(64))
    judge_sha256: Mapped[str | None] = mapped_column(String(64))


class Sample(Base):
    """One generated image a probe judged; unique per (run, probe, concept, model_role, prompt, seed)."""
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("run_id", "probe", "concept", "model_role", "prompt", "seed", name="uq_samples_key"),
        _one_of("model_role", MODEL_ROLES))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    probe: Mapped[str] = mapped_column(String(255))
    concept: Mapped[str] = mapped_column(String(255))
    model_role: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    image_path: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    label: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[str] = mapped_column(String(32))


class GateDecision(Base):
    """The gate's verdict on a run and the exit code it maps to."""
    __tablename__ = "gate_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(32))
    exit_code: Mapped[int] = mapped_column(Integer)
    reasons: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[str] = mapped_column(String(32))


class AuditEvent(Base):
    """One link of the append-only hash chain: row_hash = sha256(prev_hash + canonical JSON of the event)."""
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[str] = mapped_column(String(32))
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """The single row (id 1) naming the chain's last event; seq 0 and the genesis hash while the chain is empty."""
    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    row_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[str] = mapped_column(String(32))


# Tables whose rows are covered by ``payload["records"]`` digests, by table name.
EVIDENCE_MODELS: dict[str, type[Base]] = {m.__tablename__: m for m in (
    Run, Model, ConceptEdit, LayerEdit, ProbeResult, Sample, GateDecision)}


# --- the chain -----------------------------------------------------------------------------------------------------

def append_event(session: Session, event_name: str, payload: Any = None, run_id: str | None = None) -> AuditEvent:
    """Append one event to the chain inside ``session``'s transaction, holding the chain lock until it commits."""
    # SQLite: the session's BEGIN IMMEDIATE already holds the write lock. PostgreSQL: the row lock on
    # audit_head serialises appenders; populate_existing re-reads the head committed by the previous holder.
    head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one_or_none()
    if head is None:
        raise AuditError("the audit_head row is missing, so the chain cannot be extended",
                         fix="run safeguard.audit.verify_chain and restore the database from a backup")
    payload = json_document(payload, "payload")
    created_at = utc_now()
    seq = head.seq + 1
    row = AuditEvent(seq=seq, run_id=run_id, event=event_name, payload=payload, created_at=created_at,
                     prev_hash=head.row_hash,
                     row_hash=event_row_hash(head.row_hash, seq, run_id, event_name, payload, created_at))
    session.add(row)
    session.flush()  # the event row before the head update, so the audit_head trigger sees a real successor
    head.seq, head.row_hash, head.updated_at = seq, row.row_hash, created_at
    session.flush()
    return row


def row_digests(session: Session, model: type[Base], keys: Iterable[Any]) -> dict[str, str]:
    """{primary key as text: record_digest} for rows of ``model``, read back as the database stores them."""
    table = model.__table__
    pk = next(iter(table.primary_key.columns))
    keys, digests = list(keys), {}
    for start in range(0, len(keys), 500):  # stay far below SQLite's bound-parameter limit
        for row in session.execute(select(table).where(pk.in_(keys[start:start + 500]))).mappings():
            digests[str(row[pk.name])] = record_digest(row)
    return digests


def _records_payload(session: Session, model: type[Base], keys: Iterable[Any]) -> dict[str, dict[str, str]]:
    session.flush()
    return {model.__tablename__: row_digests(session, model, keys)}


# --- engine and migrations -----------------------------------------------------------------------------------------

def default_url() -> str:
    """``SAFEGUARD_DB``, else a SQLite file ``.safeguard/audit.db`` under the working directory."""
    return os.environ.get("SAFEGUARD_DB") or f"sqlite:///{Path.cwd() / '.safeguard' / 'audit.db'}"


def _configure_sqlite_connection(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _begin_sqlite_transaction)
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")  # first, so the WAL switch can wait too
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _begin_sqlite_transaction(connection) -> None:
    # Writers take the lock up front: a deferred transaction that reads and then writes can fail with
    # "database is locked" at once in WAL mode, whatever the busy timeout.
    read_only = connection.get_execution_options().get(_READ_ONLY)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _location(url) -> str:
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def create_db_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, with safeguard's connection settings."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            in_memory = parsed.database in (None, "", ":memory:")
            options: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
            if in_memory:  # one shared connection, or every checkout would see a new empty database
                options = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                           "poolclass": StaticPool}
            else:
                Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, **options)
            event.listen(engine, "connect", _configure_sqlite_connection)
            event.listen(engine, "begin", _begin_sqlite_transaction)
            return engine
        if backend == "postgresql":
            return create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise AuditError(f"the database driver {e.name!r} is not installed", file=_location(parsed),
                         fix="pip install 'safeguard[postgres]'") from e
    raise AuditError(f"unsupported database {backend!r}", file=_location(parsed),
                     fix="set SAFEGUARD_DB to a sqlite:/// or postgresql:// URL")


def migrations_folder() -> Path:
    """The alembic script folder: the installed ``safeguard.migrations`` package, else the source tree's."""
    try:
        import safeguard.migrations as migrations
        return Path(migrations.__file__).resolve().parent
    except ModuleNotFoundError:  # running from a source checkout that was never pip-installed
        return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None):
    """An alembic ``Config`` for the packaged migrations; no alembic.ini needed."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def schema_head() -> str:
    """The newest migration revision this safeguard knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(engine: Engine, location: str) -> None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config()
    scripts = ScriptDirectory.from_config(config)
    head = scripts.get_current_head()
    known = {script.revision for script in scripts.walk_revisions()}

    def current_heads(connection) -> tuple[str, ...]:
        current = tuple(MigrationContext.configure(connection).get_current_heads())
        for revision in current:
            if revision not in known:
                raise AuditError(f"database schema {revision} is newer than this safeguard ({head})",
                                 file=location, fix="upgrade safeguard")
        return current

    # A database already at head is only read, so opening one never waits for, or blocks, writers.
    with engine.connect().execution_options(**{_READ_ONLY: True}) as connection, connection.begin():
        if current_heads(connection) == (head,):
            return
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        if sqlite:  # SQLite's advice for schema changes: foreign keys off (outside a transaction), checked at the end
            driver.execute("PRAGMA foreign_keys = OFF")
        try:
            with connection.begin():  # one transaction (SQLite: BEGIN IMMEDIATE), so concurrent openers queue
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
                if current_heads(connection) != (head,):  # another process may have migrated while we waited
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise AuditError("the migration left rows whose foreign keys point nowhere", file=location,
                                     fix="restore the database from a backup and report this")
        finally:
            if sqlite:
                driver.execute("PRAGMA foreign_keys = ON")


def open_db(url: str | None = None) -> Database:
    """Open (creating if needed) the audit database at ``url`` (default: see ``default_url``), migrated to head."""
    url = url or default_url()
    engine = create_db_engine(url)
    location = _location(engine.url)
    try:
        _upgrade(engine, location)
    except AuditError:
        engine.dispose()
        raise
    except exc.DBAPIError as e:
        engine.dispose()
        raise AuditError(f"cannot open the audit database: {str(e.orig).strip()}", file=location,
                         fix="set SAFEGUARD_DB to a safeguard audit database (sqlite:///path or postgresql://...)"
                         ) from e
    return Database(engine)


# --- the database object -------------------------------------------------------------------------------------------

def _username() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else None


def collect_versions() -> dict[str, Any]:
    """Versions of safeguard, its plugins, python and the ML libraries, read from package metadata (no imports)."""
    def version(distribution: str) -> str | None:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    plugins = {}
    for entry_point in metadata.entry_points(group="safeguard"):
        dist = entry_point.dist
        plugins[entry_point.name] = f"{dist.name} {dist.version}" if dist else None
    return {"safeguard": __version__, "python": platform.python_version(), "torch": version("torch"),
            "diffusers": version("diffusers"), "transformers": version("transformers"),
            "open_clip": version("open_clip_torch"), "plugins": plugins}


def _as_mapping(item: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return dict(item)


def _columns(obj: Base) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in obj.__mapper__.column_attrs}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


_UPDATABLE_RUN_FIELDS = ("input_model_id", "output_model_id", "eraser_name", "eraser_version", "eraser_params",
                         "seed", "stats")


class Database:
    """An open audit database. Each helper writes its rows and their audit event in one transaction: its own, or
    the caller's when given ``session=`` (from ``Database.session()``) to make several writes one transaction."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.url!r})"

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def location(self) -> str:
        """The SQLite file (or ``:memory:``), else the URL without its password."""
        return _location(self.engine.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: commits when the block ends, rolls back if it raises (SQLite: BEGIN IMMEDIATE)."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only transaction that never waits for writers (do not write in it)."""
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
        else:
            with self.session() as own:
                yield own

    def evidence_dir(self) -> Path:
        """Where probe images go: ``evidence/`` beside a SQLite file, else ``.safeguard/evidence`` in the cwd."""
        database = self.engine.url.database if self.dialect == "sqlite" else None
        if database and database != ":memory:":
            folder = Path(database).expanduser().resolve().parent / "evidence"
        else:
            folder = Path.cwd() / ".safeguard" / "evidence"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _missing(self, what: str, fix: str = "pick a run id from the list of recorded runs") -> AuditError:
        return AuditError(f"{what} is not in the audit database", file=self.location, fix=fix)

    # runs

    def start_run(self, kind: str, *, policy: Any = None, policy_name: str | None = None,
                  policy_sha256: str | None = None, policy_text: str | None = None,
                  policy_canonical_json: str | None = None, parent_run_id: str | None = None,
                  input_model_id: str | None = None, eraser_name: str | None = None,
                  eraser_version: str | None = None, eraser_params: Mapping[str, Any] | None = None,
                  seed: int | None = None, argv: Iterable[str] | None = None,
                  versions: Mapping[str, Any] | None = None, user: str | None = None,
                  host: str | None = None) -> str:
        """Record a 'running' run and commit at once, so a crash leaves a visible running row; returns its id.

        ``policy`` may be a ``safeguard.policy.LoadedPolicy``, filling the four policy fields; ``versions`` adds to
        (or overrides) ``collect_versions()``, e.g. with CUDA and GPU details.
        """
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
        if policy is not None:
            policy_name = policy_name or policy.policy.name
            policy_sha256 = policy_sha256 or policy.sha256
            policy_text = policy_text if policy_text is not None else policy.text
            policy_path = str(getattr(policy, "path", "") or "") or None
            policy_canonical_json = policy_canonical_json or policy.canonical_json
        with self.session() as session:
            if parent_run_id is not None and session.get(Run, parent_run_id) is None:
                raise self._missing(f"parent run {parent_run_id}")
            if input_model_id is not None and session.get(Model, input_model_id) is None:
                raise self._missing(f"input model {input_model_id}", fix="record it with record_model first")
            run = Run(kind=kind, status="running", started_at=utc_now(),
                      user=user if user is not None else _username(),
                      host=host if host is not None else socket.gethostname(), pid=os.getpid(),
                      argv=json_value(list(argv if argv is not None else sys.argv), "argv"),
                      versions=json_value({**collect_versions(), **(versions or {})}, "versions"),
                      policy_name=policy_name, policy_sha256=policy_sha256, policy_text=policy_text,
                      policy_path=policy_path if policy is not None else None,
                      policy_canonical_json=policy_canonical_json, parent_run_id=parent_run_id,
                      input_model_id=input_model_id, eraser_name=eraser_name, eraser_version=eraser_version,
                      eraser_params=json_document(eraser_params, "eraser_params"), seed=seed)
            session.add(run)
            session.flush()
            append_event(session, "run.started", {
                "kind": kind, "policy_sha256": policy_sha256, "parent_run_id": parent_run_id,
                "input_model_id": input_model_id, "eraser": eraser_name, "seed": seed,
                "records": _records_payload(session, Run, [run.id])}, run.id)
            return run.id

    def update_run(self, run_id: str, *, session: Session | None = None, **fields: Any) -> None:
        """Set fields of a running run (models, eraser, seed; ``stats`` is merged into what is there)."""
        unknown = sorted(set(fields) - set(_UPDATABLE_RUN_FIELDS))
        if unknown:
            raise ValueError(f"cannot update {', '.join(unknown)}; updatable: {', '.join(_UPDATABLE_RUN_FIELDS)}")
        with self._writing(session) as session:
            run = self._running_run(session, run_id)
            self._set_run_fields(session, run, fields)
            append_event(session, "run.updated", {"fields": sorted(fields),
                                                  "records": _records_payload(session, Run, [run.id])}, run.id)

    def _set_run_fields(self, session: Session, run: Run, fields: Mapping[str, Any]) -> None:
        for name, value in fields.items():
            if name in ("input_model_id", "output_model_id") and value is not None:
                if session.get(Model, value) is None:
                    raise self._missing(f"model {value}", fix="record it with record_model first")
            if name == "stats":
                value = {**(run.stats or {}), **(json_document(value, "stats") or {})}
            elif name == "eraser_params":
                value = json_document(value, name)
            setattr(run, name, value)

    def finish_run(self, run_id: str, status: str, error: str | None = None,
                   stats: Mapping[str, Any] | None = None, *, input_model_id: str | None = None,
                   output_model_id: str | None = None, session: Session | None = None) -> None:
        """End a running run as 'done' or 'failed'; ``stats`` is merged into the run's stats."""
        if status not in ("done", "failed"):
            raise ValueError(f"a run finishes as 'done' or 'failed', not {status!r}")
        with self._writing(session) as session:
            run = self._running_run(session, run_id)
            models = {k: v for k, v in (("input_model_id", input_model_id), ("output_model_id", output_model_id))
                      if v is not None}
            self._set_run_fields(session, run, models)
            self._finish(session, run, status, error, stats)

    def _finish(self, session: Session, run: Run, status: str, error: str | None,
                stats: Mapping[str, Any] | None) -> None:
        run.status, run.finished_at, run.error = status, utc_now(), error
        if stats is not None:
            run.stats = {**(run.stats or {}), **(json_document(stats, "stats") or {})}
        append_event(session, "run.finished", {"status": status, "error": error,
                                               "records": _records_payload(session, Run, [run.id])}, run.id)

    def reopen_run(self, run_id: str, *, session: Session | None = None) -> None:
        """Set a failed (or crashed, still 'running') run running again in this process, to resume it."""
        with self._writing(session) as session:
            run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
            if run is None:
                raise self._missing(f"run {run_id}")
            if run.status == "done":
                raise AuditError(f"run {run_id} is done; there is nothing to resume", file=self.location,
                                 fix="start a new run with this one as its parent")
            previous = {"status": run.status, "error": run.error, "pid": run.pid, "host": run.host}
            run.status, run.finished_at, run.error = "running", None, None
            run.pid, run.host = os.getpid(), socket.gethostname()
            append_event(session, "run.reopened", {"previous": previous,
                                                   "records": _records_payload(session, Run, [run.id])}, run.id)

    def mark_stale_running_runs_failed(self, older_than: timedelta | None = None) -> list[str]:
        """Fail 'running' runs whose process on this host is gone, or (given ``older_than``) that started before
        now - older_than; returns their ids."""
        this_host = socket.gethostname()
        cutoff = None
        if older_than is not None:
            cutoff = (datetime.now(timezone.utc) - older_than).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stale = []
        with self.session() as session:
            # Lock the rows before the chain head, the order every writer takes them in (no deadlock).
            running = session.scalars(select(Run).where(Run.status == "running").order_by(Run.id).with_for_update())
            for run in running.all():
                crashed = run.host == this_host and run.pid is not None and not _pid_alive(run.pid)
                if crashed or (cutoff is not None and run.started_at < cutoff):
                    why = "its process is gone" if crashed else f"it was still running after {older_than}"
                    self._finish(session, run, "failed", f"interrupted: {why}", None)
                    stale.append(run.id)
        return stale

    def _running_run(self, session: Session, run_id: str) -> Run:
        run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
        if run is None:
            raise self._missing(f"run {run_id}")
        if run.status != "running":
            raise AuditError(f"run {run_id} has already finished ({run.status}); evidence is only added to a "
                             "running run", file=self.location, fix="start a new run with this one as its parent")
        return run

    # models

    def record_model(self, path: str | os.PathLike, revision: str | None = None, role: str | None = None,
                     files: Iterable[Mapping[str, Any]] = (), tree_sha256: str | None = None, *,
                     session: Session | None = None) -> str:
        """Record a model by its files ({path, sha256, size}); returns its id, the existing one if already recorded.

        ``tree_sha256`` is the caller's hash over the file list (default: ``safeguard.db.tree_sha256(files)``).
        """
        entries = model_file_list(files)
        tree = tree_sha256 or _tree_sha256(entries)
        path = os.fspath(path)
        with self._writing(session) as session:
            model_id = _insert_ignoring_duplicates(session, Model, {
                "id": new_id(), "path": path, "revision": revision, "role": role, "files": entries,
                "tree_sha256": tree, "created_at": utc_now()}, ("tree_sha256", "path"))
            if model_id is None:
                return session.scalars(select(Model.id).where(Model.tree_sha256 == tree, Model.path == path)).one()
            append_event(session, "model.recorded", {
                "path": path, "revision": revision, "role": role, "tree_sha256": tree, "files": len(entries),
                "records": _records_payload(session, Model, [model_id])})
            return model_id

    # evidence

    def _add_rows(self, run_id: str, model: type[Base], rows: Iterable[Any], event_name: str, label_field: str,
                  session: Session | None) -> list[int]:
        allowed = {attr.key for attr in model.__mapper__.column_attrs} - {"id", "run_id", "created_at"}
        prepared = []
        for i, row in enumerate(rows):
            values = _as_mapping(row)
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ValueError(f"{model.__tablename__}[{i}]: unknown field(s) {', '.join(unknown)}")
            prepared.append(_prepare_row(model, values, f"{model.__tablename__}[{i}]"))
        with self._writing(session) as session:
            self._running_run(session, run_id)
            objects = [model(run_id=run_id, **values) for values in prepared]
            session.add_all(objects)
            session.flush()
            ids = [obj.id for obj in objects]
            if ids:
                append_event(session, event_name, {label_field: [values.get(label_field) for values in prepared],
                                                   "records": _records_payload(session, model, ids)}, run_id)
            return ids

    def add_concept_edits(self, run_id: str, edits: Iterable[Mapping[str, Any]], *,
                          session: Session | None = None) -> list[int]:
        """Record erased concepts ({concept, category, forget_prompts, retain_prompts, stats})."""
        return self._add_rows(run_id, ConceptEdit, edits, "concept_edits.added", "concept", session)

    def add_layer_edits(self, run_id: str, edits: Iterable[Any], *, session: Session | None = None) -> list[int]:
        """Record edited modules ({module, stats} or ``safeguard.erasers.LayerEdit``)."""
        return self._add_rows(run_id, LayerEdit, edits, "layer_edits.added", "module", session)

    def add_probe_result(self, run_id: str, *, probe: str, concept: str, status: str, n: int, hits: int | None,
                         rate: float | None = None, ci_low: float | None = None, ci_high: float | None = None,
                         threshold: float | None = None, details: Mapping[str, Any] | None = None,
                         judge_name: str | None = None, judge_version: str | None = None,
                         judge_sha256: str | None = None, session: Session | None = None) -> int:
        """Record one probe's result for one concept; ``rate`` defaults to hits / n."""
        values = dict(probe=probe, concept=concept, status=status, n=n, hits=hits, rate=rate, ci_low=ci_low,
                      ci_high=ci_high, threshold=threshold, details=details, judge_name=judge_name,
                      judge_version=judge_version, judge_sha256=judge_sha256)
        with self._writing(session) as session:
            self._running_run(session, run_id)
            if session.scalars(select(ProbeResult.id).where(ProbeResult.run_id == run_id, ProbeResult.probe == probe,
                                                            ProbeResult.concept == concept)).first() is not None:
                raise AuditError(f"run {run_id} already has a {probe} result for {concept!r}", file=self.location,
                                 fix="use replace_probe_results to recompute a run's results")
            return self._insert_probe_results(session, run_id, [values], "probe_result.added", {})[0]

    def replace_probe_results(self, run_id: str, rows: Iterable[Mapping[str, Any]], *,
                              session: Session | None = None) -> list[int]:
        """Replace all of a running run's probe results with ``rows`` (as ``add_probe_result`` takes them)."""
        rows = [dict(row) for row in rows]
        with self._writing(session) as session:
            self._running_run(session, run_id)
            old = session.scalars(select(ProbeResult.id).where(ProbeResult.run_id == run_id)).all()
            if old:
                session.execute(delete(ProbeResult).where(ProbeResult.id.in_(old)))
            removed = {str(key): None for key in old}  # a None digest records a deliberate deletion
            return self._insert_probe_results(session, run_id, rows, "probe_results.replaced", removed)

    def _insert_probe_results(self, session: Session, run_id: str, rows: list[dict[str, Any]], event_name: str,
                              removed: dict[str, None]) -> list[int]:
        allowed = {attr.key for attr in ProbeResult.__mapper__.column_attrs} - {"id", "run_id"}
        objects = []
        for i, values in enumerate(rows):
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ValueError(f"probe_results[{i}]: unknown field(s) {', '.join(unknown)}")
            if values.get("status") not in PROBE_STATUSES:
                raise ValueError(f"probe_results[{i}]: status must be one of {', '.join(PROBE_STATUSES)}, "
                                 f"not {values.get('status')!r}")
            if values.get("rate") is None and values.get("n") and values.get("hits") is not None:
                values = {**values, "rate": values["hits"] / values["n"]}
            objects.append(ProbeResult(run_id=run_id, **_prepare_row(ProbeResult, values, f"probe_results[{i}]")))
        session.add_all(objects)
        session.flush()
        records = _records_payload(session, ProbeResult, [obj.id for obj in objects])
        records["probe_results"] = {**removed, **records["probe_results"]}
        append_event(session, event_name, {
            "results": [{"probe": obj.probe, "concept": obj.concept, "status": obj.status} for obj in objects],
            "records": records}, run_id)
        return [obj.id for obj in objects]

    def add_sample(self, run_id: str, *, probe: str, concept: str, model_role: str, prompt: str, seed: int,
                   image_path: str | os.PathLike | None = None, image_sha256: str | None = None,
                   scores: Mapping[str, Any] | None = None, label: str | None = None,
                   session: Session | None = None) -> bool:
        """Record one judged sample; False (and nothing written) if its key is already recorded."""
        return self.add_samples(run_id, [dict(probe=probe, concept=concept, model_role=model_role, prompt=prompt,
                                              seed=seed, image_path=image_path, image_sha256=image_sha256,
                                              scores=scores, label=label)], session=session) == 1

    def add_samples(self, run_id: str, samples: Iterable[Mapping[str, Any]], *,
                    session: Session | None = None) -> int:
        """Record judged samples, skipping keys already recorded; returns how many were new."""
        allowed = {"probe", "concept", "model_role", "prompt", "seed", "image_path", "image_sha256", "scores", "label"}
        required = {"probe", "concept", "model_role", "prompt", "seed"}
        prepared = []
        for i, sample in enumerate(samples):
            values = dict(sample)
            unknown, missing = sorted(set(values) - allowed), sorted(required - set(values))
            if unknown or missing:
                raise ValueError(f"samples[{i}]: " + "; ".join(
                    part for part in (unknown and f"unknown field(s) {', '.join(unknown)}",
                                      missing and f"missing field(s) {', '.join(missing)}") if part))
            if values["model_role"] not in MODEL_ROLES:
                raise ValueError(f"samples[{i}]: model_role must be one of {', '.join(MODEL_ROLES)}")
            prepared.append(_prepare_row(Sample, values, f"samples[{i}]"))
        with self._writing(session) as session:
            self._running_run(session, run_id)
            created_at = utc_now()
            ids = [sample_id for values in prepared
                   if (sample_id := _insert_ignoring_duplicates(
                       session, Sample, {**values, "run_id": run_id, "created_at": created_at},
                       ("run_id", "probe", "concept", "model_role", "prompt", "seed"))) is not None]
            if ids:
                append_event(session, "samples.added", {"count": len(ids),
                                                        "records": _records_payload(session, Sample, ids)}, run_id)
            return len(ids)

    def recorded_sample_keys(self, run_id: str) -> set[tuple[str, str, str, str, int]]:
        """The (probe, concept, model_role, prompt, seed) keys already recorded for a run."""
        with self.read_session() as session:
            rows = session.execute(select(Sample.probe, Sample.concept, Sample.model_role, Sample.prompt, Sample.seed)
                                   .where(Sample.run_id == run_id))
            return {tuple(row) for row in rows}

    def add_gate_decision(self, run_id: str, verdict: str, exit_code: int, reasons: Iterable[Any] = (), *,
                          session: Session | None = None) -> int:
        """Record the gate's verdict on a run (finished or not: the gate judges runs after they end)."""
        with self._writing(session) as session:
            if session.get(Run, run_id) is None:
                raise self._missing(f"run {run_id}")
            decision = GateDecision(run_id=run_id, verdict=verdict, exit_code=int(exit_code),
                                    reasons=json_value(list(reasons), "reasons"), created_at=utc_now())
            session.add(decision)
            session.flush()
            append_event(session, "gate_decision.added", {
                "verdict": verdict, "exit_code": int(exit_code),
                "records": _records_payload(session, GateDecision, [decision.id])}, run_id)
            return decision.id

    def record_event(self, event_name: str, payload: Any = None, run_id: str | None = None, *,
                     session: Session | None = None) -> int:
        """Append a free-standing audit event; returns its seq."""
        if isinstance(payload, Mapping) and "records" in payload:
            raise ValueError("the payload key 'records' is reserved for the digests of rows safeguard writes")
        with self._writing(session) as session:
            return append_event(session, event_name, payload, run_id).seq

    # reading (plain dicts of column values, JSON-serialisable)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run with this id or a unique prefix of it."""
        with self.read_session() as session:
            return _columns(self._find_run(session, run_id))

    def _find_run(self, session: Session, run_id: str | None) -> Run:
        run = session.get(Run, run_id) if run_id else None
        if run is None and run_id:
            pattern = run_id.upper().replace("\\", "").replace("%", "").replace("_", "") + "%"
            matches = session.scalars(select(Run).where(Run.id.like(pattern)).limit(2)).all()
            if len(matches) > 1:
                raise AuditError(f"run id prefix {run_id!r} matches more than one run", file=self.location,
                                 fix="give more characters of the run id")
            run = matches[0] if matches else None
        if run is None:
            raise self._missing(f"run {run_id}")
        return run

    def list_runs(self, limit: int | None = 20, *, kind: str | None = None,
                  status: str | None = None) -> list[dict[str, Any]]:
        """Recorded runs, newest first."""
        query = select(Run).order_by(Run.started_at.desc(), Run.id.desc()).limit(limit)
        if kind is not None:
            query = query.where(Run.kind == kind)
        if status is not None:
            query = query.where(Run.status == status)
        with self.read_session() as session:
            return [_columns(run) for run in session.scalars(query)]

    def child_runs(self, run_id: str) -> list[dict[str, Any]]:
        """Runs whose parent is ``run_id``, oldest first."""
        with self.read_session() as session:
            query = select(Run).where(Run.parent_run_id == run_id).order_by(Run.started_at, Run.id)
            return [_columns(run) for run in session.scalars(query)]

    def run_models(self, run_id: str) -> list[dict[str, Any]]:
        """A run's input and output models, each with ``role`` "input" or "output" as it is for this run."""
        with self.read_session() as session:
            run = self._find_run(session, run_id)
            return [{**_columns(model), "role": role}
                    for role, model in (("input", run.input_model), ("output", run.output_model)) if model]

    def _rows(self, model: type[Base], run_id: str) -> list[dict[str, Any]]:
        with self.read_session() as session:
            query = select(model).where(model.run_id == run_id).order_by(model.id)
            return [_columns(row) for row in session.scalars(query)]

    def samples(self, run_id: str) -> list[dict[str, Any]]:
        """A run's recorded samples, in recording order."""
        return self._rows(Sample, run_id)

    def probe_results(self, run_id: str) -> list[dict[str, Any]]:
        """A run's probe results."""
        return self._rows(ProbeResult, run_id)

    def gate_decisions(self, run_id: str) -> list[dict[str, Any]]:
        """The gate's decisions on a run, oldest first."""
        return self._rows(GateDecision, run_id)

    def list_events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Audit events in chain order, all or one run's."""
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if run_id is not None:
            query = query.where(AuditEvent.run_id == run_id)
        with self.read_session() as session:
            return [_columns(e) for e in session.scalars(query)]

    def head(self) -> tuple[int, str]:
        """(seq, row_hash) of the chain's last event; (0, GENESIS_HASH) while it is empty."""
        with self.read_session() as session:
            head = session.get(AuditHead, 1)
            if head is None:
                raise AuditError("the audit_head row is missing", file=self.location,
                                 fix="run safeguard.audit.verify_chain and restore the database from a backup")
            return head.seq, head.row_hash

    def run_as_dict(self, run_id: str) -> dict[str, Any]:
        """Everything recorded about a run, JSON-serialisable: ``{"run": {...}, "input_model", "output_model",
        "concept_edits", "layer_edits", "probe_results", "samples", "gate_decisions", "events", ...}``."""
        with self.read_session() as session:
            run = self._find_run(session, run_id)
            lineage, parent = [], run.parent
            while parent is not None and parent.id not in lineage:
                lineage.append(parent.id)
                parent = parent.parent
            data = {
                "run": _columns(run),
                "lineage": lineage,  # ancestors, nearest first
                "children": list(session.scalars(select(Run.id).where(Run.parent_run_id == run.id)
                                                 .order_by(Run.started_at, Run.id))),
                "input_model": _columns(run.input_model) if run.input_model else None,
                "output_model": _columns(run.output_model) if run.output_model else None,
                "concept_edits": [_columns(r) for r in run.concept_edits],
                "layer_edits": [_columns(r) for r in run.layer_edits],
                "probe_results": [_columns(r) for r in run.probe_results],
                "samples": [_columns(r) for r in run.samples],
                "gate_decisions": [_columns(r) for r in run.gate_decisions],
                "events": [_columns(e) for e in run.events],
            }
            return json_value(data)


def _insert_ignoring_duplicates(session: Session, model: type[Base], values: dict[str, Any],
                                unique_columns: tuple[str, ...]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING; the new primary key, or None if the unique key already existed."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = model.__table__
    statement = (insert(table).values(**values).on_conflict_do_nothing(index_elements=list(unique_columns))
                 .returning(next(iter(table.primary_key.columns))))
    return session.execute(statement).scalar_one_or_none()
