"""The `native` launcher: server binaries installed on this machine, run as local processes.

Each server gets a private work directory labelled with the run id (data, configuration, socket, log,
and a `tmp/` that is its TMPDIR), owned by the server user (the unprivileged `lambdaemu` user when
lambdaemu runs as root). Servers listen on 127.0.0.1 only. The log is a file the launcher tails to count
refusals.
"""

from __future__ import annotations

import glob
import os
import pwd
import resource
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from .base import (check_workdir_root, chown_tree, file_reader, log_tail, make_workdir, process_exited,
                   remove_workdir, run_as_server_user, server_user, spawn_server, stop_process)
from .server import ADMIN_USER, Launcher


def native_bindir() -> Path | None:
    """bin/ of a PostgreSQL server installed on the machine: PATH first, then Debian's layout, newest."""
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def find_mysql_binary() -> Path:
    """`mariadbd` or `mysqld` from PATH or /usr/sbin, or a UsageError saying how to get one."""
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        if found:
            return Path(found)
    raise UsageError("--engine mysql --provider native: no mariadbd or mysqld found (looked in PATH and "
                     "/usr/sbin); run scripts/install-system-deps or apt-get install mariadb-server")


def find_pgbouncer() -> Path:
    """The pgbouncer binary (PATH, then /usr/sbin), or a UsageError saying how to get it."""
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if found is None:
        raise UsageError("--proxy pgbouncer: no pgbouncer binary found (looked in PATH and /usr/sbin); "
                         "run scripts/install-system-deps or apt-get install pgbouncer")
    return Path(found)


#: Files MariaDB opens besides one per connection (measured: with an open-files limit of 20000 it runs
#: with at most 18946 connections; with 2000, 1842), so a limit below max_connections + this lowers it.
MARIADB_FILES_BESIDES_CONNECTIONS = 1100


