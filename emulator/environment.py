"""The worker side: the zygote that forks execution environments, and the environment's own life
(init phase, then one invocation at a time).

The zygote is a fresh interpreter started once per run, before the supervisor starts any thread. It
imports the heavy libraries (drivers, SQLAlchemy, pools) and freezes its heap with `gc.freeze()`, so a
forked environment shares those pages copy-on-write and starts in a couple of milliseconds. It never
imports the handler: importing the handler module is the environment's init phase, and it must run in
each environment, as it does in Lambda.

Messages are tuples over SOCK_SEQPACKET sockets (one message per datagram, no framing), pickled on the
zygote's control socket (specs are objects) and marshalled between the supervisor and an environment
(plain values, and marshal costs half as much on the path every invocation takes):

supervisor → zygote   ("spawn", env_id, spec)        zygote → supervisor  ("spawned", env_id, pid) + fd
                                                                          ("spawn_failed", env_id, message)
                      ("warm", env_vars)                                  ("warmed", error or "")
                                                                          ("exited", pid, wait_status)
zygote → parked env   ("spawn", env_id, spec)
supervisor → env      ("invoke", request_id, event, remaining_ms)
env → supervisor      ("ready", init_ms)
                      ("init_error", fatal, error_kind, error_type, message)
                      ("result", request_id, status, error_kind, error_type, message, duration_ms)
                      ("oom", rss_mb)
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import marshal
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import classify, exception_type_names
from .processes import set_parent_death_signal

MAX_MESSAGE = 1 << 16
MESSAGE_LIMIT = 2000  # characters of an error message sent back (full traceback is in the env's log)

#: Libraries imported into the zygote so environments inherit them instead of importing them cold.
PRELOAD = (
    "psycopg",
    "psycopg_pool",
    "pymysql",
    "sqlalchemy",
    "sqlalchemy.pool",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.mysql.pymysql",
)


@dataclass(frozen=True)
class EnvSpec:
    """What an environment needs to start: its handler, its function configuration and where to log."""

    handler: str
    env_vars: dict[str, str]
    log_path: str
    function_name: str = "lambdaemu-function"
    memory_mb: int | None = None
    init_delay_s: float = 0.0
    cwd: str = field(default_factory=os.getcwd)


class LambdaContext:
    """The `context` argument handlers receive, with the attributes Lambda's Python runtime provides."""

    def __init__(self, request_id: str, function_name: str, memory_mb: int | None, remaining_ms: float):
        self.aws_request_id = request_id
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{function_name}"
        self.memory_limit_in_mb = str(memory_mb or 128)
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = f"lambdaemu/{os.getpid()}"
        self._deadline = time.monotonic() + remaining_ms / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the function timeout."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# --- handler loading --------------------------------------------------------------------------------


def split_handler(spec: str) -> tuple[str, str]:
    """`module:function` or `path/to/file.py:function` → (module or path, function)."""
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(spec)
    return target, func


def load_handler(spec: str) -> Callable[[Any, Any], Any]:
    """Import the handler module (running its module-level code: the init phase) and return the function."""
    target, func = split_handler(spec)
    if target.endswith(".py"):
        path = Path(target).resolve()
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        # Let a handler file import its siblings, as Lambda's task root allows.
        sys.path.insert(0, str(path.parent))
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, func)
    except AttributeError:
        raise _MissingFunction(f"module {target!r} has no function {func!r}") from None


class _MissingFunction(ImportError):
    pass


# --- the environment --------------------------------------------------------------------------------


def _send(sock: socket.socket, message: tuple) -> None:
    sock.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _reply(sock: socket.socket, message: tuple) -> None:
    sock.send(marshal.dumps(message))


def _describe(exc: BaseException) -> tuple[str, str, str]:
    names = exception_type_names(exc)
    message = f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]
    return classify(names, str(exc)), type(exc).__name__, message


def _memory_watchdog(sock: socket.socket, limit_mb: int) -> None:
    # Runs only while the environment is thawed, which is when it can allocate. Lambda ends an
    # environment that exceeds its memory size; so does this, after telling the supervisor why.
    page = os.sysconf("SC_PAGE_SIZE")
    limit = limit_mb * 1024 * 1024
    while True:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * page
        if rss > limit:
            try:
                _reply(sock, ("oom", rss / 1024 / 1024))
            finally:
                os._exit(137)
        time.sleep(0.01)


