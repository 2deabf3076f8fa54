"""What every database provider (and proxy) offers, and the start-up machinery the launchers share.

A provider is a context manager: `start()` returns it ready (a real query succeeded), it exposes the
URL handlers use and the facts the sampler needs, and `stop()` is idempotent. "We start the server"
(`server.Server`, with an embedded, native or docker launcher) is kept apart from "use an existing
server" (`external.py`).

Every application (a Lambda function or a service) connects as its own database user, so the database
itself can say who holds the connections: `accounts` maps application → `Account`, and
`handler_env(application)` gives that application's credentials.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import DatabaseStartError, UsageError
from ..processes import die_with_parent

#: Every data directory, config and log a run creates lives under a folder named with this prefix and
#: the run id, so `lambdaemu cleanup` (and the next run) can find leftovers.
WORKDIR_PREFIX = "lambdaemu-"

#: Unprivileged system user that runs servers when lambdaemu itself runs as root (initdb refuses root).
SERVER_USER = "lambdaemu"

#: The application a one-function run has (and its database user's name).
DEFAULT_APPLICATION = "app"

#: Connection states of `ConnectionRow.state`. "connecting" is an attempt the server has accepted but
#: not yet authenticated, or is refusing: it holds a server slot for a moment but is not a session.
STATES = ("active", "idle", "idle_in_transaction", "other", "connecting")

#: Longest wait for a server's answer when connecting or querying from lambdaemu itself (start-up
#: checks, the sampler): a server that accepts TCP connections and then says nothing must not hang a run.
CONNECT_TIMEOUT_S = 5
QUERY_TIMEOUT_S = 10


@dataclass(frozen=True)
class ConnectionRow:
    """One server-side connection as the sampler sees it."""

    state: str  # one of STATES
    client_port: int | None
    application_name: str = ""
    #: The database user (so the application) the connection belongs to; "" while still connecting.
    user: str = ""

    @property
    def established(self) -> bool:
        """A session, as opposed to an attempt still authenticating or being refused."""
        return self.state != "connecting"


@dataclass(frozen=True)
class ProxyStats:
    """What a connection proxy reports at one instant (PgBouncer SHOW POOLS / CLIENTS)."""

    client_connections: int
    server_connections: int
    waiting_clients: int
    max_wait_ms: float
    client_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters read from the server side (None: this server or launcher cannot know).

    `sessions_opened` counts sessions established since the server started (connection churn when
    differenced); `refused` counts connection attempts the server turned away for lack of slots."""

    sessions_opened: int | None
    refused: int | None


@dataclass(frozen=True)
class Account:
    """The database user of one application."""

    application: str
    user: str
    password: str


