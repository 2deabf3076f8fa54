"""PgBouncer in front of a PostgreSQL provider: the local stand-in for Amazon RDS Proxy.

Handlers connect to PgBouncer (its `url`, `handler_env(application)`); PgBouncer holds the connections
to the PostgreSQL server. The `native` launcher starts Debian's `/usr/sbin/pgbouncer` with a generated
ini in a private work directory labelled with the run id; the `docker` launcher starts the
edoburu/pgbouncer image with the same settings through its variables. Either listens on 127.0.0.1 on a
free port.

How the RDS Proxy target-group settings map onto PgBouncer (`M` = the backend's max_connections):

| RDS Proxy                          | PgBouncer                                   | fidelity |
|------------------------------------|---------------------------------------------|----------|
| MaxConnectionsPercent (100)        | max_db_connections = default_pool_size = floor(pct × M / 100) | exact cap on the server connections PgBouncer holds; the database can hold more for a moment when a client is dropped mid-statement (its old backend finishes while PgBouncer opens a new one) |
| ConnectionBorrowTimeout (120 s)    | query_wait_timeout                          | close: a client waiting longer for a server connection gets an error ("query_wait_timeout") and is disconnected; RDS Proxy returns a timeout error |
| IdleClientTimeout (1800 s)         | client_idle_timeout                         | close: idle client connections are closed |
| MaxIdleConnectionsPercent (half of MaxConnectionsPercent: 50) | min_pool_size = floor(pct × M / 100 / U) (U: the number of application users; capped at the pool size) and server_idle_timeout (`server_idle_timeout_s`, default 60 s) | APPROXIMATE, see below |
| multiplexing                       | pool_mode = transaction                     | close: a server connection is lent per transaction; RDS Proxy also "pins" sessions that use session state, PgBouncer never pins (SET outside a transaction leaks between clients) |

MaxIdleConnectionsPercent approximation: RDS Proxy keeps at most pct × M / 100 *idle* server
connections and closes idle ones above that. PgBouncer has no cap on idle connections; instead it
closes a server connection idle for server_idle_timeout seconds as long as the pool stays at or above
min_pool_size. So after a burst the pool shrinks to min_pool_size within about server_idle_timeout
(RDS Proxy's own pace of closing excess idle connections is not documented; 60 s is an assumption), and
never below it. Unlike RDS Proxy, PgBouncer also *opens* connections to reach min_pool_size while a
client is connected to the pool, so at rest the backend sees min_pool_size idle connections from the proxy.
PgBouncer keeps one pool per user and min_pool_size applies to each, while RDS Proxy's idle allowance
is one for the whole target: so the allowance is shared out evenly over the application users. Were
each pool given all of it, two pools filling their minimum would hold every connection
max_db_connections allows, and the other applications' clients would wait for ever (PgBouncer does not
close one pool's idle connection to open another's, and min_pool_size keeps them from idling out).

Authentication: PostgreSQL authenticates with SCRAM-SHA-256 (initdb --auth-host=scram-sha-256) and
clients authenticate to PgBouncer with `auth_type = scram-sha-256`: no password crosses the socket.
`auth_file` (mode 0600, inside the private work directory, deleted with it) holds every application
user's SCRAM secret copied from the backend's pg_authid. With a secret PgBouncer checks a client's proof
with two HMACs, and logs in to the server with the client key that proof reveals (kept per user, so the
connections it opens on its own for min_pool_size log in too; the secrets must be identical to
pg_authid's, which copying them guarantees). With a plain-text password instead PgBouncer derives the
key anew for every client login: 4096 rounds of PBKDF2, about 5 ms of its single thread, and on two
CPUs a burst of cold starts (a hundred logins a second or more) then saturates PgBouncer, queries wait,
invocations time out, each timeout is one more cold start, and the run collapses. The plain-text form is
kept only for a backend whose pg_authid lambdaemu cannot read (an external server where its user is
not a superuser).

The admin console (database `pgbouncer`, user `lambdaemu_admin`, which exists only in PgBouncer) speaks
the simple query protocol only: `admin_connect()` returns a psycopg connection whose cursors send
queries client-side bound (`psycopg.ClientCursor`), which uses the simple protocol.

PgBouncer 1.18 (Debian 12) does not support protocol-level prepared statements in transaction mode:
psycopg handlers must connect with `prepare_threshold=None`.
"""

