"""The zygote: the process every environment is forked from, and the supervisor's client for it.

The zygote is a fresh interpreter started once per run, before the supervisor starts any thread or
process of its own. It imports the heavy libraries (drivers, SQLAlchemy, pools) and freezes its heap with
`gc.freeze()`, so a forked environment shares those pages copy-on-write and starts in a couple of
milliseconds. It never imports a handler: importing the handler module is each environment's init phase.

It keeps a few children forked ahead ("parked", as Android's zygote keeps unspecialised children), so a
burst of spawn requests is answered from the parked pool at once; replacements are forked only while no
request is waiting. A parked child learns what it is for when it is handed out.

Once the supervisor asks for a reserve (before the load), the parked children are handed over to it
("spares": their pid and channel) and every replacement follows them. The supervisor then starts an
environment by telling a spare what it is, without a round trip through the zygote: during a burst of
cold starts the zygote competes for the CPU with every environment initialising, and a spawn that waited
for its reply was a cold start delayed by the emulator (p50 20 ms, p99 1.1 s at 167 req/s on 2 CPUs),
during which more arrivals found no environment. The zygote only keeps the spares topped up and asks
nothing of the supervisor but a note of which spare became which environment. A spawn request still
works when the supervisor holds no spare (the zygote forks one and replies).

The zygote is also the environments' subreaper (PR_SET_CHILD_SUBREAPER): a process a handler started and
detached (double fork, `setsid`) is re-parented to the zygote instead of init, and is killed when the
environment it came from ends (it carries `LAMBDAEMU_ENV_ID` in its environment), or with the run.

Messages on the control socket (SOCK_SEQPACKET, pickled: both ends are lambdaemu's own code; handler
code never sees this socket, the zygote closes it in every child):

supervisor → zygote   ("define", function_index, EnvSpec)
                      ("spawn", env_id, function_index, extra_env)
                      ("warm", env_vars)
                      ("reserve", children)
                      ("taken", env_id, pid)         a spare became environment env_id
zygote → supervisor   ("zygote_ready", pid)
                      ("spawned", env_id, pid) + the environment's channel fd
                      ("parked", pid) + the spare's channel fd   (once a reserve was asked for)
                      ("spawn_failed", env_id, message)
                      ("exited", pid, wait_status)
                      ("warmed", error or "")
                      ("reserved", children forked ahead)
zygote or supervisor → parked child   ("spawn", env_id, EnvSpec, extra_env, handed_at)
                      handed_at: the sender's time.monotonic() (one clock for every process), from
                      which the environment measures its init, as Lambda's platform measures Init
                      Duration: a child that waits for a CPU before it runs is an init slowed down
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import pickle
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .environment import ENV_ID_VARIABLE, EnvSpec, environment_main, setup_process
from .loop import Loop
from .processes import (child_pythonpath, die_with_parent, lower_session_priority, session_nice, set_child_subreaper,
                        set_parent_death_signal, signal_group, wait_or_kill)

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

#: Children kept forked ahead at the least. Each costs about 2.4 MB of private memory. Before the load
#: the runner asks for as many as the load's first burst of cold starts needs (`ZygoteClient.reserve`):
#: during a burst the zygote competes for the CPU with every environment initialising, and a fork that
#: waits for it delays a cold start the environment itself never saw.
PARKED_TARGET = 8
#: The most children a reserve keeps forked ahead (about 2.5 GB of private memory).
RESERVE_MAX = 1024
#: The environments' session is lowered at most this far (weight 335 against the supervisor's 1024), even
#: when their own nice value is higher. Lower, a thawed environment waits for a CPU behind the control
#: plane too long: at session nice 10 (weight 110) the supervisor's added dispatch latency p99 at 1000
#: req/s was 1.4-9 ms against 0.6-0.8 ms at 5, while the dispatch lag in a 500 req/s burst is the same at
#: both (1.5-1.8 ms p99; BENCHMARKS.md 8b).
SESSION_NICE_MAX = 5
#: Largest control message (a pickled EnvSpec with the function's environment variables).
CONTROL_MESSAGE = 1 << 20
#: Environment variable naming the run that started a zygote and its environments.
RUN_ID_VARIABLE = "LAMBDAEMU_RUN_ID"


def _send(sock: socket.socket, message: tuple) -> None:
    sock.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _tell_spare(sock: socket.socket, env_id: int, spec: EnvSpec, extra_env: dict[str, str]) -> None:
    """Tell a child forked ahead which environment it is (whoever holds it: the zygote or the supervisor);
    its init is timed from now (see the module docstring)."""
    _send(sock, ("spawn", env_id, spec, extra_env, time.monotonic()))


# --- the zygote process -------------------------------------------------------------------------------


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
                        database=url.database, connect_timeout=5, read_timeout=5, write_timeout=5).close()
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
    """Forks environments on request (see the module docstring)."""

    def __init__(self, control: socket.socket, nice: int) -> None:
        self.control = control
        self.control.setblocking(False)
        self.nice = nice
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller = select.poll()
        self.poller.register(control, select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.specs: dict[int, EnvSpec] = {}
        self.parked: deque[tuple[int, socket.socket]] = deque()
        self.parked_target = PARKED_TARGET
        self.reserve_pending = False
        #: From the first reserve on, parked children are handed to the supervisor as they are forked.
        self.handover = False
        self.handed: set[int] = set()  # pids of spares the supervisor holds and has not used
        self.envs: dict[int, int] = {}  # pid → env id of environments handed out and not yet reaped
        self.pid = os.getpid()

    def serve(self) -> None:
        self._prefork_quietly()
        _send(self.control, ("zygote_ready", self.pid))
        while True:
            # Fork replacements only while nobody is waiting: a request never queues behind a fork.
            wait_ms = 0 if self._ahead() < self.parked_target else None
            events = self.poller.poll(wait_ms)
            self._drain_wakeup()
            self._reap()
            self._serve_requests()
            if not events and self._ahead() < self.parked_target:
                if not self._prefork_quietly():
                    self.parked_target = self._ahead()  # out of processes: stop trying until reaped
            if self.reserve_pending and self._ahead() >= self.parked_target:
                self.reserve_pending = False
                self.handover = True
                self._hand_over()
                self._blocking_send(("reserved", len(self.handed)))
            elif self.handover and self.parked:
                self._hand_over()

    def _ahead(self) -> int:
        """Children forked ahead and not yet used, whoever holds them."""
        return len(self.parked) + len(self.handed)

    def _hand_over(self) -> None:
        """Give every parked child to the supervisor as a spare."""
        while self.parked:
            pid, sock = self.parked.popleft()
            self.handed.add(pid)
            self._blocking_send(("parked", pid), fd=sock.fileno())
            sock.close()

    def _drain_wakeup(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _serve_requests(self) -> None:
        while True:
            try:
                data = self.control.recv(CONTROL_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""  # the supervisor is gone
            if not data:
                self._exit()
            self._handle(pickle.loads(data))

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "define":
            self.specs[message[1]] = message[2]
        elif kind == "spawn":
            self._spawn(message[1], self.specs[message[2]], message[3])
        elif kind == "taken":
            self.handed.discard(message[2])
            self.envs[message[2]] = message[1]
        elif kind == "reserve":
            self.parked_target = max(PARKED_TARGET, min(RESERVE_MAX, message[1]))
            self.reserve_pending = True
        elif kind == "warm":
            try:
                warm_drivers(message[1])
                result = ("warmed", "")
            except Exception as exc:  # noqa: BLE001 - warming is an optimisation; say why it failed
                result = ("warmed", f"{type(exc).__name__}: {exc}")
            gc.collect()
            gc.freeze()
            # Children forked before warming would copy those pages on first use: replace them.
            while self.parked:
                self.parked.popleft()[1].close()  # each sees EOF and exits; reaped as an unknown pid
            self._prefork_quietly()
            self._blocking_send(result)

    def _spawn(self, env_id: int, spec: EnvSpec, extra_env: dict[str, str]) -> None:
        if not self.parked and not self._prefork_quietly():
            self._blocking_send(("spawn_failed", env_id, "could not fork an environment (out of processes "
                                 "or memory)"))
            return
        pid, sock = self.parked.popleft()
        try:
            _tell_spare(sock, env_id, spec, extra_env)
        except OSError:
            pass  # it died while parked: the supervisor sees EOF and an exit report
        self.envs[pid] = env_id
        self._blocking_send(("spawned", env_id, pid), fd=sock.fileno())
        sock.close()

    def _blocking_send(self, message: tuple, fd: int | None = None) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        while True:
            try:
                if fd is None:
                    self.control.send(data)
                else:
                    socket.send_fds(self.control, [data], [fd])
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.control], [], 1.0)
            except (BrokenPipeError, ConnectionResetError):
                self._exit()

    def _prefork_quietly(self) -> bool:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            parent_sock.close()
            child_sock.close()
            return False
        if pid == 0:
            parent_sock.close()
            self._park(child_sock)
        child_sock.close()
        self.parked.append((pid, parent_sock))
        return True

    def _park(self, sock: socket.socket) -> None:
        # In the forked child: drop everything that belongs to the zygote, take our own process group
        # (so the supervisor can freeze and kill whatever the handler spawns), yield the CPU to the
        # control plane and die with the zygote.
        try:
            self.control.close()
            for _, other in self.parked:
                other.close()
            self.wake_r.close()
            self.wake_w.close()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            # A process group of our own, so the supervisor freezes and kills whatever the handler starts
            # with it; the zygote's session, whose priority the zygote lowered for all of them
            # (processes.lower_session_priority); and within it, below the zygote, which keeps the
            # spares coming.
            os.setpgid(0, 0)
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self.pid:
                os._exit(1)  # the zygote died before the death signal was armed
            if self.nice:
                os.nice(self.nice)
            data = sock.recv(CONTROL_MESSAGE)
            if not data:
                os._exit(0)
            _, env_id, spec, extra_env, handed_at = pickle.loads(data)
            setup_process(spec, env_id, extra_env)
            if spec.exec_argv:
                sock.close()
                os.execve(spec.exec_argv[0], list(spec.exec_argv), os.environ)
            environment_main(sock, spec, handed_at)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(1)

    def _reap(self) -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for i, (parked_pid, sock) in enumerate(self.parked):
                if parked_pid == pid:
                    sock.close()
                    del self.parked[i]
                    break
            self.envs.pop(pid, None)
            self.handed.discard(pid)
            reaped = True
            self._blocking_send(("exited", pid, status))
        if reaped:
            # An environment ended, or a process it left behind was re-parented here and exited.
            self._kill_strays()

    def _kill_strays(self) -> None:
        """Kill re-parented processes whose environment has ended (see the module docstring)."""
        live = set(self.envs.values())
        known = set(self.envs) | self.handed | {pid for pid, _ in self.parked}
        for pid in _children(self.pid):
            if pid in known:
                continue
            owner = _environ_value(pid, ENV_ID_VARIABLE)
            if owner is None or not owner.isdigit() or int(owner) not in live:
                _kill_tree(pid)

    def _exit(self) -> None:
        # The supervisor is gone or done: nothing of ours may outlive it, detached or not.
        for pid in _children(self.pid):
            _kill_tree(pid)
        os._exit(0)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list: a child belongs to the thread that forked it)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except OSError:
            pass
    return found


def _environ_value(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for entry in fh.read().split(b"\0"):
                key, _, value = entry.partition(b"=")
                if key.decode(errors="replace") == name:
                    return value.decode(errors="replace")
    except OSError:
        pass
    return None


def _kill_tree(pid: int) -> None:
    # Its whole process group or session may have followed it; SIGCONT first would not matter for SIGKILL.
    signal_group(pid, signal.SIGKILL)
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def zygote_main(control_fd: int, nice: int = 0) -> None:
    """Preload libraries, then fork an environment for every spawn request until the supervisor leaves.
    The zygote leads the session every environment runs in, and gives that session the priority `nice`, at
    most SESSION_NICE_MAX."""
    set_parent_death_signal(signal.SIGKILL)
    set_child_subreaper()
    session_nice_wanted = min(nice, SESSION_NICE_MAX)
    if session_nice_wanted:
        lower_session_priority(session_nice_wanted)
    # Two descriptors per child forked ahead: allow as many as the system lets this process have.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C and a closed terminal are the supervisor's to handle
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()  # keep the preloaded heap out of the collector so forks share its pages
    _Zygote(socket.socket(fileno=control_fd), nice).serve()


# --- the supervisor's side --------------------------------------------------------------------------


class ZygoteLost(Exception):
    """The zygote exited or stopped answering; no environment can be started any more."""


class ZygoteClient:
    """The supervisor's handle on the zygote: start it, define functions, start environments without
    waiting (from a spare it holds at once, or by a request whose reply arrives in the loop), and stop it.

    Callbacks (set by `attach`): `on_spawned(env_id, pid, sock)`, `on_spawn_failed(env_id, message)`,
    `on_exited(pid, wait_status)`, `on_lost(reason)`.
    """

    def __init__(self, logs_dir: Path, run_id: str, *, nice: int = 0) -> None:
        self.logs_dir = logs_dir
        self.run_id = run_id
        self.nice = nice
        #: The priority of the environments' session as the kernel reports it once the zygote is ready
        #: (None where the kernel does not schedule by session; see `processes.lower_session_priority`).
        self.session_nice: int | None = None
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._loop: Loop | None = None
        self._outbox: deque[bytes] = deque()
        self._specs: dict[int, EnvSpec] = {}
        #: Children the zygote forked ahead and handed over (pid, channel), oldest first.
        self.spares: deque[tuple[int, socket.socket]] = deque()
        self.on_spawned: Callable[[int, int, socket.socket], None] = lambda *a: None
        self.on_spawn_failed: Callable[[int, str], None] = lambda *a: None
        self.on_exited: Callable[[int, int], None] = lambda *a: None
        self.on_lost: Callable[[str], None] = lambda *a: None

    @property
    def log_path(self) -> Path:
        """The zygote's own log (environments log to their own files)."""
        return self.logs_dir / "zygote.log"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the zygote and wait until it is ready. Call before this process starts any thread: the
        zygote is the last fork of this process."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from emulator.zygote import zygote_main; "
                 "zygote_main(int(sys.argv[1]), int(sys.argv[2]))", str(theirs.fileno()), str(self.nice)],
                pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                # The run id in the zygote's environment labels it and every environment forked from it
                # (/proc/<pid>/environ), so leftovers of a run can be told from another run's processes.
                env={**os.environ, "PYTHONPATH": child_pythonpath(), RUN_ID_VARIABLE: self.run_id},
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        theirs.close()
        self.sock = mine
        message = self._wait_for("zygote_ready", timeout_s)
        if message is None:
            raise ZygoteLost(f"the environment zygote did not start within {timeout_s:g}s; see {self.log_path}")
        self.session_nice = session_nice(self.proc.pid)

    def warm(self, env_vars: dict[str, str], timeout_s: float = 60.0) -> str:
        """Have the zygote run the drivers' connect paths once against the started database, so
        environments share that memory. Returns "" or why it failed. Call before `attach`."""
        assert self.sock is not None
        _send(self.sock, ("warm", env_vars))
        message = self._wait_for("warmed", timeout_s)
        return f"the zygote did not answer within {timeout_s:g}s" if message is None else message[1]

    def reserve(self, children: int, timeout_s: float = 60.0) -> int:
        """Have the zygote fork `children` children ahead (at most RESERVE_MAX) and wait until it has;
        returns how many it holds (fewer when the system would not give it more processes in time).
        Call before `attach`, after `warm` (warming replaces the children forked before it)."""
        assert self.sock is not None
        _send(self.sock, ("reserve", children))
        message = self._wait_for("reserved", timeout_s)
        return len(self.spares) if message is not None else 0

    def _wait_for(self, kind: str, timeout_s: float) -> tuple | None:
        # Only before the loop runs (start-up): exit reports of discarded parked children are dropped,
        # spares handed over are kept.
        assert self.sock is not None
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            data, fds, _, _ = socket.recv_fds(self.sock, CONTROL_MESSAGE, 1)
            if not data:
                raise ZygoteLost(f"the environment zygote exited; see {self.log_path}")
            message = pickle.loads(data)
            if message[0] == "parked":
                self.spares.append((message[1], socket.socket(fileno=fds[0])))
                continue
            for fd in fds:
                os.close(fd)
            if message[0] == kind:
                return message
        return None

    def attach(self, loop: Loop) -> None:
        """From now on, replies are handled in `loop` and requests never wait."""
        assert self.sock is not None
        self._loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock, self._on_readable)

    def define(self, index: int, spec: EnvSpec) -> None:
        """Tell the zygote what environments of function `index` are (once per function)."""
        self._specs[index] = spec
        self._send(("define", index, spec))

    def spawn(self, env_id: int, function_index: int,
              extra_env: dict[str, str] | None = None) -> tuple[int, socket.socket] | None:
        """Start an environment. From a spare: it is told what it is and its (pid, channel) returned at
        once. With no spare: None, and the zygote's answer comes later through `on_spawned` or
        `on_spawn_failed`."""
        extra_env = extra_env or {}
        while self.spares:
            pid, sock = self.spares.popleft()
            try:
                _tell_spare(sock, env_id, self._specs[function_index], extra_env)
            except OSError:
                sock.close()  # it died while parked (the zygote reports its exit): take the next one
                continue
            self._send(("taken", env_id, pid))
            return pid, sock
        self._send(("spawn", env_id, function_index, extra_env))
        return None

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if self.sock is None:
            raise ZygoteLost("the environment zygote is not running")
        if self._loop is None or not self._outbox:
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._lost(f"the environment zygote stopped taking requests ({exc.strerror or exc})")
                return
        # The zygote is behind (its socket buffer is full): queue, and send when it can take more.
        self._outbox.append(data)
        if self._loop is not None and len(self._outbox) == 1:
            self._loop.add_writer(self.sock, self._on_writable)

    def _on_writable(self) -> None:
        assert self.sock is not None and self._loop is not None
        while self._outbox:
            try:
                self.sock.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"the environment zygote stopped taking requests ({exc.strerror or exc})")
                return
            self._outbox.popleft()
        self._loop.remove_writer(self.sock)

    def _on_readable(self) -> None:
        sock = self.sock
        while sock is not None:
            try:
                data, fds, _, _ = socket.recv_fds(sock, CONTROL_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    return
                raise
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost(f"the environment zygote exited unexpectedly; see {self.log_path}")
                return
            message = pickle.loads(data)
            kind = message[0]
            if kind == "spawned":
                self.on_spawned(message[1], message[2], socket.socket(fileno=fds[0]))
            elif kind == "parked":
                self.spares.append((message[1], socket.socket(fileno=fds[0])))
            else:
                for fd in fds:
                    os.close(fd)
                if kind == "exited":
                    self.on_exited(message[1], message[2])
                elif kind == "spawn_failed":
                    self.on_spawn_failed(message[1], message[2])
            sock = self.sock

    def _lost(self, reason: str) -> None:
        self._detach()
        self.on_lost(reason)

    def _detach(self) -> None:
        while self.spares:
            self.spares.popleft()[1].close()  # a spare that sees EOF exits
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock)
                self._loop.remove_writer(self.sock)
            self.sock.close()
            self.sock = None
        self._outbox.clear()

    def alive(self) -> bool:
        """Whether the zygote process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the zygote: it kills every process it started, detached or not, and exits. Idempotent."""
        self._detach()
        if self.proc is not None:
            wait_or_kill(self.proc, timeout_s, group=True)
            self.proc = None



if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
