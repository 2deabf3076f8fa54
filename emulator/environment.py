"""The worker side: an execution environment's own life (init phase, then one invocation at a time).

An environment is forked from the zygote (`zygote.py`) and learns which function it serves only when it
is handed out: then it sets up its process (log file, environment variables), runs the init phase
(the runtime's own start-up delay, then importing the handler module: module-level code such as pool
creation runs here, once per environment, as in Lambda) and serves invocations from its channel to the
supervisor until the channel closes. What it says back follows `protocol.py`.

An environment whose function names an executable runtime (`EnvSpec.exec_argv`, e.g. Node.js through
the Runtime API) replaces itself with that program after the process set-up instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import classify, exception_type_names
from .protocol import TEXT_LIMIT, clip, receive_invoke, send_report

#: Environment variable that ties every process of an environment (and whatever it starts) to it.
ENV_ID_VARIABLE = "LAMBDAEMU_ENV_ID"
#: Application name prefix every environment's PostgreSQL connections carry (PGAPPNAME).
APPNAME_PREFIX = "lambdaemu-env-"


@dataclass(frozen=True)
class EnvSpec:
    """What every environment of one function needs: its handler, its configuration (environment
    variables, as Lambda passes it), its limits and where its logs go. Per-environment details (the id,
    extra variables such as a Runtime API address) travel with each spawn request."""

    handler: str
    env_vars: dict[str, str]
    log_dir: str
    function_name: str = "app"
    memory_mb: int | None = None
    init_delay_s: float = 0.0
    cwd: str = field(default_factory=os.getcwd)
    #: A program to exec instead of the Python init phase (a Runtime API client), or None.
    exec_argv: tuple[str, ...] | None = None
    #: 0: a Lambda environment (one invocation at a time). N > 0: a service instance (an application
    #: server on EC2) serving up to N requests at once from as many threads, never frozen.
    concurrency: int = 0

    def log_path(self, env_id: int) -> str:
        """The environment's log file (its stdout and stderr, like a CloudWatch log stream). The baseline
        environment measured before the load (a negative id) logs to baseline-<function>.log."""
        if env_id < 0:
            return os.path.join(self.log_dir, f"baseline-{self.function_name}.log")
        return os.path.join(self.log_dir, f"env-{env_id:05d}.log")


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


def _describe(exc: BaseException) -> tuple[str, str, str]:
    names = exception_type_names(exc)
    type_name = clip(type(exc).__name__, 200)
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a user exception whose __str__ fails still gets reported
        text = "<unprintable exception>"
    return classify(names, text[: TEXT_LIMIT * 4]), type_name, clip(f"{type_name}: {text}")


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
                send_report(sock, ("oom", rss / 1024 / 1024))
            finally:
                os._exit(137)
        time.sleep(0.01)


class _AbsorbedErrors(logging.Handler):
    """Reports database errors that libraries log and handle themselves (psycopg_pool's background
    connection attempts refused by a full server, retried until the invocation times out), so the
    supervisor can say why such an invocation failed. At most `LIMIT` reports per second."""

    LIMIT = 20

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(logging.WARNING)
        self.sock = sock
        self._second = 0
        self._sent = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f" {record.exc_info[1]}"
            kind = classify([], text[: TEXT_LIMIT * 4])
            if kind in ("handler_error", "database_error"):
                return
            now = int(time.monotonic())
            if now != self._second:
                self._second, self._sent = now, 0
            if self._sent < self.LIMIT:
                self._sent += 1
                send_report(self.sock, ("absorbed", kind))
        except Exception:  # noqa: BLE001 - reporting must never break the handler's own logging
            pass


def setup_process(spec: EnvSpec, env_id: int, extra_env: dict[str, str]) -> None:
    """Give this (just forked) process its environment's identity: log file on stdout/stderr, working
    directory and environment variables."""
    fd = os.open(spec.log_path(env_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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
    os.environ.update(spec.env_vars)
    # A second tie between a server-side connection and this environment, needing no handler code.
    os.environ.setdefault("PGAPPNAME", f"{APPNAME_PREFIX}{env_id}")
    os.environ[ENV_ID_VARIABLE] = str(env_id)
    os.environ["AWS_LAMBDA_FUNCTION_NAME"] = spec.function_name
    os.environ.update(extra_env)
    if spec.memory_mb:
        os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(spec.memory_mb)


def environment_main(sock: socket.socket, spec: EnvSpec, handed_at: float) -> None:
    """Run one execution environment: init (import the handler), then invocations until EOF. The init
    phase is timed from `handed_at` (time.monotonic() when this process was told what it is), so time spent
    waiting for a CPU before running counts as init, as on Lambda everything before ready does."""
    if spec.memory_mb:
        threading.Thread(target=_memory_watchdog, args=(sock, spec.memory_mb), daemon=True,
                         name="lambdaemu-memory").start()
    root = logging.getLogger()
    if not root.handlers:
        # What Python would print through its last-resort handler once ours is installed, as Lambda's
        # runtime writes log records to the log stream.
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        root.addHandler(console)
    root.addHandler(_AbsorbedErrors(sock))
    try:
        if spec.init_delay_s:
            time.sleep(spec.init_delay_s)  # the runtime's own start-up, before any user code
        handler = load_handler(spec.handler)
    except BaseException as exc:  # noqa: BLE001 - everything init raises is reported, as Lambda does
        traceback.print_exc()
        kind, type_name, message = _describe(exc)
        fatal = isinstance(exc, (ImportError, SyntaxError)) and _is_handler_import_error(exc, spec.handler)
        send_report(sock, ("init_error", fatal, "init_error", type_name, message))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    send_report(sock, ("ready", (time.monotonic() - handed_at) * 1000))
    if spec.concurrency:
        _serve_concurrently(sock, spec, handler)
        os._exit(0)

    while True:
        message = receive_invoke(sock)
        if message is None:
            break  # the supervisor closed our channel: we were reclaimed
        _, request_id, event, remaining_ms = message
        result = _invoke(handler, spec, request_id, event, remaining_ms)
        sys.stdout.flush()
        sys.stderr.flush()
        send_report(sock, result)
    os._exit(0)


def _invoke(handler: Callable[[Any, Any], Any], spec: EnvSpec, request_id: str, event: Any,
            remaining_ms: float) -> tuple:
    """Call the handler once and build the result message."""
    context = LambdaContext(request_id, spec.function_name, spec.memory_mb, remaining_ms)
    t0 = time.perf_counter()
    try:
        handler(event, context)
        status, kind, type_name, text = "ok", "", "", ""
    except Exception as exc:  # noqa: BLE001 - the invocation fails, the environment stays warm
        traceback.print_exc()
        status = "handler_error"
        kind, type_name, text = _describe(exc)
    return ("result", request_id, status, kind, type_name, text, (time.perf_counter() - t0) * 1000)


def _serve_concurrently(sock: socket.socket, spec: EnvSpec, handler: Callable[[Any, Any], Any]) -> None:
    """A service instance: requests run on a pool of `spec.concurrency` threads, as in a threaded
    application server with one database pool per process; each result is sent when it is ready."""
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def serve(request_id: str, event: Any, remaining_ms: float) -> None:
        result = _invoke(handler, spec, request_id, event, remaining_ms)
        with lock:  # one datagram at a time from the pool's threads
            send_report(sock, result)

    with ThreadPoolExecutor(spec.concurrency, thread_name_prefix="lambdaemu-request") as pool:
        while (message := receive_invoke(sock)) is not None:
            _, request_id, event, remaining_ms = message
            pool.submit(serve, request_id, event, remaining_ms)


def _is_handler_import_error(exc: BaseException, handler: str) -> bool:
    # The handler itself cannot be loaded (missing module, syntax error, missing function, a missing
    # dependency) as opposed to init code failing at run time (e.g. a refused database connection).
    if isinstance(exc, (_MissingFunction, SyntaxError, ModuleNotFoundError)):
        return True
    return isinstance(exc, ImportError)