class Database:
    """Base class of database providers. Subclasses implement `_start`, `_stop`, `admin_connect`,
    `connections` and `counters`, and fill in the attributes below."""

    #: "postgres" or "mysql"
    engine: str = "postgres"
    #: provider name as given to --provider
    provider: str = ""

    def __init__(self, applications: Iterable[str] = (DEFAULT_APPLICATION,)) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.dbname = ""
        self.max_connections = 0
        self.version = ""
        self.applications: tuple[str, ...] = tuple(applications) or (DEFAULT_APPLICATION,)
        if len(set(self.applications)) != len(self.applications):
            raise UsageError(f"applications {list(self.applications)}: every application needs its own name")
        #: application → Account; filled in by start() (servers lambdaemu starts) or from URLs (external).
        self.accounts: dict[str, Account] = {}
        self._started = False
        self._stopped = False

    def __getstate__(self) -> dict[str, Any]:
        # A started provider is handed to the sampler process: it needs the addresses and credentials,
        # not the handles of the processes this one started (which cannot cross a process boundary). A
        # log counter is made again there, on first use, reading the log from its start.
        state = {k: v for k, v in self.__dict__.items() if not isinstance(v, (subprocess.Popen, LogCounter))}
        state["_refusals"] = None
        return state

    def refusal_counter(self) -> "LogCounter | None":
        """The counter of refusal lines in this server's log, made on first use (in whichever process
        asks), or None when the log cannot be read."""
        counter = self.__dict__.get("_refusals")
        pattern = getattr(self, "refusal_pattern", None)
        launcher = getattr(self, "launcher", None)
        if counter is None and pattern is not None and launcher is not None and self._started:
            reader = launcher.log_reader()
            if reader is not None:
                counter = self._refusals = LogCounter(reader, pattern)
        return counter

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

    # -- what handlers use -------------------------------------------------------------------------
    def account(self, application: str | None = None) -> Account:
        """The database account of `application` (the first application when None)."""
        name = application or self.applications[0]
        try:
            return self.accounts[name]
        except KeyError:
            raise UsageError(f"application {name!r} has no database user on this server; "
                             f"known applications: {', '.join(self.applications)}") from None

    @property
    def user(self) -> str:
        """The first application's database user."""
        return self.account().user if self.accounts else ""

    @property
    def password(self) -> str:
        """The first application's password (never written to results)."""
        return self.account().password if self.accounts else ""

    def url_for(self, application: str | None = None) -> str:
        """URL `application` connects with (with its password: never written to results)."""
        account = self.account(application)
        scheme = "postgresql" if self.engine == "postgres" else "mysql"
        return f"{scheme}://{account.user}:{account.password}@{self.host}:{self.port}/{self.dbname}"

    @property
    def url(self) -> str:
        """URL handlers of the first application get as DATABASE_URL."""
        return self.url_for()

    def handler_env(self, application: str | None = None) -> dict[str, str]:
        """Environment variables that give `application`'s handler code the database, the way Lambda's
        configuration would (the first application when None)."""
        account = self.account(application)
        env = {
            "DATABASE_URL": self.url_for(application),
            "DB_ENGINE": self.engine,
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_USER": account.user,
            "DB_PASSWORD": account.password,
            "DB_NAME": self.dbname,
        }
        if self.engine == "postgres":
            env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=account.user,
                       PGPASSWORD=account.password, PGDATABASE=self.dbname)
        return env

    def describe(self) -> dict[str, Any]:
        """Facts for run.json (no password)."""
        return {"engine": self.engine, "provider": self.provider, "host": self.host, "port": self.port,
                "user": self.user, "dbname": self.dbname, "max_connections": self.max_connections,
                "version": self.version,
                "users": {app: account.user for app, account in self.accounts.items()}}

    # -- what the sampler uses ---------------------------------------------------------------------
    def admin_connect(self) -> Any:
        """A new DB-API connection (autocommit) for the sampler; its own session is excluded from counts."""
        raise NotImplementedError

    def connections(self, conn: Any) -> list[ConnectionRow]:
        """Client connections the server has now, excluding `conn`'s own session and background workers."""
        raise NotImplementedError

    def counters(self, conn: Any) -> ServerCounters:
        """Cumulative sessions opened and connections refused, read through `conn` (from admin_connect)."""
        raise NotImplementedError

    def clear_sessions(self, timeout_s: float = 10.0) -> None:
        """End every session the applications' users still have, and return once the server lists none:
        the state a fresh server starts a run with, as far as connections go. For a server that several
        runs share (a sweep, a test session); a server lambdaemu did not start is not cleared."""
        raise UsageError(f"--provider {self.provider}: lambdaemu does not end sessions on a server it did not "
                         "start; give each run a server of its own")


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
    """Whether lambdaemu runs as root (servers then run as SERVER_USER)."""
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


def check_workdir_root(setting: str = "TMPDIR") -> Path:
    """The directory work directories go in (the temporary directory), checked before anything starts:
    as root, servers run as SERVER_USER, who must be able to reach their own work directory."""
    base = Path(tempfile.gettempdir())
    if running_as_root():
        for parent in [base, *base.parents]:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise UsageError(f"{setting}={base}: {parent} cannot be entered by other users, so the "
                                 f"database server (running as the unprivileged user {SERVER_USER!r}) could not "
                                 f"reach its data directory; point {setting} at a directory such as /tmp")
    return base


def make_workdir(run_id: str, kind: str) -> Path:
    """A private working directory for one server of one run, owned by the server user, with a `tmp/`
    of its own: the server's temporary files never depend on the caller's TMPDIR being writable by it."""
    path = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{run_id}-{kind}-"))
    # Who made it, so `lambdaemu cleanup` can tell a leftover from a directory in use.
    (path / "owner.pid").write_text(f"{os.getpid()} {time.time():.0f}\n")
    (path / "tmp").mkdir(mode=0o700)
    chown_tree(path)
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


