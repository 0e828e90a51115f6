"""A throwaway PostgreSQL server for tests: ``SAFEGUARD_TEST_PG_URL`` if set, else initdb + pg_ctl in a temp folder.

The server listens only on a unix socket inside its folder (no TCP port to collide with), trusts local connections
and runs with fsync off. initdb refuses to run as root, so under root the server runs as the ``postgres`` user
(created by Debian's postgresql package), else ``nobody``.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PORT = 5432  # only names the socket file; no TCP listener is opened


class PostgresUnavailable(RuntimeError):
    """The test server could not be started or reached."""


def find_binary(name: str) -> str:
    """``name`` from PATH, else from the newest /usr/lib/postgresql/<version>/bin (Debian puts them there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise PostgresUnavailable(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin "
                              "(install it: apt-get install -y postgresql)")


def _server_user() -> str | None:
    """The OS user to run the server as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and there is no 'postgres' or 'nobody' user to run the server as "
                              "(create one: useradd --system postgres)")


def _runuser() -> str:
    for candidate in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise PostgresUnavailable("running as root needs runuser (util-linux) to start the server as another user")


class PostgresServer:
    """A running server; ``url(database)`` names a database on it, ``create_database()`` makes a fresh one."""

    def __init__(self, admin_url: str, stop=None):
        self.admin_url = admin_url
        self._stop = stop
        self._engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with self._engine.connect() as connection:
                self.version = connection.execute(text("SHOW server_version")).scalar_one()
        except Exception as e:
            self.stop()
            problem = str(getattr(e, "orig", e)).strip()
            raise PostgresUnavailable(f"cannot connect to {make_url(admin_url).render_as_string()}: {problem}") from e

    def url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"safeguard_test_{uuid.uuid4().hex[:12]}"
        with self._engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0'))
        return self.url(name)

    def stop(self) -> None:
        self._engine.dispose()
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_postgres() -> PostgresServer:
    """Use ``SAFEGUARD_TEST_PG_URL`` (its role needs CREATEDB) or start a private server; raises PostgresUnavailable."""
    if os.environ.get("SAFEGUARD_TEST_PG_URL"):
        return PostgresServer(os.environ["SAFEGUARD_TEST_PG_URL"])
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    user = _server_user()
    as_user = [_runuser(), "-u", user, "--"] if user else []
    # Short path under /tmp: a unix socket path must stay under ~107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="sgpg-", dir="/tmp"))
    data, log = folder / "data", folder / "server.log"
    if user:
        account = pwd.getpwnam(user)
        os.chown(folder, account.pw_uid, account.pw_gid)

    def run(args: list[str], what: str) -> None:
        try:
            done = subprocess.run(as_user + args, capture_output=True, text=True, timeout=120, cwd=folder)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostgresUnavailable(f"{what} could not run: {e}") from e
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            output = done.stderr.strip() or done.stdout.strip()
            raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {output}"
                                      + (f"\nserver log:\n{tail}" if tail else ""))

    def stop() -> None:
        try:
            if (data / "postmaster.pid").exists():
                subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                               capture_output=True, timeout=60, cwd=folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)  # a test session that dies early must not leave a server running
    try:
        run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
            "initdb")
        options = f"-k {folder} -p {PORT} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"], "pg_ctl start")
    except BaseException:
        stop()
        raise
    return PostgresServer(f"postgresql+psycopg2://postgres@/postgres?host={folder}&port={PORT}", stop)
