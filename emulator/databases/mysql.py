"""MySQL and MariaDB as an engine: settings and their accepted range, users, sampling queries and
counters. `MySQLServer` is a server started by a launcher (`native`, `docker`);
`external.ExternalMySQL` attaches to a server the user runs.

Accounts on a server lambdaemu starts:

- one user per application (handlers): privileges on database `app` only. Like an RDS application
  user it lacks SUPER / CONNECTION ADMIN, so once `max_connections` sessions are open it gets error 1040
  "Too many connections".
- `lambdaemu_admin` (the sampler): every privilege. It connects on a second, administrative port
  (MariaDB `extra_port`, MySQL `admin_port`) whose connections are counted apart from `max_connections`
  and from `Threads_connected`, so sampling never takes a slot from the applications. On the main port
  it can still use the one extra connection the server reserves for SUPER / CONNECTION ADMIN holders.

Measured on MariaDB 10.11 (tests/test_mysql_provider.py, tests/test_server_view.py): with
max_connections=10 the app user gets exactly 10 connections and then error 1040. A client that has
opened a TCP connection but not finished the handshake already holds one of the slots, and shows in the
processlist as user "unauthenticated user" with command "Connect"; so does an attempt about to be
refused (MariaDB lets max_connections + 1 clients in, for SUPER holders, and refuses the extra one after
the handshake). Those rows are state "connecting", apart from sessions. The refusal after the handshake
is counted in `Aborted_connects`, not in `Connection_errors_max_connections` (which counts clients
turned away before the handshake, when even the extra slot is taken), so `refused` is their sum;
`Aborted_connects` also counts failed logins and handshakes cut short, which lambdaemu's applications do
not cause. `Connections` counts every attempt, so sessions opened = Connections − refused.
MariaDB's accepted max_connections is 10 to 100000; it lowers the value when its open-files limit is too
small, which the native launcher checks before starting.

`wait_timeout` / `interactive_timeout` (from `idle_timeout_s`) is how the server closes the connections
of clients that vanished without closing them (Lambda environments reclaimed in `vanish` mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .base import (CONNECT_TIMEOUT_S, DEFAULT_APPLICATION, QUERY_TIMEOUT_S, Account, ConnectionRow,
                   ServerCounters)
from .server import ADMIN_USER, APP_DB, Engine, Launcher, Server

APP_USER = DEFAULT_APPLICATION
DEFAULT_MAX_CONNECTIONS = 151  # the engine's own default (MariaDB and MySQL)
#: Connections allowed on the administrative port: the sampler, plus room for a person or a test.
ADMIN_PORT_CONNECTIONS = 5

# A throwaway server for connection experiments: small memory, no durability, few open files (so a
# modest `ulimit -n` does not make the server lower max_connections). The first two also shape the
# data directory, so initialisation gets them too (a 96 MB redo log per run otherwise).
INIT_OPTIONS = ("--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M")
LEAN_OPTIONS = (
    *INIT_OPTIONS,
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    # io_uring/libaio contexts are a limited per-host resource; many servers per host do not need them.
    "--innodb-use-native-aio=0",
    "--performance-schema=OFF",
    "--table-open-cache=64",
    "--table-definition-cache=400",
)

_STATE_OF_COMMAND = {"Query": "active", "Execute": "active"}

# One row per client connection. System threads (InnoDB workers, the event scheduler, replication) have
# no "host:port", and neither do Unix-socket sessions, which handlers never use (they reach the server
# over TCP so that the client port can name the environment). A session is inside a transaction when
# InnoDB has a transaction for it: InnoDB starts one at the first access to an InnoDB table (or at START
# TRANSACTION WITH CONSISTENT SNAPSHOT), so a bare BEGIN with no statement yet still counts as idle.
CONNECTIONS_SQL = (
    "SELECT p.COMMAND, p.HOST, t.trx_mysql_thread_id IS NOT NULL, p.USER "
    "FROM information_schema.PROCESSLIST p "
    "LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID "
    "WHERE p.ID <> CONNECTION_ID() AND p.HOST LIKE '%:%'"
)
COUNTERS_SQL = ("SHOW GLOBAL STATUS WHERE Variable_name IN "
                "('Connections', 'Aborted_connects', 'Connection_errors_max_connections')")
#: The user name the processlist shows before a client has authenticated.
UNAUTHENTICATED = "unauthenticated user"


def mysql_connections(conn: Any) -> list[ConnectionRow]:
    """Client connections of a MySQL/MariaDB server as `ConnectionRow`s (every MySQL provider's view).

    Needs the PROCESS privilege to see other users' sessions."""
    with conn.cursor() as cur:
        cur.execute(CONNECTIONS_SQL)
        rows = cur.fetchall()
    result = []
    for command, host, in_trx, user in rows:
        if command == "Connect" or user == UNAUTHENTICATED:
            state, user = "connecting", ""
        elif command in _STATE_OF_COMMAND:
            state = _STATE_OF_COMMAND[command]
        elif command == "Sleep":
            state = "idle_in_transaction" if in_trx else "idle"
        else:
            state = "other"
        result.append(ConnectionRow(state, _client_port(host), "", user or ""))
    return result


def mysql_counters(conn: Any) -> ServerCounters:
    """Sessions opened and refusals from the server's status counters (see the module docstring)."""
    with conn.cursor() as cur:
        cur.execute(COUNTERS_SQL)
        status = {name: int(value) for name, value in cur.fetchall()}
    refused = status.get("Aborted_connects", 0) + status.get("Connection_errors_max_connections", 0)
    return ServerCounters(sessions_opened=status.get("Connections", 0) - status.get("Aborted_connects", 0),
                          refused=refused)


def mysql_threads_connected(conn: Any) -> int:
    """The server's own count of open client connections (`Threads_connected`). On MariaDB, sessions on
    the extra (administrative) port are not included."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        row = cur.fetchone()
    return int(row[1]) if row else 0


def mysql_connect(*, host: str, port: int, user: str, password: str, dbname: str | None = None,
                  **kwargs: Any) -> Any:
    """A PyMySQL connection with a deadline on every wait: connect_timeout covers only the TCP connect,
    so the handshake (the server's greeting, the authentication reply) and queries get read and write
    timeouts too."""
    import pymysql

    kwargs.pop("application_name", None)  # a PostgreSQL notion
    kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("read_timeout", QUERY_TIMEOUT_S)
    kwargs.setdefault("write_timeout", QUERY_TIMEOUT_S)
    kwargs.setdefault("autocommit", True)
    return pymysql.connect(host=host, port=port, user=user, password=password, database=dbname or None, **kwargs)


def _client_port(host: str | None) -> int | None:
    # PROCESSLIST.HOST is "127.0.0.1:54321" ("::1:54321" for IPv6): the port follows the last colon.
    _, sep, port = (host or "").rpartition(":")
    return int(port) if sep and port.isdigit() else None


def flavour_of(version: str) -> str:
    """"MariaDB" or "MySQL" from a version string or an image name."""
    return "MariaDB" if "mariadb" in version.lower() else "MySQL"


class MySQLEngine(Engine):
    """MySQL or MariaDB (`flavour`): what lambdaemu sets, creates and reads on a server it starts."""

    name = "mysql"
    default_max_connections = DEFAULT_MAX_CONNECTIONS
    reserved_users = (ADMIN_USER, "root", "mysql", "mariadb")

    def __init__(self, *, flavour: str = "MariaDB", max_connections: int | None = None,
                 idle_timeout_s: float | None = None) -> None:
        self.flavour = self.label = flavour
        # User names: MySQL 5.7 and later take 32 characters. MariaDB documents 80 (older versions);
        # 10.11 takes 128 (measured: 129 is refused with error 1470). 80 holds on every MariaDB, and
        # Lambda function names have at most 64 characters, so only MySQL's limit ever bites there.
        self.user_name_limit = 80 if flavour == "MariaDB" else 32
        self.user_name_limit_source = ("the limit every MariaDB version accepts" if flavour == "MariaDB"
                                       else "MySQL's user name length")
        super().__init__(max_connections=max_connections, idle_timeout_s=idle_timeout_s)

    def accepted_max_connections(self) -> tuple[int, int]:
        return (10 if self.flavour == "MariaDB" else 1), 100_000

    def max_connections_reason(self) -> str:
        return "the server would silently use the nearest of those instead"

    def server_options(self, *, listen: str, port: int, admin_port: int) -> list[str]:
        """Options of mariadbd/mysqld (the same for a native server and the mariadb/mysql images)."""
        argv = [
            f"--bind-address={listen}", f"--port={port}",
            f"--max-connections={self.max_connections}",
            # Accounts are matched by address; a reverse DNS lookup per connection would only add latency.
            "--skip-name-resolve",
            *LEAN_OPTIONS,
        ]
        if self.flavour == "MariaDB":
            argv += [f"--extra-port={admin_port}", f"--extra-max-connections={ADMIN_PORT_CONNECTIONS}"]
        else:
            # MySQL 8: the administrative interface; the X protocol plugin would bind 33060 for every run.
            argv += [f"--admin-address={listen}", f"--admin-port={admin_port}", "--mysqlx=OFF", "--skip-log-bin"]
        if self.idle_timeout_s:
            seconds = max(1, round(self.idle_timeout_s))
            argv += [f"--wait-timeout={seconds}", f"--interactive-timeout={seconds}"]
        return argv

    def connect(self, **kwargs: Any) -> Any:
        return mysql_connect(**kwargs)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import pymysql

        return (pymysql.err.OperationalError, pymysql.err.InternalError)

    def bootstrap(self, conn: Any, accounts: Iterable[Account], *, admin_password: str,
                  client_hosts: tuple[str, ...]) -> None:
        # `conn` is root's: over the socket with no password (native), or with the root password the
        # image was given (docker).
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {APP_DB}")
            for host in client_hosts:
                for account in accounts:
                    cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (account.user, host, account.password))
                    # Privileges on its own database only: no SUPER / CONNECTION ADMIN, as for an RDS app user.
                    cur.execute(f"GRANT ALL PRIVILEGES ON {APP_DB}.* TO %s@%s", (account.user, host))
                cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (ADMIN_USER, host, admin_password))
                cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", (ADMIN_USER, host))
            # Initialisation may leave password-less root accounts (127.0.0.1, ::1, the host name): drop
            # them, and give root@localhost the admin password.
            cur.execute("SELECT User, Host FROM mysql.user WHERE User = 'root' AND Host NOT IN ('localhost', '%')")
            for user, host in cur.fetchall():
                cur.execute("DROP USER %s@%s", (user, host))
            cur.execute("ALTER USER 'root'@'localhost' IDENTIFIED BY %s", (admin_password,))

    def facts(self, conn: Any) -> tuple[int, str]:
        with conn.cursor() as cur:
            cur.execute("SELECT @@max_connections, VERSION()")
            max_connections, version = cur.fetchone()
        return int(max_connections), version

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return mysql_connections(conn)

    def counters(self, conn: Any, refused_in_log: int | None) -> ServerCounters:
        return mysql_counters(conn)

    def terminate_sessions(self, conn: Any, users: Iterable[str]) -> None:
        import pymysql

        users = list(users)
        with conn.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN ("
                        + ", ".join(["%s"] * len(users)) + ") AND ID <> CONNECTION_ID()", users)
            for (session,) in cur.fetchall():
                try:
                    cur.execute(f"KILL CONNECTION {int(session)}")
                except pymysql.err.OperationalError:  # ended on its own meanwhile (1094: unknown thread id)
                    pass

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "flavour": self.flavour}


class MySQLServer(Server):
    """A MariaDB or MySQL server lambdaemu starts and stops (`native` or `docker` launcher)."""

    def __init__(self, *, run_id: str, max_connections: int | None = None, idle_timeout_s: float | None = None,
                 server_binary: Path | None = None, provider: str = "native",
                 applications: Iterable[str] = (DEFAULT_APPLICATION,), launcher: Launcher | None = None) -> None:
        from . import launcher_for

        launcher = launcher or launcher_for(provider, "mysql", server_binary=server_binary)
        engine = MySQLEngine(flavour=launcher.mysql_flavour(),  # type: ignore[attr-defined]
                             max_connections=max_connections, idle_timeout_s=idle_timeout_s)
        super().__init__(engine, launcher, run_id=run_id, applications=applications)

    @property
    def flavour(self) -> str:
        """"MariaDB" or "MySQL"."""
        return self.engine_impl.flavour  # type: ignore[attr-defined]

    def threads_connected(self, conn: Any) -> int:
        """`Threads_connected` as the server reports it (main-port sessions only on MariaDB)."""
        return mysql_threads_connected(conn)
