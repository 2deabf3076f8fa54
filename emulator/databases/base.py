"""The small interface every database provider (and proxy) implements, and the helpers they share.

A provider is a context manager: `start()` returns it ready (a real query succeeded), it exposes the
URL handlers use and the facts the sampler needs, and `stop()` is idempotent. "We start the server"
(embedded, native, docker) is kept apart from "use an existing server" (external).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import DatabaseStartError
from ..processes import die_with_parent

#: Every data directory, config and log a run creates lives under a folder named with this prefix and
#: the run id, so `lambdaemu cleanup` (and the next run) can find leftovers.
WORKDIR_PREFIX = "lambdaemu-"

#: Unprivileged system user that runs servers when lambdaemu itself runs as root (initdb refuses root).
SERVER_USER = "lambdaemu"


@dataclass(frozen=True)
class ConnectionRow:
    """One server-side connection as the sampler sees it."""

    state: str  # active | idle | idle_in_transaction | other
    client_port: int | None
    application_name: str = ""


@dataclass(frozen=True)
class ProxyStats:
    """What a connection proxy reports at one instant (PgBouncer SHOW POOLS / CLIENTS)."""

    client_connections: int
    server_connections: int
    waiting_clients: int
    max_wait_ms: float
    client_ports: tuple[int, ...] = ()


class Database:
    """Base class of database providers. Subclasses implement `_start`, `_stop`, `admin_connect`,
    `connections` and fill in the attributes below."""

    #: "postgres" or "mysql"
    engine: str = "postgres"
    #: provider name as given to --provider
    provider: str = ""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.user = ""
        self.password = ""
        self.dbname = ""
        self.max_connections = 0
        self.version = ""
        self._started = False
        self._stopped = False

    def __getstate__(self) -> dict[str, Any]:
        # A started provider is handed to the sampler process: it needs the addresses and credentials,
        # not the handles of the processes this one started (which cannot cross a process boundary).
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, subprocess.Popen)}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Database":
        """Start (or attach to) the server and return once a real query succeeds."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the server and remove what was created. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self._stop()

    def __enter__(self) -> "Database":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    # -- what handlers and the sampler use -------------------------------------------------------------
    @property
    def url(self) -> str:
        """URL handlers get as DATABASE_URL (with the password: never written to results)."""
        scheme = "postgresql" if self.engine == "postgres" else "mysql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"

    def handler_env(self) -> dict[str, str]:
        """Environment variables that give handler code the database, the way Lambda's config would."""
        env = {
            "DATABASE_URL": self.url,
            "DB_ENGINE": self.engine,
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_USER": self.user,
            "DB_PASSWORD": self.password,
            "DB_NAME": self.dbname,
        }
        if self.engine == "postgres":
            env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user,
                       PGPASSWORD=self.password, PGDATABASE=self.dbname)
        return env

    def describe(self) -> dict[str, Any]:
        """Facts for run.json (no password)."""
        return {"engine": self.engine, "provider": self.provider, "host": self.host, "port": self.port,
                "user": self.user, "dbname": self.dbname, "max_connections": self.max_connections,
                "version": self.version}

    def admin_connect(self) -> Any:
        """A new DB-API connection (autocommit) for the sampler; its own session is excluded from counts."""
        raise NotImplementedError

    def connections(self, conn: Any) -> list[ConnectionRow]:
        """Client connections the server has now, excluding `conn`'s own session and background workers."""
        raise NotImplementedError


# --- helpers shared by the providers that start servers ---------------------------------------------


def random_password() -> str:
    """A fresh password per run; URL-safe so it needs no quoting in DATABASE_URL."""
    return secrets.token_urlsafe(18)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def running_as_root() -> bool:
    return os.geteuid() == 0


def server_user() -> pwd.struct_passwd | None:
    """The account servers run as: the current user, or (as root) an unprivileged system user that is
    created on first use. None means "run as the current user"."""
    if not running_as_root():
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def make_workdir(run_id: str, kind: str) -> Path:
    """A private working directory for one server of one run, owned by the server user."""
    path = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{run_id}-{kind}-"))
    # Who made it, so `lambdaemu cleanup` can tell a leftover from a directory in use.
    (path / "owner.pid").write_text(f"{os.getpid()} {time.time():.0f}\n")
    user = server_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def chown_tree(path: Path) -> None:
    """Give a tree to the server user (no-op when not root)."""
    user = server_user()
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)
    os.chown(path, user.pw_uid, user.pw_gid)


def spawn_server(argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start a server process as the server user, in its own process group, logging to `log_path`."""
    user = server_user()
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None, preexec_fn=die_with_parent(signal.SIGTERM),  # a server shuts down cleanly
        )
    finally:
        log.close()


def run_as_server_user(argv: list[str], log_path: Path | None = None, timeout: float = 60,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a one-shot tool (initdb, mariadb-install-db) as the server user; raise with its output."""
    user = server_user()
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})},
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise DatabaseStartError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from exc
    if log_path is not None:
        with open(log_path, "a") as fh:
            fh.write(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise DatabaseStartError(f"{Path(argv[0]).name} failed (exit {result.returncode}): " + " | ".join(tail))
    return result


def stop_process(proc: subprocess.Popen | None, term_signal: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Stop a server started by `spawn_server`: polite signal, grace, then SIGKILL to its process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, term_signal)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a server log, for error messages."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def wait_ready(check: Callable[[], Any], *, what: str, timeout_s: float, retry_on: Iterable[type[BaseException]],
               proc: subprocess.Popen | None = None, log_path: Path | None = None, hint: str = "",
               poll_s: float = 0.05) -> Any:
    """Poll `check` (a real query) until it succeeds: every wait has a timeout, a poll interval and the
    errors it retries on. On failure the message carries the tail of the server log and a hint."""
    retry = tuple(retry_on)
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise DatabaseStartError(
                f"{what} exited with status {proc.returncode} before it was ready.\n"
                f"{log_tail(log_path) if log_path else ''}\nHint: {hint or 'see the server log above'}"
            )
        try:
            return check()
        except retry as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise DatabaseStartError(
                f"{what} was not ready after {timeout_s:g}s (last error: {str(last).strip()}).\n"
                f"{log_tail(log_path) if log_path else ''}\nHint: {hint or 'see the server log above'}"
            )
        time.sleep(poll_s)


def remove_workdir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