class NativeLauncher(Launcher):
    """Servers from binaries on this machine: PostgreSQL (`bindir`), MariaDB/MySQL, PgBouncer."""

    name = "native"

    def __init__(self, engine: str, *, bindir: Path | None = None, server_binary: Path | None = None,
                 pgbouncer_binary: Path | None = None) -> None:
        check_workdir_root()
        self.engine = engine
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._stop_signal = signal.SIGTERM
        self._grace_s = 10.0
        self.log_name = ""
        if engine == "postgres":
            self.bindir = bindir or self.find_bindir()
        elif engine == "mysql":
            self.server_binary = server_binary or find_mysql_binary()
        elif engine == "pgbouncer":
            self.binary = pgbouncer_binary or find_pgbouncer()

    @staticmethod
    def find_bindir() -> Path:
        """The machine's PostgreSQL server binaries, or a UsageError saying how to get them."""
        found = native_bindir()
        if found is None:
            raise UsageError("--provider native: no PostgreSQL server binaries found (looked in PATH and "
                             "/usr/lib/postgresql/*/bin); install postgresql or use --provider embedded")
        return found

    def usable_bindir(self) -> Path:
        """The PostgreSQL bindir the server user can run (the embedded launcher may need a copy)."""
        return self.bindir

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr) in its work directory."""
        assert self.workdir is not None
        return self.workdir / self.log_name

    # -- Launcher --------------------------------------------------------------------------------------
    def prepare(self, target: Any) -> None:
        kind = target.kind
        self.workdir = make_workdir(target.run_id, kind)
        self.log_name = {"postgres": "postgres.log", "mysql": "mysqld.log", "pgbouncer": "pgbouncer.log"}[kind]
        getattr(self, f"_prepare_{kind}")(target)

    def bootstrap_connect(self, target: Any) -> Any:
        if target.kind == "mysql":
            # Right after initialisation root@localhost has no password and is reachable only through the
            # socket in the private work directory.
            import pymysql

            return pymysql.connect(unix_socket=str(self.workdir / "mysqld.sock"), user="root", password="",
                                   connect_timeout=5, read_timeout=15, write_timeout=15, autocommit=True)
        return target.engine_impl.connect(host=target.host, port=target.port, user=ADMIN_USER,
                                          password=target.admin_password)

    def exited(self) -> str | None:
        return process_exited(self.proc)

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.log_path, lines) if self.workdir else "(no log)"

    def log_reader(self) -> Callable[[], bytes] | None:
        return file_reader(self.log_path) if self.workdir else None

    def kill(self) -> None:
        stop_process(self.proc, self._stop_signal, self._grace_s)

    def stop(self) -> None:
        self.kill()
        remove_workdir(self.workdir)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name}

    # -- PostgreSQL --------------------------------------------------------------------------------------
    def _prepare_postgres(self, server: Any) -> None:
        assert self.workdir is not None
        # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients (including frozen environments'
        # connections) instead of waiting for them.
        self._stop_signal = signal.SIGINT
        bindir = self.usable_bindir()
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(server.admin_password + "\n")
        pwfile.chmod(0o600)
        chown_tree(self.workdir)
        run_as_server_user(
            [str(bindir / "initdb"), "-D", str(self.workdir / "data"), "-U", ADMIN_USER, "--pwfile", str(pwfile),
             "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync",
             "--no-instructions"],
            log_path=self.log_path, timeout=120,
        )
        pwfile.unlink()
        self._postgres = bindir / "postgres"

    def _launch_postgres(self, server: Any, port: int) -> None:
        assert self.workdir is not None
        argv = [str(self._postgres), "-D", str(self.workdir / "data"),
                *server.engine_impl.server_options(listen="127.0.0.1", port=port),
                "-c", f"unix_socket_directories={self.workdir}"]
        self.proc = spawn_server(argv, self.log_path)

    # -- MariaDB / MySQL ---------------------------------------------------------------------------------
    def mysql_flavour(self) -> str:
        """"MariaDB" or "MySQL", from the binary's --version (nothing is started)."""
        from .mysql import flavour_of

        version = subprocess.run([str(self.server_binary), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        return flavour_of(version)

    def _prepare_mysql(self, server: Any) -> None:
        from .mysql import INIT_OPTIONS

        assert self.workdir is not None
        self._grace_s = 20.0  # SIGTERM is a normal shutdown: the server closes every client connection
        self._check_open_files(server.engine_impl.max_connections)
        datadir = self.workdir / "data"
        user = server_user()
        user_name = user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name
        if server.flavour == "MariaDB":
            install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
            if install_db is None:
                raise UsageError("--engine mysql: mariadb-install-db not found next to mariadbd; "
                                 "run scripts/install-system-deps or apt-get install mariadb-server")
            # normal authentication: root@localhost gets an empty password, replaced in bootstrap.
            argv = [install_db, "--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db",
                    f"--datadir={datadir}", f"--user={user_name}", *INIT_OPTIONS]
        else:
            argv = [str(self.server_binary), "--no-defaults", "--initialize-insecure", f"--datadir={datadir}",
                    f"--user={user_name}", *INIT_OPTIONS]
        run_as_server_user(argv, log_path=self.log_path, timeout=120)

    @staticmethod
    def _check_open_files(max_connections: int) -> None:
        # MariaDB lowers max_connections to fit its open-files limit; refuse before starting instead.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and max_connections + MARIADB_FILES_BESIDES_CONNECTIONS > hard:
            raise UsageError(f"--max-connections {max_connections}: this machine's open-files limit ({hard}) "
                             f"lets MariaDB keep at most about {hard - MARIADB_FILES_BESIDES_CONNECTIONS} connections; "
                             "raise the limit (ulimit -Hn) or choose a smaller value")

    def _launch_mysql(self, server: Any, port: int) -> None:
        from .base import free_port

        assert self.workdir is not None
        server.admin_port = free_port()
        argv = [
            str(self.server_binary), "--no-defaults",  # must come first
            f"--datadir={self.workdir / 'data'}", f"--tmpdir={self.workdir / 'tmp'}",
            f"--socket={self.workdir / 'mysqld.sock'}", f"--pid-file={self.workdir / 'mysqld.pid'}",
            *server.engine_impl.server_options(listen="127.0.0.1", port=port, admin_port=server.admin_port),
        ]
        with raised_nofile():  # MariaDB raises its own soft limit only up to what it inherits as hard
            self.proc = spawn_server(argv, self.log_path)

    # -- PgBouncer ---------------------------------------------------------------------------------------
    def _prepare_pgbouncer(self, bouncer: Any) -> None:
        assert self.workdir is not None
        auth_file = self.workdir / "userlist.txt"
        auth_file.write_text(bouncer.auth_file_text())
        auth_file.chmod(0o600)
        chown_tree(self.workdir)

    def pgbouncer_version(self) -> str:
        """`pgbouncer --version`'s first line."""
        return subprocess.run([str(self.binary), "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0].strip()

    def _launch_pgbouncer(self, bouncer: Any, port: int) -> None:
        assert self.workdir is not None
        ini = self.workdir / "pgbouncer.ini"
        ini.write_text(bouncer.ini_text(listen_port=port, auth_file=self.workdir / "userlist.txt",
                                        backend_host=bouncer.backend.host, backend_port=bouncer.backend.port))
        chown_tree(self.workdir)
        with raised_nofile(bouncer.nofile):  # the child inherits the limit at fork
            self.proc = spawn_server([str(self.binary), str(ini)], self.log_path, cwd=self.workdir)


class raised_nofile:
    """Raise the soft open-files limit (to `limit`, or to the hard limit) while a child is forked, then
    restore ours."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.saved: tuple[int, int] | None = None

    def __enter__(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if self.limit is None else self.limit
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        self.saved = (soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)