from __future__ import annotations

import math
import re
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import DatabaseStartError, UsageError
from .base import (ConnectionRow, Database, LogCounter, ProxyStats, ServerCounters, launch_until_ready,
                   random_password)
from .server import ADMIN_USER
CONSOLE_DB = "pgbouncer"
#: Client connections PgBouncer accepts (RDS Proxy has no documented small limit; the fd limit does).
MAX_CLIENT_CONN = 10_000
#: Assumed pace at which RDS Proxy closes idle server connections above MaxIdleConnectionsPercent.
DEFAULT_SERVER_IDLE_TIMEOUT_S = 60.0
# File descriptors PgBouncer needs beyond one per client and one per server connection (listen
# sockets, log, DNS, the console).
_FD_MARGIN = 64


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """RDS Proxy target-group settings, with RDS Proxy's defaults."""

    max_connections_percent: int = 100
    #: None means RDS Proxy's default: half of max_connections_percent (50 when that is 100).
    max_idle_connections_percent: int | None = None
    connection_borrow_timeout_s: float = 120.0
    idle_client_timeout_s: float = 1800.0
    #: Not an RDS setting: how long an idle server connection above min_pool_size lives (see module doc).
    server_idle_timeout_s: float = DEFAULT_SERVER_IDLE_TIMEOUT_S

    @property
    def idle_percent(self) -> int:
        """MaxIdleConnectionsPercent with RDS Proxy's default applied."""
        if self.max_idle_connections_percent is None:
            return self.max_connections_percent // 2
        return self.max_idle_connections_percent

    def validate(self) -> None:
        """Raise UsageError naming the first bad setting and the accepted range."""
        if not 1 <= self.max_connections_percent <= 100:
            raise UsageError(f"MaxConnectionsPercent (max_connections_percent) {self.max_connections_percent}: "
                             "expected a whole number from 1 to 100")
        if not 0 <= self.idle_percent <= self.max_connections_percent:
            raise UsageError(f"MaxIdleConnectionsPercent (max_idle_connections_percent) "
                             f"{self.idle_percent}: expected 0 to MaxConnectionsPercent "
                             f"({self.max_connections_percent}), as RDS Proxy requires")
        for name, rds, value in (("connection_borrow_timeout_s", "ConnectionBorrowTimeout", self.connection_borrow_timeout_s),
                                 ("idle_client_timeout_s", "IdleClientTimeout", self.idle_client_timeout_s),
                                 ("server_idle_timeout_s", "server_idle_timeout", self.server_idle_timeout_s)):
            if value < 0:
                raise UsageError(f"{rds} ({name}) {value:g}: expected seconds >= 0 (0 disables it)")


@dataclass(frozen=True)
class PgBouncerSettings:
    """The PgBouncer values derived from `ProxySettings` and the backend's max_connections."""

    max_db_connections: int
    default_pool_size: int
    min_pool_size: int
    server_idle_timeout: float
    query_wait_timeout: float
    client_idle_timeout: float
    max_client_conn: int
    pool_mode: str = "transaction"

    @classmethod
    def from_proxy(cls, proxy: ProxySettings, backend_max_connections: int, max_client_conn: int,
                   users: int = 1) -> "PgBouncerSettings":
        """Apply the mapping documented in the module docstring; `users` is the number of application
        users, over which the idle allowance is shared (PgBouncer keeps a pool per user)."""
        pool = max(1, math.floor(proxy.max_connections_percent * backend_max_connections / 100))
        idle = min(pool, math.floor(proxy.idle_percent * backend_max_connections / 100 / max(1, users)))
        return cls(max_db_connections=pool, default_pool_size=pool, min_pool_size=idle,
                   server_idle_timeout=proxy.server_idle_timeout_s,
                   query_wait_timeout=proxy.connection_borrow_timeout_s,
                   client_idle_timeout=proxy.idle_client_timeout_s, max_client_conn=max_client_conn)

    #: Where each PgBouncer value comes from, for describe().
    SOURCES = {
        "max_db_connections": "MaxConnectionsPercent",
        "default_pool_size": "MaxConnectionsPercent",
        "min_pool_size": "MaxIdleConnectionsPercent, shared over the application users (approximation)",
        "server_idle_timeout": "MaxIdleConnectionsPercent (approximation; assumed pace)",
        "query_wait_timeout": "ConnectionBorrowTimeout",
        "client_idle_timeout": "IdleClientTimeout",
        "max_client_conn": "(RDS Proxy: no fixed client limit)",
        "pool_mode": "multiplexing",
    }