def server_env(workdir: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process or one-shot tool: ours, with TMPDIR in its own work directory."""
    env = {**os.environ, **(extra or {})}
    if workdir is not None:
        env["TMPDIR"] = str(workdir / "tmp")
    return env


def spawn_server(argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start a server process as the server user, in its own process group, logging to `log_path`.
    Its TMPDIR is the `tmp/` of the work directory `log_path` lives in."""
    user = server_user()
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
            env=server_env(log_path.parent, env), start_new_session=True,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None, preexec_fn=die_with_parent(signal.SIGTERM),  # a server shuts down cleanly
        )
    finally:
        log.close()


def run_as_server_user(argv: list[str], log_path: Path, timeout: float = 60,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a one-shot tool (initdb, mariadb-install-db) as the server user with the work directory's
    own TMPDIR; raise with its output."""
    user = server_user()
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=server_env(log_path.parent, env),
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise DatabaseStartError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from exc
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
               exited: Callable[[], str | None] = lambda: None, tail: Callable[[], str] = lambda: "",
               hint: str = "", poll_s: float = 0.05) -> Any:
    """Poll `check` (a real query) until it succeeds: every wait has a timeout, a poll interval and the
    errors it retries on. `exited` says why the server is gone (None while it runs). On failure the
    message carries the tail of the server log and a hint."""
    retry = tuple(retry_on)
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        gone = exited()
        if gone is not None:
            raise DatabaseStartError(f"{what} {gone} before it was ready.\n{tail()}\n"
                                     f"Hint: {hint or 'see the server log above'}")
        try:
            return check()
        except retry as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise DatabaseStartError(
                f"{what} was not ready after {timeout_s:g}s (last error: {str(last).strip()}).\n"
                f"{tail()}\nHint: {hint or 'see the server log above'}"
            )
        time.sleep(poll_s)


def launch_until_ready(launch: Callable[[int], None], check: Callable[[], Any], *, what: str,
                       retry_on: Iterable[type[BaseException]], kill: Callable[[], None],
                       exited: Callable[[], str | None], tail: Callable[[], str], bind_error: re.Pattern[str],
                       timeout_s: float = 60, hint: str = "", attempts: int = 3) -> int:
    """The start-up every launcher shares: choose a free port, launch, and wait for a real query with a
    deadline; when the port was taken between choosing and binding it (the server log says so), try
    again on another. Returns the port."""
    for attempt in range(attempts):
        port = free_port()
        launch(port)
        try:
            wait_ready(check, what=what, timeout_s=timeout_s, retry_on=retry_on, exited=exited, tail=tail, hint=hint)
            return port
        except DatabaseStartError:
            kill()
            if attempt == attempts - 1 or not bind_error.search(tail()):
                raise
    raise AssertionError("unreachable")


def process_exited(proc: subprocess.Popen | None) -> str | None:
    """`exited` for `wait_ready` over a local process."""
    if proc is not None and proc.poll() is not None:
        return f"exited with status {proc.returncode}"
    return None


class LogCounter:
    """Counts the lines of a growing server log that match a pattern, reading only what is new on each
    call (the log of a long run is never read twice). `read_new` returns the bytes appended since the
    previous call."""

    def __init__(self, read_new: Callable[[], bytes], pattern: re.Pattern[bytes]) -> None:
        self._read_new = read_new
        self._pattern = pattern
        self._partial = b""
        self.count = 0

    def poll(self) -> int:
        """Read what the log gained and return the running count."""
        data = self._partial + self._read_new()
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line is counted once it is complete
        self.count += sum(1 for line in lines if self._pattern.search(line))
        return self.count


def file_reader(path: Path) -> Callable[[], bytes]:
    """`read_new` for LogCounter over a file: what was appended since the last call."""
    offset = 0

    def read_new() -> bytes:
        nonlocal offset
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return b""
        offset += len(data)
        return data

    return read_new


def remove_workdir(path: Path | None) -> None:
    """Remove a server's work directory and everything in it."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
