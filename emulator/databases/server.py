"""A server lambdaemu starts: one engine (what the server is) started by one launcher (how it runs).

An `Engine` (postgres.py, mysql.py) knows its settings and their accepted ranges, the users it creates,
its server options, its sampling queries, its counters and the log lines that mean a refusal. It starts
nothing. A `Launcher` (embedded.py, native.py, docker.py) starts and stops a server process or container
for an engine, and gives a superuser connection to the fresh server. `Server` joins the two with the
start-up every launcher shares: free port, retry on bind errors, readiness with a deadline (a real
query), then the users, then a real query as every application's user.

Adding a launcher is one file: a `Launcher` subclass with `_launch_<engine>` methods, named in
`databases.LAUNCHERS`.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any, Iterable

from ..errors import DatabaseStartError, UsageError
from .base import (DEFAULT_APPLICATION, Account, ConnectionRow, Database, LogCounter, ServerCounters,
                   launch_until_ready, random_password)

#: The sampler's account on every server lambdaemu starts (a superuser: it may use reserved slots).
ADMIN_USER = "lambdaemu_admin"
#: The database every application uses.
APP_DB = "app"
#: Names application users may be built from: Lambda's own function-name characters.
_USER_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")


class Engine:
    """What a database server is, apart from how it is started. Subclasses fill in the class attributes
    and the methods that raise NotImplementedError."""

    #: "postgres" or "mysql"
    name = ""
    #: How messages name it ("PostgreSQL", "MariaDB", "MySQL").
    label = ""
    default_max_connections = 0
    #: Longest user name, in bytes, and what the limit is called in the engine's documentation.
    user_name_limit = 0
    user_name_limit_source = ""
    #: Names an application cannot have (accounts lambdaemu itself creates or the engine reserves).
    reserved_users: tuple[str, ...] = (ADMIN_USER,)
    #: Server log lines that mean "refused for lack of connection slots" (None: counted from status).
    refusal_log: re.Pattern[bytes] | None = None
    #: Server log text that means the port was taken between choosing and binding it.
    bind_error = re.compile(r"could not bind|already in use", re.I)

    def __init__(self, *, max_connections: int | None = None, idle_timeout_s: float | None = None) -> None:
        self.max_connections = max_connections or self.default_max_connections
        self.idle_timeout_s = idle_timeout_s
        self.check_max_connections()

    # -- settings, validated before anything starts -----------------------------------------------
    def accepted_max_connections(self) -> tuple[int, int]:
        """The smallest and largest max_connections the engine starts with."""
        raise NotImplementedError

    def max_connections_reason(self) -> str:
        """Why the range is what it is, for the error message."""
        return ""

    def check_max_connections(self) -> None:
        """Raise UsageError (naming the flag, the value and the accepted range) for a value the server
        would refuse or silently change."""
        low, high = self.accepted_max_connections()
        if not low <= self.max_connections <= high:
            why = self.max_connections_reason()
            raise UsageError(f"--max-connections {self.max_connections}: {self.label} accepts {low} to {high}"
                             f"{f' ({why})' if why else ''}; choose a value in that range")

    def user_name(self, application: str) -> str:
        """The database user of `application`: the application's own name, checked against what the
        engine can create. Raises UsageError naming the application and the fix."""
        fix = "rename the application"
        if not _USER_CHARS.match(application):
            raise UsageError(f"application {application!r}: its database user would be named after it, and user "
                             f"names may use only letters, digits, '-' and '_' (as Lambda function names do); {fix}")
        size = len(application.encode())
        if size > self.user_name_limit:
            raise UsageError(f"application {application!r}: {size} characters, but {self.label} user names are at most "
                             f"{self.user_name_limit} ({self.user_name_limit_source}); {fix} to "
                             f"{self.user_name_limit} characters or fewer")
        if application.lower() in self.reserved_users:
            raise UsageError(f"application {application!r}: {application!r} is a user lambdaemu or {self.label} "
                             f"keeps for itself; {fix}")
        return application

    def describe(self) -> dict[str, Any]:
        """Engine facts for run.json."""
        return {"idle_timeout_s": self.idle_timeout_s}

    # -- talking to a server ---------------------------------------------------------------------------
    def connect(self, *, host: str, port: int, user: str, password: str, dbname: str | None = None,
                **kwargs: Any) -> Any:
        """A DB-API connection (autocommit) whose connect and reads all have deadlines."""
        raise NotImplementedError

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver errors a readiness check retries on."""
        raise NotImplementedError

    def bootstrap(self, conn: Any, accounts: Iterable[Account], *, admin_password: str,
                  client_hosts: tuple[str, ...]) -> None:
        """Create the admin account, the application database and one user per application, through
        `conn` (the launcher's superuser connection to the fresh server)."""
        raise NotImplementedError

    def facts(self, conn: Any) -> tuple[int, str]:
        """The server's max_connections and version."""
        raise NotImplementedError

    def connections(self, conn: Any) -> list[ConnectionRow]:
        """Client connections the server has now (excluding `conn`'s own session)."""
        raise NotImplementedError

    def counters(self, conn: Any, refused_in_log: int | None) -> ServerCounters:
        """Cumulative counters; `refused_in_log` is the count of refusal lines in the server log, when
        the launcher can read it."""
        raise NotImplementedError

    def terminate_sessions(self, conn: Any, users: Iterable[str]) -> None:
        """Ask the server to end every session of `users` (through `conn`, the admin's connection)."""
        raise NotImplementedError


