"""The control plane: one loop that owns the clock and every environment.

It schedules arrivals, routes each to an idle environment or spawns one (through the zygote), freezes
environments after each reply and thaws them before the next, throttles at the concurrency limits and
the scaling rate, and keeps every deadline itself (invocation timeouts, init limits, idle reclaim,
maximum lifetime): a frozen process cannot report anything, so nothing relies on environments keeping
time. Environments are watched through one SOCK_SEQPACKET socket each, multiplexed with epoll.

The supervisor only fires events (`events.py`); stats, writers and displays subscribe to them.
"""

from __future__ import annotations

import heapq
import itertools
import marshal
import os
import pickle
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import RunConfig
from .environment import MAX_MESSAGE, EnvSpec
from .errors import HandlerLoadError
from .events import Events
from .processes import die_with_parent

INITIALISING, BUSY, FROZEN, VANISHED, ENDED = "initialising", "busy", "frozen", "vanished", "ended"

#: Throttle reasons, with the exception Lambda returns for each (HTTP 429).
THROTTLE_REASONS = {
    "account_concurrency": "TooManyRequestsException (ConcurrentInvocationLimitExceeded)",
    "reserved_concurrency": "TooManyRequestsException (ReservedFunctionConcurrentInvocationLimitExceeded)",
    "scale_rate": "TooManyRequestsException (Rate Exceeded: scaling rate)",
}

#: Environment variable naming the run that started a zygote and its environments.
RUN_ID_VARIABLE = "LAMBDAEMU_RUN_ID"

#: How long the shutdown waits for environments to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 2.0


@dataclass(eq=False)
class Invocation:
    """One arrival and what became of it. Times are seconds from the run's t0."""

    seq: int
    request_id: str
    scheduled: float
    start: float = 0.0
    end: float = 0.0
    env_id: int | None = None
    env_pid: int | None = None
    cold: bool = False
    init_ms: float | None = None
    duration_ms: float | None = None
    status: str = ""
    error_kind: str = ""
    error_type: str = ""
    message: str = ""
    throttle_reason: str = ""


@dataclass(eq=False)
class Environment:
    """The supervisor's record of one execution environment process."""

    id: int
    pid: int
    sock: socket.socket | None
    provisioned: bool
    created: float
    state: str = INITIALISING
    ready_at: float | None = None
    init_ms: float | None = None
    last_used: float = 0.0
    use_seq: int = 0
    invocations: int = 0
    current: Invocation | None = None
    idle_token: int = 0
    recycle: bool = False
    oom: bool = False
    vanished: bool = False
    end_reason: str = ""
    ended_at: float | None = None
    exit: str = ""
    exited_at: float | None = None


class IdlePool:
    """Idle (frozen) environments, ordered by the routing strategy.

    One heap serves every strategy by its key: newest/oldest by creation order, mru/lru by last use,
    random by a random draw. Removal is lazy: an entry counts only while the environment is still
    frozen with the same idle token.
    """

    def __init__(self, routing: str, rng: random.Random) -> None:
        self.routing = routing
        self._key: Callable[[Environment], float] = {
            "newest": lambda env: -env.id,
            "oldest": lambda env: env.id,
            "mru": lambda env: -env.use_seq,
            "lru": lambda env: env.use_seq,
            "random": lambda env: rng.random(),
        }[routing]
        self._heap: list[tuple[float, int, int, Environment]] = []
        self._count = 0
        self._tiebreak = itertools.count()

    def push(self, env: Environment) -> None:
        env.idle_token += 1
        heapq.heappush(self._heap, (self._key(env), next(self._tiebreak), env.idle_token, env))
        self._count += 1

    def discard(self, env: Environment) -> None:
        """Forget `env` (it is being reclaimed while idle)."""
        env.idle_token += 1
        self._count -= 1

    def pop(self) -> Environment | None:
        while self._heap:
            _, _, token, env = heapq.heappop(self._heap)
            if token == env.idle_token and env.state == FROZEN:
                env.idle_token += 1
                self._count -= 1
                return env
        return None

    def __len__(self) -> int:
        return self._count