def environment_main(sock: socket.socket, spec: EnvSpec) -> None:
    """Run one execution environment: init (import the handler), then invocations until EOF."""
    os.environ.update(spec.env_vars)
    os.environ["AWS_LAMBDA_FUNCTION_NAME"] = spec.function_name
    if spec.memory_mb:
        os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(spec.memory_mb)
        threading.Thread(target=_memory_watchdog, args=(sock, spec.memory_mb), daemon=True,
                         name="lambdaemu-memory").start()
    started = time.perf_counter()
    try:
        if spec.init_delay_s:
            time.sleep(spec.init_delay_s)  # the runtime's own start-up, before any user code
        handler = load_handler(spec.handler)
    except BaseException as exc:  # noqa: BLE001 - everything init raises is reported, as Lambda does
        traceback.print_exc()
        kind, type_name, message = _describe(exc)
        fatal = isinstance(exc, (ImportError, SyntaxError)) and _is_handler_import_error(exc, spec.handler)
        _reply(sock, ("init_error", fatal, "init_error", type_name, message))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    _reply(sock, ("ready", (time.perf_counter() - started) * 1000))

    while True:
        data = sock.recv(MAX_MESSAGE)
        if not data:
            break  # the supervisor closed our socket: we were reclaimed
        _, request_id, event, remaining_ms = marshal.loads(data)
        context = LambdaContext(request_id, spec.function_name, spec.memory_mb, remaining_ms)
        t0 = time.perf_counter()
        try:
            handler(event, context)
            status, kind, type_name, message = "ok", "", "", ""
        except Exception as exc:  # noqa: BLE001 - the invocation fails, the environment stays warm
            traceback.print_exc()
            status = "handler_error"
            kind, type_name, message = _describe(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        _reply(sock, ("result", request_id, status, kind, type_name, message, (time.perf_counter() - t0) * 1000))
    os._exit(0)


def _is_handler_import_error(exc: BaseException, handler: str) -> bool:
    # The handler itself cannot be loaded (missing module, syntax error, missing function, a missing
    # dependency) as opposed to init code failing at run time (e.g. a refused database connection).
    if isinstance(exc, (_MissingFunction, SyntaxError, ModuleNotFoundError)):
        return True
    return isinstance(exc, ImportError)


# --- the zygote ---------------------------------------------------------------------------------------

def warm_drivers(env_vars: dict[str, str]) -> None:
    """Run the database drivers' connect paths once (then close everything), so the code and caches
    they touch on first use are already in the zygote's frozen heap: environments then share those
    pages instead of copying them on their first connection. No handler code runs here."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = make_url(env_vars["DATABASE_URL"])
    mysql = env_vars.get("DB_ENGINE") == "mysql"
    connect_args: dict[str, Any] = {}
    if mysql:
        import pymysql

        pymysql.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                        database=url.database, connect_timeout=5).close()
        url = url.set(drivername="mysql+pymysql")
    else:
        import psycopg

        connect_args = {"prepare_threshold": None}  # PgBouncer in transaction mode cannot route them
        psycopg.connect(url.render_as_string(hide_password=False), connect_timeout=5, **connect_args).close()
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


class _Zygote:
    """Forks environments on request. One child is always forked ahead and parked, so a spawn request
    is answered at once and the next fork happens off the request's critical path (Android's zygote
    keeps such unspecialised children too). A parked child has not seen any handler: it learns its spec
    when it is handed out, and only then runs the init phase."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.parked: tuple[int, socket.socket] | None = None
        self.pid = os.getpid()

    def serve(self) -> None:
        self._prefork_quietly()
        _send(self.control, ("zygote_ready", self.pid))
        while True:
            for key, _ in self.selector.select():
                if key.data == "wake":
                    try:
                        self.wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    data = self.control.recv(MAX_MESSAGE)
                    if not data:
                        os._exit(0)  # the supervisor is gone; environments die with us
                    self._handle(data)
            self._reap()

    def _handle(self, data: bytes) -> None:
        message = pickle.loads(data)
        if message[0] == "warm":
            try:
                warm_drivers(message[1])
                result = ("warmed", "")
            except Exception as exc:  # noqa: BLE001 - warming is an optimisation; say why it failed
                result = ("warmed", f"{type(exc).__name__}: {exc}")
            gc.collect()
            gc.freeze()
            self._discard_parked()  # forked before warming: replace it with a warm one
            self._prefork_quietly()
            _send(self.control, result)
            return
        env_id = message[1]
        try:
            if self.parked is None:
                self._prefork()
        except OSError as exc:
            _send(self.control, ("spawn_failed", env_id, str(exc)))
            return
        assert self.parked is not None
        pid, sock = self.parked
        self.parked = None
        try:
            sock.send(data)  # the spawn request itself carries the spec
        except OSError:
            pass  # it died while parked: the supervisor will see EOF and an exit report
        socket.send_fds(self.control, [pickle.dumps(("spawned", env_id, pid))], [sock.fileno()])
        sock.close()
        self._prefork_quietly()

    def _prefork(self) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            parent_sock.close()
            child_sock.close()
            raise
        if pid == 0:
            parent_sock.close()
            self._park(child_sock)
        child_sock.close()
        self.parked = (pid, parent_sock)

    def _prefork_quietly(self) -> None:
        try:
            self._prefork()
        except OSError:
            pass  # out of processes for now: the next request forks on demand, or reports the failure

    def _discard_parked(self) -> None:
        if self.parked is not None:
            pid, sock = self.parked
            self.parked = None
            sock.close()  # it sees EOF and exits; its exit is reaped and reported for an unknown pid

    def _park(self, sock: socket.socket) -> None:
        # In the forked child: drop everything that belongs to the zygote, take our own process group
        # (so the supervisor can freeze and kill whatever the handler spawns) and die with the zygote.
        try:
            self.selector.close()
            self.control.close()
            self.wake_r.close()
            self.wake_w.close()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.setpgid(0, 0)
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self.pid:
                os._exit(1)  # the zygote died before the death signal was armed
            data = sock.recv(MAX_MESSAGE)
            if not data:
                os._exit(0)
            _, _, spec = pickle.loads(data)
            fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            if spec.cwd and os.getcwd() != spec.cwd:
                os.chdir(spec.cwd)
            environment_main(sock, spec)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(1)

    def _reap(self) -> None:
        # The zygote's only children are environments, so waitpid(-1) steals nobody's status.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.parked is not None and self.parked[0] == pid:
                self.parked[1].close()
                self.parked = None
            _send(self.control, ("exited", pid, status))


def zygote_main(control_fd: int) -> None:
    """Preload libraries, then fork an environment for every spawn request until the supervisor leaves."""
    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()  # keep the preloaded heap out of the collector so forks share its pages
    _Zygote(socket.socket(fileno=control_fd)).serve()


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]))