class Launcher:
    """How servers are started: one subclass per provider (embedded, native, docker). A launcher object
    serves one server (or one proxy) and is not reused."""

    #: provider name as given to --provider
    name = ""
    #: Hosts the application users may connect from, as the server sees them.
    client_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")

    def prepare(self, target: Any) -> None:
        """Once per start, before the first launch (data directory, configuration files, ...)."""

    def launch(self, target: Any, port: int) -> None:
        """Start one instance of `target` (a Server or a proxy) listening on 127.0.0.1:`port`."""
        method = getattr(self, f"_launch_{target.kind}", None)
        if method is None:
            raise UsageError(f"--provider {self.name} cannot start {target.kind}")
        method(target, port)

    def bootstrap_connect(self, target: "Server") -> Any:
        """A superuser connection to the freshly launched server (for readiness and creating users)."""
        raise NotImplementedError

    def exited(self) -> str | None:
        """Why the current instance is gone ("exited with status 1"), or None while it runs."""
        raise NotImplementedError

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the current instance's log."""
        raise NotImplementedError

    def log_reader(self) -> Any:
        """`read_new` for LogCounter over the server's log, or None when it cannot be read."""
        return None

    def kill(self) -> None:
        """End the current instance at once (a failed attempt)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and remove everything this launcher created."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Launcher facts for run.json."""
        return {}

    def __getstate__(self) -> dict[str, Any]:
        # Handed to the sampler process with its server: what it started stays with the process that
        # started it.
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, subprocess.Popen)}