class Supervisor:
    """Runs environments for one function. Use `start()`, then `provision()`, `run_load()`, `shutdown()`.

    `clock` is injectable (monotonic seconds) so tests can control time-based decisions.
    """

    def __init__(self, config: RunConfig, *, handler_env: dict[str, str], logs_dir: Path, events: Events,
                 run_id: str, clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        self.config = config
        self.handler_env = handler_env
        self.logs_dir = logs_dir
        self.events = events
        self.run_id = run_id
        self.clock = clock
        self.rng = random.Random(seed)
        self.t0 = clock()
        self.stop_requested: int | None = None  # the signal that asked us to stop
        self.fatal_error: HandlerLoadError | None = None

        # epoll directly rather than `selectors`: this wait runs twice per invocation, and the raw
        # call with an fd → owner dict costs a fraction of the selector's bookkeeping.
        self._epoll = select.epoll()
        self._owners: dict[int, Any] = {}
        self._envs: dict[int, Environment] = {}  # live and vanished environments by id
        self._by_pid: dict[int, Environment] = {}
        self._registry_lock = threading.Lock()
        self._idle = IdlePool(config.routing, self.rng)
        self._provisioned_idle = IdlePool(config.routing, self.rng)
        self._timers: list[tuple[float, int, str, Environment, Any]] = []
        self._timer_seq = itertools.count()
        self._env_ids = itertools.count(1)
        self._use_seq = itertools.count(1)
        self._inv_seq = itertools.count(1)
        # Request ids look like Lambda's (UUIDs) and are unique per run: a random prefix and a counter
        # (a fresh uuid4 per arrival is measurable supervisor CPU at 1000 req/s).
        self._request_prefix = str(uuid.uuid4())[:24]
        self.counts = {INITIALISING: 0, BUSY: 0, FROZEN: 0, VANISHED: 0}
        self.peak_environments = 0
        self._tokens = float(config.scale_rate[0])
        self._tokens_at = self.clock()
        self._zygote: subprocess.Popen | None = None
        self._zygote_sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._watch(self._wake_r, self._wake_r)

    # ------------------------------------------------------------------------------------------------
    # start and stop

    def start(self) -> None:
        """Start the zygote. Call before any thread starts: it is the last fork of this process."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._zygote = subprocess.Popen(
            [sys.executable, "-c", "import sys; from emulator.environment import zygote_main; "
             "zygote_main(int(sys.argv[1]))", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=open(self.logs_dir / "zygote.log", "ab"), stderr=subprocess.STDOUT,
            # The run id in the zygote's environment labels it and every environment forked from it
            # (/proc/<pid>/environ), so leftovers of a run can be told from another run's processes.
            env={**os.environ, "PYTHONPATH": _pythonpath(), RUN_ID_VARIABLE: self.run_id},
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        theirs.close()
        self._zygote_sock = mine
        message = self._recv_control(timeout_s=60)
        if message is None or message[0] != "zygote_ready":
            raise RuntimeError(f"the environment zygote did not start; see {self.logs_dir / 'zygote.log'}")
        self._watch(mine, mine)

    def warm(self) -> str:
        """Have the zygote run the drivers' connect paths once against the started database (see
        `environment.warm_drivers`), so environments share that memory. Returns "" or why it failed."""
        assert self._zygote_sock is not None
        self._zygote_sock.send(pickle.dumps(("warm", self.handler_env)))
        while True:
            message = self._recv_control(timeout_s=60)
            if message is None:
                return "the zygote did not answer within 60 s"
            if message[0] == "warmed":
                return message[1]
            self._on_control(message)

    def wakeup_fd(self) -> int:
        """A file descriptor for `signal.set_wakeup_fd`, so a signal interrupts the loop's wait."""
        return self._wake_w.fileno()

    def request_stop(self, signum: int) -> None:
        """Ask the loop to stop (safe to call from a signal handler: it only records)."""
        self.stop_requested = signum

    def now(self) -> float:
        """Seconds since t0."""
        return self.clock() - self.t0

    def shutdown(self, grace_s: float = STOP_GRACE_S) -> None:
        """End every environment (in-flight invocations are recorded as interrupted) and the zygote.

        Escalates: SIGCONT (a stopped process ignores SIGTERM until continued), SIGTERM, grace, SIGKILL.
        """
        now = self.now()
        for env in list(self._envs.values()):
            if env.current is not None:
                self._finish(env, env.current, now, status="interrupted", kind="interrupted")
            if env.state != ENDED:
                self._end(env, "run_end", signal_=None)
        pending = [env for env in self._by_pid.values() if not env.exit]
        for env in pending:
            _signal_group(env.pid, signal.SIGCONT)
            _signal_group(env.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(not env.exit for env in pending) and time.monotonic() < deadline:
            self._pump_control(timeout_s=0.05)
        for env in pending:
            if not env.exit:
                _signal_group(env.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(not env.exit for env in pending) and time.monotonic() < deadline:
            self._pump_control(timeout_s=0.05)
        for env in pending:
            if not env.exit:  # never reported: still say how it ended, as far as we know
                self._exited(env, "unknown")
        self.close()

    def close(self) -> None:
        """Stop the zygote (its environments die with it) and release sockets. Idempotent."""
        if self._zygote_sock is not None:
            self._unwatch(self._zygote_sock)
            self._zygote_sock.close()
            self._zygote_sock = None
        if self._zygote is not None:
            try:
                self._zygote.wait(5)
            except subprocess.TimeoutExpired:
                _signal_group(self._zygote.pid, signal.SIGKILL)
                self._zygote.wait(5)
            self._zygote = None
        for env in self._envs.values():
            self._close_socket(env)
        self._unwatch(self._wake_r)

    # ------------------------------------------------------------------------------------------------
    # the loop

    def provision(self, count: int, timeout_s: float | None = None) -> None:
        """Initialise `count` provisioned environments before load starts; wait until they are ready."""
        envs = [self._spawn(provisioned=True) for _ in range(count)]
        limit = self.config.init_limit_s if timeout_s is None else timeout_s
        deadline = self.clock() + limit + 5
        while any(env.state == INITIALISING for env in envs) and self.clock() < deadline:
            if self.stop_requested is not None or self.fatal_error is not None:
                break
            self._step(deadline)
        if self.fatal_error is not None:
            raise self.fatal_error

    def run_load(self, arrivals: Iterator[float], *, load_start: float | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 0.5) -> None:
        """Dispatch arrivals (offsets from `load_start`, default now) until they run out, then wait for
        in-flight invocations to end. Returns early when a stop is requested or the handler cannot load."""
        start = self.now() if load_start is None else load_start
        next_tick = self.clock() + tick_s if on_tick is not None else float("inf")
        next_at = next(arrivals, None)
        while self.stop_requested is None and self.fatal_error is None:
            now = self.now()
            while next_at is not None and start + next_at <= now:
                self._arrive(start + next_at)
                next_at = next(arrivals, None)
            if next_at is None and self.counts[BUSY] == 0 and self.counts[INITIALISING] == 0:
                break
            wake = self.t0 + start + next_at if next_at is not None else self.clock() + 1.0
            if on_tick is not None and self.clock() >= next_tick:
                on_tick()
                next_tick = self.clock() + tick_s
            self._step(min(wake, next_tick))
        if self.fatal_error is not None:
            raise self.fatal_error

    def idle(self, seconds: float) -> None:
        """Keep running the loop (timers, reclaims) without arrivals for `seconds`."""
        deadline = self.clock() + seconds
        while self.clock() < deadline and self.stop_requested is None:
            self._step(deadline)

    def _step(self, wake_at: float) -> None:
        """Run due timers, then wait for messages until `wake_at` or the next timer."""
        self._run_timers()
        if self._timers:
            wake_at = min(wake_at, self._timers[0][0])
        self._dispatch(max(0.0, wake_at - self.clock()))

    def _dispatch(self, timeout: float) -> None:
        """Handle whatever the sockets have, waiting at most `timeout` seconds for something."""
        for fd, _ in self._epoll.poll(timeout):
            owner = self._owners.get(fd)
            if owner is None:
                continue  # closed by an earlier event of this batch
            if owner is self._wake_r:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif owner is self._zygote_sock:
                self._pump_control(timeout_s=0)
            else:
                self._on_env_message(owner)

    def _watch(self, sock: socket.socket, owner: Any) -> None:
        self._owners[sock.fileno()] = owner
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._owners.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    # ------------------------------------------------------------------------------------------------
    # arrivals, routing, throttling

    def _arrive(self, scheduled: float) -> None:
        seq = next(self._inv_seq)
        inv = Invocation(seq, f"{self._request_prefix}{seq:012x}", scheduled)
        now = self.now()
        env = self._provisioned_idle.pop() or self._idle.pop()
        if env is None:
            # Before starting (or refusing) a new environment, take the replies already waiting: when
            # the loop runs behind, environments that finished are otherwise passed over, and every
            # late arrival forks a new one (or is throttled) while idle capacity sits in the sockets.
            self._dispatch(0)
            env = self._provisioned_idle.pop() or self._idle.pop()
        if env is not None:
            self._invoke(env, inv, now, thaw=True)
            return
        reason = self._throttle_reason()
        if reason:
            inv.start = inv.end = now
            inv.status, inv.throttle_reason, inv.error_kind = "throttled", reason, "throttled"
            self.events.invocation_end.fire(invocation=inv)
            return
        self._tokens -= 1
        env = self._spawn(provisioned=False)
        inv.cold = True
        self._invoke(env, inv, now, thaw=False)

    def in_flight(self) -> int:
        """Invocations running now (each holds one environment, busy or initialising)."""
        return self.counts[BUSY] + self.counts[INITIALISING]

    def _throttle_reason(self) -> str:
        active = self.in_flight()
        reserved = self.config.reserved_concurrency
        if reserved is not None and active >= reserved:
            return "reserved_concurrency"
        if active >= self.config.concurrency_limit:
            return "account_concurrency"
        # Token bucket for new environments, refilled continuously (N per window).
        count, window = self.config.scale_rate
        now = self.clock()
        self._tokens = min(float(count), self._tokens + (now - self._tokens_at) * count / window)
        self._tokens_at = now
        if self._tokens < 1.0:
            return "scale_rate"
        return ""

    def _invoke(self, env: Environment, inv: Invocation, now: float, *, thaw: bool) -> None:
        inv.start = now
        inv.env_id, inv.env_pid = env.id, env.pid
        env.current = inv
        env.invocations += 1
        if thaw:
            self._set_state(env, BUSY)
            _signal_group(env.pid, signal.SIGCONT)
        if env.state == BUSY:
            self._send_invoke(env, inv)
        # A cold environment gets the invocation once its init phase reports ready.

    def _send_invoke(self, env: Environment, inv: Invocation) -> None:
        remaining_ms = self.config.timeout_s * 1000
        try:
            assert env.sock is not None
            env.sock.send(marshal.dumps(("invoke", inv.request_id, {"seq": inv.seq}, remaining_ms)))
        except OSError:
            return  # it died; EOF or the zygote's report will finish the invocation as a crash
        self._add_timer(self.clock() + self.config.timeout_s, "timeout", env, inv)

    # ------------------------------------------------------------------------------------------------
    # environments

    def _spawn(self, *, provisioned: bool) -> Environment:
        env_id = next(self._env_ids)
        log_path = self.logs_dir / f"env-{env_id:05d}.log"
        env_vars = dict(self.handler_env)
        if "PGAPPNAME" not in env_vars:
            # A second tie between a server-side connection and this environment, needing no handler code.
            env_vars["PGAPPNAME"] = f"lambdaemu-env-{env_id}"
        spec = EnvSpec(handler=self.config.handler, env_vars=env_vars, log_path=str(log_path),
                       memory_mb=self.config.memory_mb, init_delay_s=self.config.init_delay_s,
                       function_name=f"lambdaemu-{self.run_id}")
        assert self._zygote_sock is not None
        self._zygote_sock.send(pickle.dumps(("spawn", env_id, spec)))
        while True:
            message, fds = self._recv_control_fds()
            if message[0] == "spawned" and message[1] == env_id:
                break
            if message[0] == "spawn_failed":
                raise RuntimeError(f"could not fork an environment: {message[2]}")
            self._on_control(message)
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(True)
        env = Environment(id=env_id, pid=message[2], sock=sock, provisioned=provisioned, created=self.now())
        with self._registry_lock:
            self._envs[env_id] = env
            self._by_pid[env.pid] = env
        self.counts[INITIALISING] += 1
        live = self.counts[INITIALISING] + self.counts[BUSY] + self.counts[FROZEN]
        self.peak_environments = max(self.peak_environments, live)
        self._watch(sock, env)
        self._add_timer(self.clock() + self.config.init_limit_s, "init", env, None)
        self._add_timer(self.clock() + self.config.env_max_lifetime_s, "lifetime", env, None)
        if not provisioned:
            # One idle timer per environment, re-armed from its last use when it fires early: a timer
            # per freeze would pile up (rps × TTL entries) for environments that are reused anyway.
            self._add_timer(self.clock() + self.config.env_idle_ttl_s, "idle", env, None)
        self.events.env_start.fire(env=env)
        return env

    def _on_env_message(self, env: Environment) -> None:
        try:
            data = env.sock.recv(MAX_MESSAGE) if env.sock is not None else b""
        except OSError:
            data = b""
        if not data:
            self._died(env)
            return
        message = marshal.loads(data)
        kind = message[0]
        now = self.now()
        if kind == "result":
            _, request_id, status, error_kind, error_type, text, duration_ms = message
            inv = env.current
            if inv is None or inv.request_id != request_id:
                return  # a late reply to an invocation already failed by timeout
            inv.duration_ms = duration_ms
            if duration_ms > self.config.timeout_s * 1000:
                # Replied, but only after the function timeout: Lambda would have cut it off.
                self._finish(env, inv, now, status="timeout", kind="timeout",
                             message=f"Task timed out after {self.config.timeout_s:g} seconds")
                self._end(env, "timeout", signal_=signal.SIGKILL)
                return
            self._finish(env, inv, now, status=status, kind=error_kind, type_name=error_type, message=text)
            self._after_invocation(env)
        elif kind == "ready":
            env.ready_at, env.init_ms = now, message[1]
            self._set_state(env, BUSY)
            self.events.env_ready.fire(env=env)
            if env.current is not None:
                env.current.init_ms = env.init_ms
                self._send_invoke(env, env.current)
            else:
                self._freeze(env)
        elif kind == "init_error":
            _, fatal, error_kind, error_type, text = message
            if fatal and self.fatal_error is None:
                self.fatal_error = HandlerLoadError(
                    f"--handler {self.config.handler}: the handler cannot be loaded in an environment "
                    f"({text}); see {self.logs_dir / f'env-{env.id:05d}.log'}")
            if env.current is not None:
                self._finish(env, env.current, now, status="init_error", kind="init_error",
                             type_name=error_type, message=text)
            self._end(env, "init_error", signal_=None)
        elif kind == "oom":
            env.oom = True

    def _after_invocation(self, env: Environment) -> None:
        if env.recycle:
            self._end(env, "max_lifetime", signal_=signal.SIGKILL)
        else:
            self._freeze(env)

    def _freeze(self, env: Environment) -> None:
        _signal_group(env.pid, signal.SIGSTOP)
        self._set_state(env, FROZEN)
        env.last_used = self.now()
        env.use_seq = next(self._use_seq)
        if env.provisioned:
            self._provisioned_idle.push(env)
        else:
            self._idle.push(env)

    def _finish(self, env: Environment, inv: Invocation, now: float, *, status: str, kind: str = "",
                type_name: str = "", message: str = "") -> None:
        inv.end = now
        inv.status, inv.error_kind, inv.error_type, inv.message = status, kind, type_name, message
        env.current = None
        self.events.invocation_end.fire(invocation=inv)

    def _died(self, env: Environment) -> None:
        """The environment's process ended on its own (crash, out of memory, exit in init)."""
        if env.state in (ENDED, VANISHED):
            self._close_socket(env)
            return
        if env.current is not None:
            if env.oom:
                status = kind = "out_of_memory"
            elif env.state == INITIALISING:
                status = kind = "init_error"
            else:
                status = kind = "crash"
            self._finish(env, env.current, self.now(), status=status, kind=kind,
                         message="environment process exited during the " +
                         ("init phase" if env.state == INITIALISING else "invocation"))
        self._end(env, "out_of_memory" if env.oom else "crash", signal_=None)

    def _end(self, env: Environment, reason: str, *, signal_: int | None) -> None:
        """Take `env` out of service. `signal_` is sent to its process group (None: it is dying anyway)."""
        if env.state == FROZEN:
            (self._provisioned_idle if env.provisioned else self._idle).discard(env)
        if env.state in self.counts:
            self.counts[env.state] -= 1
        env.state = ENDED
        # A vanished environment left the function when it vanished; the run's end only kills it.
        env.end_reason = env.end_reason or reason
        env.ended_at = env.ended_at if env.ended_at is not None else self.now()
        self._close_socket(env)
        if signal_ is not None:
            _signal_group(env.pid, signal_)

    def _vanish(self, env: Environment, reason: str) -> None:
        """Reclaim without closing anything: the process stays frozen and its connections stay open,
        as when a microVM disappears without sending FIN."""
        self._idle.discard(env)
        self._set_state(env, VANISHED)
        env.vanished = True
        env.end_reason = reason
        env.ended_at = self.now()
        self._close_socket(env)

    def _set_state(self, env: Environment, state: str) -> None:
        self.counts[env.state] -= 1
        self.counts[state] += 1
        env.state = state

    def _close_socket(self, env: Environment) -> None:
        if env.sock is not None:
            self._unwatch(env.sock)
            env.sock.close()
            env.sock = None

    def _exited(self, env: Environment, how: str) -> None:
        env.exit = how
        env.exited_at = self.now()
        if env.state != ENDED:
            if env.state == VANISHED:
                self.counts[VANISHED] -= 1
                env.state = ENDED
            else:
                self._died(env)
        with self._registry_lock:
            self._envs.pop(env.id, None)
            self._by_pid.pop(env.pid, None)
        self.events.env_end.fire(env=env)

    # ------------------------------------------------------------------------------------------------
    # timers: every deadline is kept here, never by the environments

    def _add_timer(self, at: float, kind: str, env: Environment, token: Any) -> None:
        heapq.heappush(self._timers, (at, next(self._timer_seq), kind, env, token))

    def _run_timers(self) -> None:
        now_clock = self.clock()
        while self._timers and self._timers[0][0] <= now_clock:
            _, _, kind, env, token = heapq.heappop(self._timers)
            if env.state in (ENDED, VANISHED):
                continue
            if kind == "timeout" and env.current is token and env.state == BUSY:
                if self._reply_waiting(env):
                    # The loop ran late, not the invocation: its reply is already here (the handler's
                    # own duration, checked in _on_env_message, still decides whether it timed out).
                    self._on_env_message(env)
                    if env.current is not token:
                        continue
                self._finish(env, token, self.now(), status="timeout", kind="timeout",
                             message=f"Task timed out after {self.config.timeout_s:g} seconds")
                self._end(env, "timeout", signal_=signal.SIGKILL)
            elif kind == "init" and env.state == INITIALISING:
                if env.current is not None:
                    self._finish(env, env.current, self.now(), status="timeout", kind="timeout",
                                 message=f"init phase exceeded {self.config.init_limit_s:g} seconds")
                self._end(env, "init_timeout", signal_=signal.SIGKILL)
            elif kind == "idle":
                ttl = self.config.env_idle_ttl_s
                idle_for = self.now() - env.last_used if env.state == FROZEN else 0.0
                if idle_for >= ttl:
                    self._reclaim(env, "idle")
                else:
                    self._add_timer(now_clock + ttl - idle_for, "idle", env, None)
            elif kind == "lifetime":
                if env.state == FROZEN:
                    self._reclaim(env, "max_lifetime")
                else:
                    env.recycle = True

    @staticmethod
    def _reply_waiting(env: Environment) -> bool:
        if env.sock is None:
            return False
        try:
            env.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # a broken socket: let the message handler see the EOF
        return True

    def _reclaim(self, env: Environment, reason: str) -> None:
        if self.config.reclaim == "vanish":
            self._vanish(env, reason)
        else:
            # SIGKILL: the kernel closes the sockets, so the database sees a clean disconnect.
            self._end(env, reason, signal_=signal.SIGKILL)

    # ------------------------------------------------------------------------------------------------
    # the zygote's control socket

    def _recv_control(self, timeout_s: float) -> tuple | None:
        assert self._zygote_sock is not None
        self._zygote_sock.settimeout(timeout_s)
        try:
            data = self._zygote_sock.recv(MAX_MESSAGE)
        except (socket.timeout, BlockingIOError):
            return None
        finally:
            self._zygote_sock.settimeout(None)
        if not data:
            raise RuntimeError("the environment zygote exited")
        return pickle.loads(data)

    def _recv_control_fds(self) -> tuple[tuple, list[int]]:
        assert self._zygote_sock is not None
        data, fds, _, _ = socket.recv_fds(self._zygote_sock, MAX_MESSAGE, 1)
        if not data:
            raise RuntimeError("the environment zygote exited")
        return pickle.loads(data), fds

    def _pump_control(self, timeout_s: float) -> None:
        """Handle whatever the zygote has sent (exit reports), waiting at most `timeout_s`."""
        if self._zygote_sock is None:
            time.sleep(timeout_s)
            return
        message = self._recv_control(timeout_s) if timeout_s else self._recv_control(0.001)
        while message is not None:
            self._on_control(message)
            message = self._recv_control(0.0001)

    def _on_control(self, message: tuple) -> None:
        if message[0] == "exited":
            env = self._by_pid.get(message[1])
            if env is not None:
                self._exited(env, describe_wait_status(message[2]))

    # ------------------------------------------------------------------------------------------------
    # what the sampler and displays read (from other threads)

    def snapshot(self) -> dict[str, Any]:
        """Counts by state and each environment's pid and state, safe to call from another thread."""
        with self._registry_lock:
            envs = list(self._envs.values())
        return {
            "counts": dict(self.counts),
            "in_flight": self.in_flight(),
            "by_id": {env.id: env.state for env in envs},
            "by_pid": {env.pid: env.state for env in envs},
        }

    def live_environments(self) -> list[Environment]:
        """Environments not yet reported as exited (including vanished ones)."""
        with self._registry_lock:
            return list(self._envs.values())


# --- helpers ---------------------------------------------------------------------------------------------


def describe_wait_status(status: int) -> str:
    """`exit 0`, `exit 1`, `SIGKILL`, ...: how a process ended, by signal name."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def _signal_group(pid: int, sig: int) -> None:
    # Environments lead their own process group, so whatever a handler spawned is frozen, thawed and
    # killed with it. Fall back to the pid in the instant before the child has called setpgid.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:
        pass


def _pythonpath() -> str:
    # The zygote must import this package and the user's handler modules from where the user runs.
    here = str(Path(__file__).resolve().parent.parent)
    parts = [os.getcwd(), here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))
