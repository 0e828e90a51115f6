"""Opening an audit database: engines for SQLite and PostgreSQL with safeguard's connection settings, and the
alembic migrations, run to head on open."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from safeguard.errors import AuditError

SQLITE_BUSY_TIMEOUT_S = 60  # writers wait this long for the lock instead of failing with "database is locked"
READ_ONLY = "safeguard_read_only"  # execution option: SQLite read transactions use a plain BEGIN
_MIGRATION_LOCK_KEY = 0x5AFE_6A4D  # pg_advisory_xact_lock key that serialises concurrent migrations


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
    read_only = connection.get_execution_options().get(READ_ONLY)
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
        return Path(__file__).resolve().parents[2] / "migrations"


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
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection, connection.begin():
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


def open_db(url: str | None = None):
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
    from .store import Database

    return Database(engine)