class Server(Database):
    """A database server lambdaemu starts: `engine` started by `launcher`, with one user per application."""

    @property
    def workdir(self) -> Any:
        """The launcher's private work directory (data, socket, log), when it has one."""
        return getattr(self.launcher, "workdir", None)

    @property
    def log_path(self) -> Any:
        """The server's log file (native and embedded launchers)."""
        return self.launcher.log_path  # type: ignore[attr-defined]

    def __init__(self, engine: Engine, launcher: Launcher, *, run_id: str,
                 applications: Iterable[str] = (DEFAULT_APPLICATION,)) -> None:
        super().__init__(applications)
        self.engine_impl = engine
        self.engine = engine.name
        self.kind = engine.name
        self.launcher = launcher
        self.provider = launcher.name
        self.run_id = run_id
        self.dbname = APP_DB
        self.requested_max_connections = engine.max_connections
        self.admin_user = ADMIN_USER
        self.admin_password = ""
        #: The port the sampler's admin account connects to (MariaDB's extra_port; else the main port).
        self.admin_port = 0
        # Checked now, before anything starts.
        self._users = {app: engine.user_name(app) for app in self.applications}
        self._refusals: LogCounter | None = None

    def _start(self) -> None:
        engine, launcher = self.engine_impl, self.launcher
        self.admin_password = random_password()
        accounts = {app: Account(app, user, random_password()) for app, user in self._users.items()}
        launcher.prepare(self)

        def launch(port: int) -> None:
            self.port = port
            launcher.launch(self, port)

        def check() -> None:
            with launcher.bootstrap_connect(self) as conn:
                _execute(conn, "SELECT 1")

        launch_until_ready(launch, check, what=engine.label, retry_on=engine.errors, kill=launcher.kill,
                           exited=launcher.exited, tail=launcher.log_tail, bind_error=engine.bind_error,
                           hint="see the server log above")
        with launcher.bootstrap_connect(self) as conn:
            engine.bootstrap(conn, accounts.values(), admin_password=self.admin_password,
                             client_hosts=launcher.client_hosts)
        self.accounts = accounts
        with self.admin_connect() as conn:
            self.max_connections, self.version = engine.facts(conn)
        if self.max_connections != self.requested_max_connections:
            raise UsageError(f"--max-connections {self.requested_max_connections}: {engine.label} runs with "
                             f"{self.max_connections} instead (see its log); choose a value it accepts")
        # Ready means every application's user can run a real query over TCP.
        for account in accounts.values():
            try:
                with engine.connect(host=self.host, port=self.port, user=account.user, password=account.password,
                                    dbname=self.dbname) as conn:
                    _execute(conn, "SELECT 1")
            except engine.errors as exc:
                raise DatabaseStartError(f"{engine.label}: the user of application {account.application!r} cannot "
                                         f"connect ({str(exc).strip()})") from None
        self.refusal_pattern = engine.refusal_log
        self._started = True  # the log counter may be made from here on
        self.refusal_counter()

    def _stop(self) -> None:
        self.launcher.stop()

    def admin_connect(self) -> Any:
        """A connection as the admin account (on the administrative port where the engine has one)."""
        return self.engine_impl.connect(host=self.host, port=self.admin_port or self.port, user=self.admin_user,
                                        password=self.admin_password, dbname=None,
                                        application_name="lambdaemu-sampler")

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return self.engine_impl.connections(conn)

    def clear_sessions(self, timeout_s: float = 10.0) -> None:
        """End the applications' sessions (see `Database.clear_sessions`). The server's cumulative
        counters (sessions opened, refusals) keep counting: a run reads them as differences from its own
        first sample, so nothing needs resetting."""
        users = {account.user for account in self.accounts.values()}
        deadline = time.monotonic() + timeout_s
        with self.admin_connect() as conn:
            while True:
                # An attempt still connecting has no user yet: wait for it to settle too.
                left = [row for row in self.engine_impl.connections(conn) if row.user in users or not row.established]
                if not left:
                    return
                if time.monotonic() >= deadline:
                    raise DatabaseStartError(f"{self.engine_impl.label}: {len(left)} sessions of the applications "
                                             f"were still open {timeout_s:g}s after being ended")
                self.engine_impl.terminate_sessions(conn, sorted(users))
                time.sleep(0.05)

    def counters(self, conn: Any) -> ServerCounters:
        """Sessions opened and refusals; refusals from the server log where the engine logs them."""
        counter = self.refusal_counter()
        return self.engine_impl.counters(conn, counter.poll() if counter is not None else None)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.engine_impl.describe(), "launcher": self.launcher.describe()}


def _execute(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()