class PgBouncer(Database):
    """PgBouncer in front of a PostgreSQL `Database`, configured from RDS Proxy settings, started by a
    launcher (`native`: Debian's pgbouncer; `docker`: the edoburu/pgbouncer image).

    Handler-facing facts (`url`, `handler_env()`, host/port/dbname, every application's account) point
    at PgBouncer, which knows each application's user and password; `max_connections` is the backend's.
    The sampler uses two connections: `backend.admin_connect()` for `connections()` and `counters()` (the
    server's view) and `admin_connect()` (the PgBouncer console) for `stats()` and `proxy_counters()`.
    The backend is started and stopped by the caller unless `owns_backend` is true.
    """

    engine = "postgres"
    kind = "pgbouncer"
    #: PgBouncer's log line for a client turned away at max_client_conn (log_pooler_errors, on by default).
    refusal_log = re.compile(rb"no more connections allowed")
    bind_error = re.compile(r"in use", re.I)

    def __init__(self, backend: Database, run_id: str, *, max_connections_percent: int = 100,
                 max_idle_connections_percent: int | None = None, connection_borrow_timeout_s: float = 120.0,
                 idle_client_timeout_s: float = 1800.0,
                 server_idle_timeout_s: float = DEFAULT_SERVER_IDLE_TIMEOUT_S,
                 owns_backend: bool = False, binary: Path | None = None, launcher: Any = None,
                 provider: str | None = None, max_client_conn: int = MAX_CLIENT_CONN) -> None:
        if backend.engine != "postgres":
            raise UsageError(f"--proxy pgbouncer: PgBouncer speaks PostgreSQL, not {backend.engine}; "
                             "use --engine postgres or drop --proxy")
        super().__init__(backend.applications)
        self.backend = backend
        self.run_id = run_id
        self.proxy = ProxySettings(max_connections_percent=max_connections_percent,
                                   max_idle_connections_percent=max_idle_connections_percent,
                                   connection_borrow_timeout_s=connection_borrow_timeout_s,
                                   idle_client_timeout_s=idle_client_timeout_s,
                                   server_idle_timeout_s=server_idle_timeout_s)
        self.proxy.validate()
        self.owns_backend = owns_backend
        self.max_client_conn = max_client_conn
        if launcher is None:
            from . import launcher_for

            # PgBouncer runs where its backend runs: in a container next to a container, else natively.
            launcher = launcher_for("docker" if (provider or backend.provider) == "docker" else "native",
                                    "pgbouncer", pgbouncer_binary=binary)
        self.launcher = launcher
        self.provider = backend.provider
        self.settings: PgBouncerSettings | None = None
        self.admin_password = ""
        self.secrets: dict[str, str] = {}
        self.nofile = 0
        self._refusals: LogCounter | None = None

    @property
    def workdir(self) -> Path | None:
        """The launcher's private work directory (configuration, auth file, log), when it has one."""
        return getattr(self.launcher, "workdir", None)

    @property
    def log_path(self) -> Path:
        """PgBouncer's log (it logs to stderr) in its work directory (native launcher)."""
        return self.launcher.log_path

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.owns_backend:
            self.backend.start()
        if not self.backend.max_connections:
            raise DatabaseStartError("PgBouncer needs a started backend (its max_connections is unknown); "
                                     "start the PostgreSQL provider first or pass owns_backend=True")
        self.accounts = dict(self.backend.accounts)
        self.dbname = self.backend.dbname
        self.max_connections = self.backend.max_connections
        pool = max(1, math.floor(self.proxy.max_connections_percent * self.max_connections / 100))
        self.nofile = _fd_limit_for(self.max_client_conn + pool + _FD_MARGIN)
        self.settings = PgBouncerSettings.from_proxy(
            self.proxy, self.max_connections,
            max_client_conn=max(1, min(self.max_client_conn, self.nofile - pool - _FD_MARGIN)),
            users=len(self.accounts))
        self.admin_password = random_password()
        self.secrets = self._scram_secrets()
        self.launcher.prepare(self)

        def launch(port: int) -> None:
            self.port = port
            self.launcher.launch(self, port)

        launch_until_ready(launch, self._check_apps, what="PgBouncer", retry_on=(_psycopg().OperationalError,),
                           kill=self.launcher.kill, exited=self.launcher.exited, tail=self.launcher.log_tail,
                           bind_error=self.bind_error, timeout_s=30,
                           hint="check the PgBouncer settings and that the PostgreSQL backend accepts the app users")
        self.version = self.launcher.pgbouncer_version()
        self.refusal_pattern = self.refusal_log
        self._started = True  # the log counter may be made from here on
        self.refusal_counter()

    def _scram_secrets(self) -> dict[str, str]:
        """Every application user's SCRAM secret as the backend stores it (pg_authid), or {} when the
        backend does not let lambdaemu read them (an external server: not a superuser)."""
        users = [account.user for account in self.accounts.values()]
        psycopg = _psycopg()
        try:
            with self.backend.admin_connect() as conn:
                rows = conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                                    (users,)).fetchall()
        except psycopg.Error:
            return {}
        secrets = {user: secret for user, secret in rows if secret and secret.startswith("SCRAM-SHA-256$")}
        return secrets if set(secrets) == set(users) else {}

    def auth_file_text(self) -> str:
        """PgBouncer's auth_file: every application's user and the console's admin (see the module
        docstring for which form and why)."""
        lines = [f'"{account.user}" "{self.secrets.get(account.user, account.password)}"'
                 for account in self.accounts.values()]
        lines.append(f'"{ADMIN_USER}" "{self.admin_password}"')
        return "\n".join(lines) + "\n"

    def pgbouncer_options(self) -> dict[str, Any]:
        """The [pgbouncer] settings lambdaemu gives every PgBouncer (native ini or image variables)."""
        s = self.settings
        assert s is not None
        return {
            "auth_type": "scram-sha-256",
            "admin_users": ADMIN_USER,
            "stats_users": ADMIN_USER,
            "pool_mode": s.pool_mode,
            "max_client_conn": s.max_client_conn,
            "default_pool_size": s.default_pool_size,
            "max_db_connections": s.max_db_connections,
            "min_pool_size": s.min_pool_size,
            "reserve_pool_size": 0,  # RDS Proxy has no reserve beyond MaxConnectionsPercent
            "server_idle_timeout": f"{s.server_idle_timeout:g}",
            "query_wait_timeout": f"{s.query_wait_timeout:g}",
            "client_idle_timeout": f"{s.client_idle_timeout:g}",
            # Drivers send these in the startup packet (JDBC extra_float_digits, libpq options);
            # PgBouncer would otherwise refuse the connection.
            "ignore_startup_parameters": "extra_float_digits,options",
            # One line per client connection at hundreds of connections per second says nothing the
            # console does not; errors sent to clients (query_wait_timeout, ...) are still logged.
            "log_connections": 0,
            "log_disconnections": 0,
        }

    def ini_text(self, *, listen_port: int, auth_file: Path, backend_host: str, backend_port: int) -> str:
        """pgbouncer.ini for a PgBouncer on 127.0.0.1:`listen_port` in front of the backend."""
        pgbouncer = {
            "listen_addr": "127.0.0.1",
            "listen_port": listen_port,
            "unix_socket_dir": "",  # TCP only: a socket file in /tmp would outlive a killed run
            "auth_file": auth_file,
            **self.pgbouncer_options(),
        }
        lines = ["[databases]",
                 f"{self.dbname} = host={backend_host} port={backend_port} dbname={self.backend.dbname}",
                 "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in pgbouncer.items()]
        return "\n".join(lines) + "\n"

    def _check_apps(self) -> None:
        # Ready means every application's account got a real answer from PostgreSQL through PgBouncer.
        for application in self.applications:
            with _psycopg().connect(self.url_for(application), connect_timeout=5, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")

    def _stop(self) -> None:
        # SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients, frozen ones included).
        self.launcher.stop()
        if self.owns_backend:
            self.backend.stop()

    # -- what handlers and the sampler use -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["proxy"] = {
            "kind": "pgbouncer",
            "version": self.version,
            "launcher": self.launcher.describe(),
            "rds_proxy": {**asdict(self.proxy), "max_idle_connections_percent": self.proxy.idle_percent},
            "settings": ({name: {"value": value, "from": PgBouncerSettings.SOURCES[name]}
                          for name, value in asdict(self.settings).items()} if self.settings else {}),
        }
        info["backend"] = self.backend.describe()
        info["version"] = self.backend.version
        if "launcher" in info["backend"]:  # how the database itself runs, as for a run without a proxy
            info["launcher"] = info["backend"]["launcher"]
        return info

    def admin_connect(self) -> Any:
        """A connection to the PgBouncer admin console (SHOW POOLS, SHOW CLIENTS, ...)."""
        psycopg = _psycopg()
        return psycopg.connect(host=self.host, port=self.port, user=ADMIN_USER, password=self.admin_password,
                               dbname=CONSOLE_DB, connect_timeout=5, autocommit=True, prepare_threshold=None,
                               cursor_factory=psycopg.ClientCursor)

    def connections(self, conn: Any) -> list[ConnectionRow]:
        """The backend's server-side connections; `conn` comes from `backend.admin_connect()`."""
        return self.backend.connections(conn)

    def counters(self, conn: Any) -> ServerCounters:
        """The backend's counters; `conn` comes from `backend.admin_connect()`."""
        return self.backend.counters(conn)

    def clear_sessions(self, timeout_s: float = 10.0) -> None:
        """Drop every client and server connection PgBouncer holds for the application database (console
        KILL, then RESUME so it takes clients again), then end what is left on the backend."""
        with self.admin_connect() as conn:
            conn.execute(f"KILL {self.dbname}")
            conn.execute(f"RESUME {self.dbname}")
        self.backend.clear_sessions(timeout_s)

    def proxy_counters(self) -> ServerCounters:
        """PgBouncer's own refusals (clients turned away at max_client_conn, counted from its log; None
        when the launcher cannot read it). PgBouncer has no counter of client logins."""
        counter = self.refusal_counter()
        return ServerCounters(sessions_opened=None, refused=counter.poll() if counter is not None else None)

    def stats(self, conn: Any | None = None) -> ProxyStats:
        """Client and server connections of the app database now, from the console (`conn` from
        `admin_connect()`; a short-lived one is opened when omitted)."""
        if conn is None:
            with self.admin_connect() as own:
                return self.stats(own)
        pools = [p for p in _show(conn, "SHOW POOLS") if p["database"] == self.dbname]
        clients = [c for c in _show(conn, "SHOW CLIENTS") if c["database"] == self.dbname]
        return ProxyStats(
            client_connections=sum(_sum_prefixed(p, "cl_") for p in pools),
            server_connections=sum(_sum_prefixed(p, "sv_") for p in pools),
            waiting_clients=sum(int(p.get("cl_waiting") or 0) for p in pools),
            max_wait_ms=max((int(p.get("maxwait") or 0) * 1000 + int(p.get("maxwait_us") or 0) / 1000 for p in pools),
                            default=0.0),
            client_ports=tuple(sorted(int(c["port"]) for c in clients if c.get("port") is not None)),
        )


def _show(conn: Any, command: str) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(command)
        names = [col.name for col in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def _sum_prefixed(pool: dict[str, Any], prefix: str) -> int:
    # Every cl_* / sv_* column is a count of connections in one state; versions add states
    # (cl_active_cancel_req, sv_being_canceled, ...), so sum whatever this version reports.
    return sum(int(value or 0) for key, value in pool.items() if key.startswith(prefix))


def _fd_limit_for(wanted: int) -> int:
    """The open-files limit PgBouncer can have: `wanted`, or the hard limit if that is lower."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _psycopg() -> Any:
    import psycopg

    return psycopg
