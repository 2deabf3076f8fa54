"""The control plane: one loop that owns the clock and every environment of every function.

It schedules arrivals, routes each to an idle environment or asks the zygote for a new one (without
waiting: the environment is `initialising` from the request, and the zygote's reply arrives in the loop),
freezes environments after each reply and thaws them before the next, throttles at the account limit,
reserved concurrency and the scaling rate (`function.py`), and keeps every deadline itself (invocation
timeouts, init limits, idle reclaim, maximum lifetime): a frozen process cannot report anything, so
nothing relies on environments keeping time.

Nothing in the loop blocks: arrivals are timers that dispatch a bounded batch and yield to I/O, so a stop
request is seen within milliseconds at any load and replies are never starved by a backlog of arrivals.
Environments report over one SOCK_SEQPACKET socket each (`protocol.py`); a message that is not valid
costs that environment (status `crash`, error kind `runtime_error`), never the run.

The supervisor fires events (`events.py`); stats, writers, the sampler's shared view and the display
subscribe. It imports none of them.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import deque
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .config import FunctionConfig
from .environment import EnvSpec
from .errors import INIT_TIMEOUT_PREFIX, HandlerLoadError, LambdaemuError, classify
from .events import Events
from .function import Account, FunctionPolicy, IdlePool
from .loop import Loop, Timer
from .processes import signal_group
from .protocol import ProtocolError, encode_invoke, read_report
from .zygote import ZygoteClient

INITIALISING, BUSY, FROZEN, VANISHED, ENDED = "initialising", "busy", "frozen", "vanished", "ended"
#: A service instance once ready: serving, never frozen.
SERVING = "serving"
_RUNNING = (INITIALISING, BUSY)  # states that hold concurrency
LIVE_STATES = (INITIALISING, BUSY, FROZEN)

#: How long the shutdown waits for environments to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 2.0
#: Most arrivals dispatched in one go before the loop looks at its sockets and its stop flag again.
ARRIVAL_BATCH = 256
#: ... or this much time, whichever comes first.
ARRIVAL_BATCH_S = 0.005


class ZygoteGone(LambdaemuError):
    """The environment zygote exited: no environment can be started, so the run ends."""


@dataclass(eq=False, slots=True)
class Invocation:
    """One arrival and what became of it. Times are seconds from the run's t0."""

    seq: int
    request_id: str
    function: str
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
    #: Database errors a library handled itself during this invocation (e.g. refused pool connections).
    absorbed: int = 0
    #: Why it failed, when its error kind alone does not say (a timeout behind refused connections).
    cause: str = ""
    probe: bool = False
    timer: Timer | None = None  # a service request's timeout


@dataclass(eq=False, slots=True)
class Environment:
    """The supervisor's record of one execution environment process."""

    id: int
    function: "Function"
    provisioned: bool
    created: float
    pid: int | None = None
    sock: socket.socket | None = None
    state: str = INITIALISING
    spawned_at: float | None = None
    ready_at: float | None = None
    init_ms: float | None = None
    last_used: float = 0.0
    use_seq: int = 0
    idle_token: int = 0
    invocations: int = 0
    ok: int = 0
    errors: int = 0
    absorbed: int = 0
    probe: bool = False
    current: Invocation | None = None
    #: A service instance's requests in flight (by request id); timed-out ones stay until they answer,
    #: as their thread is still busy.
    requests: dict[str, Invocation] | None = None
    #: The Runtime API endpoint of an environment whose runtime is a program of its own (Node.js, ...).
    endpoint: Any = None
    sent_at: float = 0.0  # clock time the current invocation was handed over
    timers: tuple[Timer, ...] = ()
    recycle: bool = False
    oom: bool = False
    vanished: bool = False
    end_reason: str = ""
    ended_at: float | None = None
    exit: str = ""
    exited_at: float | None = None


class Function:
    """One function as the supervisor runs it: its configuration, its policy share, its idle pools and
    its environments by state."""

    def __init__(self, index: int, config: FunctionConfig, policy: FunctionPolicy, rng: random.Random) -> None:
        self.index = index
        self.config = config
        self.name = config.name
        self.policy = policy
        self.idle = IdlePool(config.routing, rng, FROZEN)
        self.provisioned_idle = IdlePool(config.routing, rng, FROZEN)
        self.counts = {INITIALISING: 0, BUSY: 0, FROZEN: 0, VANISHED: 0, SERVING: 0}
        self.peak_environments = 0
        self.service = config.service
        self.instances: list[Environment] = []
        self.queue: deque[Invocation] = deque()  # a service's requests waiting for a free thread
        self.timeouts: _Deadlines | None = None  # set by the supervisor
        self.timeout_message = f"Task timed out after {config.timeout_s:g} seconds"
        self.init_timeout_message = f"{INIT_TIMEOUT_PREFIX}{config.init_limit_s:g} seconds"

    def live(self) -> int:
        """Environments that exist for the function (initialising, busy or frozen)."""
        c = self.counts
        return c[INITIALISING] + c[BUSY] + c[FROZEN]


class Supervisor:
    """Runs the environments of every function of one account.

    Use: `start()` (defines the functions in the zygote, attaches to the loop), optionally `provision()`,
    `add_arrivals()` per function, `run()`, then `shutdown()` on every path. `loop.clock` is the clock of
    every decision (injectable for tests).
    """

    def __init__(self, functions: list[FunctionConfig], *, concurrency_limit: int, zygote: ZygoteClient,
                 loop: Loop, events: Events, logs_dir: Any, run_id: str, seed: int = 0) -> None:
        self.loop = loop
        self.clock = loop.clock
        self.zygote = zygote
        self.events = events
        self.logs_dir = logs_dir
        self.run_id = run_id
        self.rng = random.Random(seed)
        self.t0 = self.clock()
        self.stop_requested: int | None = None  # the signal that asked us to stop
        self.hurried = False  # a second stop request: the shutdown stops waiting
        self.fatal_error: LambdaemuError | None = None
        self.account = Account(concurrency_limit, self.clock)
        self.functions: list[Function] = []
        for index, config in enumerate(functions):
            policy = self.account.add_function(config.name, reserved=config.reserved_concurrency,
                                               scale_rate=config.scale_rate)
            self.functions.append(Function(index, config, policy, self.rng))
        self.by_name = {f.name: f for f in self.functions}
        for function in self.functions:
            function.timeouts = _Deadlines(self.loop, self._invocation_timeout)
        self._envs: dict[int, Environment] = {}  # live and vanished environments by id
        self._by_pid: dict[int, Environment] = {}
        self._env_ids = itertools.count(1)
        self._use_seq = itertools.count(1)
        self._inv_seq = itertools.count(1)
        # Request ids look like Lambda's (UUIDs) and are unique per run: a random prefix and a counter
        # (a fresh uuid4 per arrival is measurable supervisor CPU at 1000 req/s).
        self._request_prefix = str(uuid.uuid4())[:24]
        self.counts = {INITIALISING: 0, BUSY: 0, FROZEN: 0, VANISHED: 0, SERVING: 0}
        self.peak_environments = 0
        self.shutting_down = False
        self._streams: list[_ArrivalStream] = []
        self._open_streams = 0  # streams with arrivals still to dispatch
        self._open_requests = 0  # service requests arrived and not finished
        self._vanished: dict[int, Environment] = {}

    # ------------------------------------------------------------------------------------------------
    # start and stop

    def start(self) -> None:
        """Define every function in the zygote and take the zygote's replies in the loop."""
        for function in self.functions:
            c = function.config
            self.zygote.define(function.index, EnvSpec(
                handler=c.handler, env_vars=dict(c.env_vars), log_dir=str(self.logs_dir),
                function_name=c.name, memory_mb=c.memory_mb, init_delay_s=c.init_delay_s,
                exec_argv=c.exec_argv, concurrency=c.concurrency, **({"cwd": c.cwd} if c.cwd else {})))
        self.zygote.on_spawned = self._on_spawned
        self.zygote.on_spawn_failed = self._on_spawn_failed
        self.zygote.on_exited = self._on_exited
        self.zygote.on_lost = self._on_zygote_lost
        self.zygote.attach(self.loop)

    def request_stop(self, signum: int) -> None:
        """Ask the loop to stop (safe to call from a signal handler: it only records and wakes)."""
        if self.stop_requested is None:
            self.stop_requested = signum
        self.loop.wake()

    def hurry(self) -> None:
        """Make a shutdown in progress stop waiting for environments to exit gracefully (safe from a
        signal handler)."""
        self.hurried = True

    def now(self) -> float:
        """Seconds since t0."""
        return self.clock() - self.t0

    def shutdown(self, *, fast: bool = False, grace_s: float = STOP_GRACE_S) -> None:
        """End every environment (in-flight invocations are recorded as interrupted) and the zygote.

        Escalates: SIGCONT (a stopped process ignores SIGTERM until continued), SIGTERM, grace, SIGKILL;
        `fast` (a second Ctrl-C) goes straight to SIGKILL and waits less for exit reports.
        """
        self.shutting_down = True
        for stream in self._streams:
            stream.cancel()
        now = self.now()
        for function in self.functions:
            while function.queue:
                inv = function.queue.popleft()
                if not inv.status:
                    self._finish_request(None, inv, now, status="interrupted", kind="interrupted")
        for env in list(self._envs.values()):
            if env.current is not None:
                self._finish(env, env.current, now, status="interrupted", kind="interrupted")
            for inv in list((env.requests or {}).values()):
                if not inv.status:
                    self._finish_request(env, inv, now, status="interrupted", kind="interrupted")
            if env.state != ENDED:
                self._end(env, "run_end", signal_=None)
        fast = fast or self.hurried
        pending = [env for env in self._by_pid.values() if not env.exit]
        if not fast:
            for env in pending:
                signal_group(env.pid, signal.SIGCONT)
                signal_group(env.pid, signal.SIGTERM)
            self._wait_exits(pending, grace_s, interruptible=True)
        for env in pending:
            if not env.exit:
                signal_group(env.pid, signal.SIGKILL)
        self._wait_exits(pending, 1.0 if fast else 5.0)
        for env in pending:
            if not env.exit:  # never reported: still say how it ended, as far as we know
                self._exited(env, "unknown")
        self.zygote.close()

    def _wait_exits(self, envs: list[Environment], seconds: float, interruptible: bool = False) -> None:
        deadline = time.monotonic() + seconds
        while any(not env.exit for env in envs) and time.monotonic() < deadline and self.zygote.sock is not None:
            if interruptible and self.hurried:
                return
            self.loop.poll_io(min(0.05, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------------------------------------
    # driving the loop

    def provision(self, timeout_s: float | None = None) -> None:
        """Initialise every function's provisioned environments and every service's instances before
        load starts; wait until they are ready."""
        envs = [self._spawn(function, provisioned=True)
                for function in self.functions if not function.service for _ in range(function.config.provisioned)]
        envs += [self._spawn(function, provisioned=True)
                 for function in self.functions if function.service for _ in range(function.config.instances)]
        limit = max((f.config.init_limit_s for f in self.functions), default=10.0) if timeout_s is None else timeout_s
        deadline = self.clock() + limit + 5
        while any(env.state == INITIALISING for env in envs) and self.clock() < deadline:
            if self.stop_requested is not None or self.fatal_error is not None:
                break
            self.loop.run_once(until=deadline)
        if self.fatal_error is not None:
            raise self.fatal_error

    def measure_baseline(self, function: str, invocations: int = 2) -> dict[str, Any]:
        """Before load, with nothing else running: start one environment of `function`, invoke it
        `invocations` times, end it, and return its `init_ms` and `duration_ms` (each invocation's), or
        an `error`. Its environment and invocations are marked `probe` (writers and counters skip them)."""
        f = self.by_name[function]
        c = f.config
        env = self._spawn(f, provisioned=False, probe=True)
        durations: list[float] = []
        error = ""
        for i in range(invocations):
            inv = Invocation(0, f"{self._request_prefix}{0xFFFFFFF00000 + i:012x}", f.name, self.now(), probe=True)
            if i == 0:
                inv.cold = True
                self._invoke(env, inv, self.now(), thaw=False)
            else:
                taken = f.idle.pop()
                if taken is not env:
                    error = "the baseline environment ended"
                    break
                self._invoke(env, inv, self.now(), thaw=True)
            deadline = self.clock() + c.init_limit_s + c.timeout_s + 5
            while not inv.status and self.clock() < deadline and self.fatal_error is None \
                    and self.stop_requested is None:
                self.loop.run_once(until=deadline)
            if inv.status != "ok":
                error = f"{inv.status or 'no answer'}: {inv.message}"[:300]
                break
            durations.append(round(inv.duration_ms or 0.0, 3))
            # A Runtime API runtime is idle only once it asks for its next invocation, a moment after
            # it posted this one's response.
            while env.state == BUSY and self.clock() < deadline and self.fatal_error is None \
                    and self.stop_requested is None:
                self.loop.run_once(until=deadline)
        init_ms = env.init_ms
        if env.state != ENDED:
            self._end(env, "baseline", signal_=signal.SIGKILL)
        if self.fatal_error is not None:
            raise self.fatal_error
        result: dict[str, Any] = {"init_ms": round(init_ms, 3) if init_ms is not None else None,
                                  "duration_ms": durations, "pid": env.pid}
        if error:
            result["error"] = error
        return result

    def add_arrivals(self, function: str, arrivals: Iterator[float], load_start: float) -> None:
        """Schedule `arrivals` (offsets in seconds from `load_start`, itself seconds since t0) for a
        function. Each arrival is dispatched by the loop when it falls due (open loop)."""
        stream = _ArrivalStream(self, self.by_name[function], arrivals, load_start)
        self._streams.append(stream)
        if not stream.done:
            self._open_streams += 1
        stream.schedule()

    def arrivals_pending(self) -> bool:
        """Whether any scheduled arrival has not been dispatched yet."""
        return self._open_streams > 0

    def in_flight(self) -> int:
        """Invocations running now: each holds one environment (busy or initialising), or is a service's
        request not answered yet (running in one of its threads, or queued for one)."""
        return self.counts[BUSY] + self.counts[INITIALISING] + self._open_requests

    def run(self, *, on_tick: Callable[[], None] | None = None, tick_s: float = 0.5,
            until_s: float | None = None) -> None:
        """Run the loop until every arrival has been dispatched and has finished (or, with `until_s`,
        until that many seconds since t0), a stop is requested, or the run cannot go on."""
        ticker = _Ticker(self.loop, on_tick, tick_s)
        try:
            counts = self.counts
            while self.stop_requested is None and self.fatal_error is None:
                if until_s is None:
                    if (not self._open_streams and not counts[BUSY] and not counts[INITIALISING]
                            and not self._open_requests):
                        break
                elif self.now() >= until_s:
                    break
                self.loop.run_once(until=None if until_s is None else self.t0 + until_s)
        finally:
            ticker.cancel()
        if self.fatal_error is not None:
            raise self.fatal_error

    def enforce_memory(self) -> int:
        """End Runtime API environments whose resident memory passed their function's memory size (a
        Python environment watches its own; a program of another language cannot be asked to). Returns
        how many were ended; each ends with status `out_of_memory` once its exit is reported."""
        page = os.sysconf("SC_PAGE_SIZE")
        ended = 0
        for env in list(self._envs.values()):
            limit = env.function.config.memory_mb
            if env.endpoint is None or not limit or env.pid is None or env.state not in (INITIALISING, BUSY):
                continue
            try:
                with open(f"/proc/{env.pid}/statm") as fh:
                    rss = int(fh.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
            if rss > limit * 1024 * 1024:
                env.oom = True
                signal_group(env.pid, signal.SIGKILL)
                ended += 1
        return ended

    def reap_vanished(self, released: Callable[[int], bool]) -> int:
        """End the vanished environments for which `released(env_id)` says the server no longer shows a
        connection: from then on they are only memory. Returns how many were signalled."""
        count = 0
        for env in list(self._vanished.values()):
            if env.pid is not None and released(env.id):
                signal_group(env.pid, signal.SIGKILL)
                del self._vanished[env.id]
                count += 1
        return count

    # ------------------------------------------------------------------------------------------------
    # arrivals, routing, throttling

    def _arrive(self, function: Function, scheduled: float) -> None:
        seq = next(self._inv_seq)
        inv = Invocation(seq, f"{self._request_prefix}{seq:012x}", function.name, scheduled)
        now = self.now()
        if function.service:
            self._arrive_at_service(function, inv, now)
            return
        policy = function.policy
        reason = policy.admit()
        if not reason:
            env = function.provisioned_idle.pop() or function.idle.pop()
            if env is not None:
                self._invoke(env, inv, now, thaw=True)
                return
            reason = policy.admit_new_environment()
            if not reason:
                env = self._spawn(function, provisioned=False)
                inv.cold = True
                self._invoke(env, inv, now, thaw=False)
                return
        inv.start = inv.end = now
        inv.status, inv.throttle_reason, inv.error_kind = "throttled", reason, "throttled"
        self.events.throttle.fire(invocation=inv)
        self.events.invocation_end.fire(invocation=inv)

    def _invoke(self, env: Environment, inv: Invocation, now: float, *, thaw: bool) -> None:
        inv.start = now
        inv.env_id, inv.env_pid = env.id, env.pid
        env.current = inv
        env.invocations += 1
        self.events.invocation_start.fire(invocation=inv, env=env)
        if thaw:
            self._set_state(env, BUSY)
            signal_group(env.pid, signal.SIGCONT)  # type: ignore[arg-type]  # frozen means it has a pid
            self.events.env_thaw.fire(env=env)
        if env.state == BUSY:
            self._send_invoke(env, inv)
        # A cold environment gets the invocation once its init phase reports ready.

    def _send_invoke(self, env: Environment, inv: Invocation) -> None:
        config = env.function.config
        env.sent_at = self.clock()
        if env.endpoint is not None:
            from .runtime_api import deadline_ms

            env.endpoint.deliver(inv.request_id, json.dumps({"seq": inv.seq}).encode(),
                                 deadline_ms(config.timeout_s))
        else:
            try:
                assert env.sock is not None
                env.sock.send(encode_invoke(inv.request_id, {"seq": inv.seq}, config.timeout_s * 1000))
            except (OSError, AssertionError):
                return  # it died; EOF or the zygote's report will finish the invocation as a crash
        env.function.timeouts.add(self.clock() + config.timeout_s, env, inv.seq)

    # ------------------------------------------------------------------------------------------------
    # services: long-lived instances serving requests concurrently (the EC2 side)

    def _arrive_at_service(self, function: Function, inv: Invocation, now: float) -> None:
        self._open_requests += 1
        # A request waits at most the timeout, queued or running, as behind a load balancer.
        inv.timer = self.loop.call_at(self.clock() + function.config.timeout_s, self._request_timeout, inv)
        env = self._free_instance(function)
        if env is None:
            function.queue.append(inv)
        else:
            self._send_request(env, inv, now)

    @staticmethod
    def _free_instance(function: Function) -> Environment | None:
        best = None
        for env in function.instances:
            if env.state == SERVING and len(env.requests or ()) < function.config.concurrency:
                if best is None or len(env.requests or ()) < len(best.requests or ()):
                    best = env
        return best

    def _send_request(self, env: Environment, inv: Invocation, now: float) -> None:
        inv.start = now
        inv.env_id, inv.env_pid = env.id, env.pid
        assert env.requests is not None and env.sock is not None
        env.requests[inv.request_id] = inv
        env.invocations += 1
        self.events.invocation_start.fire(invocation=inv, env=env)
        try:
            env.sock.send(encode_invoke(inv.request_id, {"seq": inv.seq}, env.function.config.timeout_s * 1000))
        except OSError:
            pass  # it died; its EOF fails what it was serving

    def _serve_queue(self, function: Function) -> None:
        while function.queue:
            env = self._free_instance(function)
            if env is None:
                return
            inv = function.queue.popleft()
            if not inv.status:  # a request that timed out while queued is finished already
                self._send_request(env, inv, self.now())

    def _request_timeout(self, inv: Invocation) -> None:
        inv.timer = None
        if inv.status:
            return
        env = self._envs.get(inv.env_id) if inv.env_id is not None else None
        where = "queued for a free server thread" if env is None else "running"
        self._finish_request(env, inv, self.now(), status="timeout", kind="timeout",
                             message=f"Request timed out after {self.by_name[inv.function].config.timeout_s:g} "
                                     f"seconds ({where})")

    def _finish_request(self, env: Environment | None, inv: Invocation, now: float, *, status: str,
                        kind: str = "", type_name: str = "", message: str = "") -> None:
        if inv.timer is not None:
            inv.timer.cancel()
            inv.timer = None
        self._open_requests -= 1
        if not inv.start:
            inv.start = now
        inv.end = now
        inv.status, inv.error_kind, inv.error_type, inv.message = status, kind, type_name, message
        if env is not None:
            if status == "ok":
                env.ok += 1
            else:
                env.errors += 1
        self.events.invocation_end.fire(invocation=inv)

    def _on_service_result(self, env: Environment, message: tuple) -> None:
        _, request_id, status, error_kind, error_type, text, duration_ms = message
        assert env.requests is not None
        inv = env.requests.pop(request_id, None)
        if inv is None:
            self._protocol_error(env, f"result for request {request_id!r}, which it was not serving")
            return
        if not inv.status:  # not timed out meanwhile
            inv.duration_ms = duration_ms
            self._finish_request(env, inv, self.now(), status=status, kind=error_kind, type_name=error_type,
                                 message=text)
        self._serve_queue(env.function)

    def _service_instance_lost(self, env: Environment, status: str, kind: str, message: str) -> None:
        """A service instance ended under its requests: fail them, and start a replacement (an
        application server's supervisor would restart it)."""
        now = self.now()
        for inv in list((env.requests or {}).values()):
            if not inv.status:
                self._finish_request(env, inv, now, status=status, kind=kind, message=message)
        if env.requests is not None:
            env.requests.clear()
        function = env.function
        if env in function.instances:
            function.instances.remove(env)
        if not self.shutting_down and self.fatal_error is None:
            self._spawn(function, provisioned=True)

    # ------------------------------------------------------------------------------------------------
    # environments

    def _spawn(self, function: Function, *, provisioned: bool, probe: bool = False) -> Environment:
        env_id = -1 - function.index if probe else next(self._env_ids)
        env = Environment(id=env_id, function=function, provisioned=provisioned, created=self.now(), probe=probe)
        self._envs[env.id] = env
        extra_env: dict[str, str] = {}
        if function.config.exec_argv:
            from .runtime_api import RuntimeEndpoint, function_arn

            env.endpoint = RuntimeEndpoint(self.loop, _RuntimeListener(self, env),
                                           function_arn=function_arn(function.name))
            extra_env["AWS_LAMBDA_RUNTIME_API"] = env.endpoint.listen()
        spare = self.zygote.spawn(env.id, function.index, extra_env)
        self._count(env, INITIALISING, 1)
        if function.service:
            env.requests = {}
            function.instances.append(env)
        else:
            function.policy.started()
        live = self.counts[INITIALISING] + self.counts[BUSY] + self.counts[FROZEN]
        self.peak_environments = max(self.peak_environments, live)
        function.peak_environments = max(function.peak_environments, function.live())
        c = function.config
        now = self.clock()
        timers = [self.loop.call_at(now + c.init_limit_s, self._init_deadline, env)]
        if not function.service:  # a server process is neither recycled nor reclaimed
            timers.append(self.loop.call_at(now + c.env_max_lifetime_s, self._lifetime_reached, env))
        if not provisioned:
            # One idle timer per environment, re-armed from its last use when it fires early: a timer
            # per freeze would pile up (rps × TTL entries) for environments that are reused anyway.
            timers.append(self.loop.call_at(now + c.env_idle_ttl_s, self._idle_check, env))
        env.timers = tuple(timers)
        self.events.env_spawn.fire(env=env)
        if spare is not None:
            self._on_spawned(env.id, *spare)  # a spare the zygote forked ahead: started already
        return env

    def _on_spawned(self, env_id: int, pid: int, sock: socket.socket) -> None:
        env = self._envs.get(env_id)
        if env is None or env.state == ENDED:
            # Ended before the zygote answered (init limit, shutdown): the process must not live on.
            signal_group(pid, signal.SIGKILL)
            sock.close()
            if env is not None:
                env.pid = pid
                self._by_pid[pid] = env
            return
        env.pid = pid
        env.spawned_at = self.now()
        self._by_pid[pid] = env
        if env.current is not None:
            env.current.env_pid = pid
        if env.function.config.exec_argv:
            sock.close()  # an exec'd runtime speaks the Runtime API, not this channel
        else:
            sock.setblocking(False)
            env.sock = sock
            self.loop.add_reader(sock, lambda: self._on_env_readable(env))
        self.events.env_started.fire(env=env)

    def _on_spawn_failed(self, env_id: int, message: str) -> None:
        env = self._envs.get(env_id)
        if env is None or env.state == ENDED:
            return
        if env.current is not None:
            self._finish(env, env.current, self.now(), status="init_error", kind="init_error",
                         message=f"could not start an environment: {message}")
        self._end(env, "spawn_failed", signal_=None)
        self._forget(env)

    def _on_zygote_lost(self, reason: str) -> None:
        if self.fatal_error is None:
            self.fatal_error = ZygoteGone(reason)

    def _on_env_readable(self, env: Environment) -> None:
        # One message per wake-up: epoll is level-triggered, so a second message waiting calls again, and
        # the usual case (one reply) costs no extra receive that would only fail with EAGAIN.
        if env.sock is None:
            return
        try:
            message = read_report(env.sock)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            self._protocol_error(env, str(exc))
            return
        except OSError:
            message = None
        if message is None:
            self._died(env)
            return
        self._on_env_message(env, message)

    def _on_env_message(self, env: Environment, message: tuple) -> None:
        kind = message[0]
        if kind == "result" and env.requests is not None:
            if env.state != SERVING:
                self._protocol_error(env, "a result before the instance was ready")
            else:
                self._on_service_result(env, message)
        elif kind == "result":
            _, request_id, status, error_kind, error_type, text, duration_ms = message
            self._result(env, request_id, status, error_kind, error_type, text, duration_ms)
        elif kind == "ready":
            self._ready(env, message[1])
        elif kind == "init_error":
            _, fatal, _, error_type, text = message
            self._init_failed(env, fatal, error_type, text)
        elif kind == "oom":
            env.oom = True
        elif kind == "absorbed":
            env.absorbed += 1
            inv = env.current
            if inv is not None:
                inv.absorbed += 1
                inv.cause = inv.cause or message[1]

    # What an environment reports, whichever channel it reports on (`protocol.py` for Python, the Runtime
    # API for any other language).

    def _result(self, env: Environment, request_id: str, status: str, error_kind: str, error_type: str, text: str,
                duration_ms: float) -> None:
        inv = env.current
        if inv is None or inv.request_id != request_id or env.state != BUSY:
            if env.state == BUSY and inv is not None:
                self._protocol_error(env, f"result for request {request_id!r}, expected {inv.request_id!r}")
            return  # a late reply to an invocation already failed by timeout
        inv.duration_ms = duration_ms
        config = env.function.config
        now = self.now()
        if duration_ms > config.timeout_s * 1000:
            # Replied, but only after the function timeout: Lambda would have cut it off.
            self._finish(env, inv, now, status="timeout", kind="timeout", message=env.function.timeout_message)
            self._end(env, "timeout", signal_=signal.SIGKILL)
            return
        self._finish(env, inv, now, status=status, kind=error_kind, type_name=error_type, message=text)
        if env.recycle:
            self._end(env, "max_lifetime", signal_=signal.SIGKILL)
        elif env.endpoint is None or env.endpoint.next_pending:
            self._freeze(env)
        # A Runtime API runtime is frozen once it asks for its next invocation (`_next_requested`).

    def _ready(self, env: Environment, init_ms: float) -> None:
        if env.state != INITIALISING:
            self._protocol_error(env, "ready reported twice")
            return
        env.ready_at, env.init_ms = self.now(), init_ms
        if env.function.service:
            self._set_state(env, SERVING)
            self.events.env_ready.fire(env=env)
            self._serve_queue(env.function)
            return
        self._set_state(env, BUSY)
        self.events.env_ready.fire(env=env)
        if env.current is not None:
            env.current.init_ms = env.init_ms
            self._send_invoke(env, env.current)
        else:
            self._freeze(env)

    def _init_failed(self, env: Environment, fatal: bool, error_type: str, text: str) -> None:
        if env.state != INITIALISING:
            self._protocol_error(env, "init error reported after init")
            return
        if fatal and self.fatal_error is None:
            self.fatal_error = HandlerLoadError(
                f"--handler {env.function.config.handler}: the handler cannot be loaded in an environment "
                f"({text}); see {self.logs_dir / f'env-{env.id:05d}.log'}")
        if env.current is not None:
            self._finish(env, env.current, self.now(), status="init_error", kind="init_error",
                         type_name=error_type, message=text)
        self._end(env, "init_error", signal_=None if env.endpoint is None else signal.SIGKILL)
        if env.requests is not None:
            self._service_instance_lost(env, "init_error", "init_error", text)

    def _next_requested(self, env: Environment) -> None:
        """A Runtime API runtime asked for its next invocation: its init is over (the first time), or it
        is done with the last one and idle, and Lambda freezes it while that request is pending."""
        if env.state == INITIALISING:
            started = env.spawned_at if env.spawned_at is not None else env.created
            self._ready(env, (self.now() - started) * 1000)
        elif env.state == BUSY and env.current is None:
            if env.recycle:
                self._end(env, "max_lifetime", signal_=signal.SIGKILL)
            else:
                self._freeze(env)

    def _protocol_error(self, env: Environment, reason: str) -> None:
        """The environment broke the channel's contract: fail what it was doing and discard it."""
        if env.requests is not None:
            self._end(env, "runtime_error", signal_=signal.SIGKILL)
            self._service_instance_lost(env, "crash", "runtime_error",
                                        f"the instance sent an invalid message to the supervisor: {reason}")
            return
        if env.current is not None:
            self._finish(env, env.current, self.now(), status="crash", kind="runtime_error",
                         type_name="Runtime.InvalidMessage",
                         message=f"the environment sent an invalid message to the supervisor: {reason}")
        self._end(env, "runtime_error", signal_=signal.SIGKILL)

    def _freeze(self, env: Environment) -> None:
        signal_group(env.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        self._set_state(env, FROZEN)
        env.last_used = self.now()
        env.use_seq = next(self._use_seq)
        (env.function.provisioned_idle if env.provisioned else env.function.idle).push(env)
        self.events.env_freeze.fire(env=env)

    def _finish(self, env: Environment, inv: Invocation, now: float, *, status: str, kind: str = "",
                type_name: str = "", message: str = "") -> None:
        inv.end = now
        inv.status, inv.error_kind, inv.error_type, inv.message = status, kind, type_name, message
        if status == "ok" or inv.cause == kind:
            inv.cause = ""  # absorbed errors that did not make it fail (or say no more than its kind)
        env.current = None
        if status == "ok":
            env.ok += 1
        else:
            env.errors += 1
        self.events.invocation_end.fire(invocation=inv)

    def _died(self, env: Environment) -> None:
        """The environment's process ended on its own (crash, out of memory, exit in init)."""
        if env.state in (ENDED, VANISHED):
            self._close_socket(env)
            return
        self._drain(env)  # an "oom" or a result may be waiting behind the EOF's cause
        if env.state == ENDED:
            return
        if env.requests is not None:
            kind = "out_of_memory" if env.oom else "crash"
            self._end(env, kind, signal_=None)
            self._service_instance_lost(env, kind, kind, "service instance process exited during the request")
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

    def _drain(self, env: Environment) -> None:
        # Read whatever the environment sent before it went away, without treating EOF as death again.
        while env.sock is not None:
            try:
                message = read_report(env.sock)
            except (BlockingIOError, InterruptedError, OSError):
                return
            except ProtocolError as exc:
                self._protocol_error(env, str(exc))
                return
            if message is None:
                return
            self._on_env_message(env, message)

    def _end(self, env: Environment, reason: str, *, signal_: int | None) -> None:
        """Take `env` out of service. `signal_` is sent to its process group (None: it is dying anyway)."""
        if env.state == ENDED:
            return
        function = env.function
        if env.state == FROZEN:
            (function.provisioned_idle if env.provisioned else function.idle).discard(env)
        if env.state in (INITIALISING, BUSY) and not function.service:
            function.policy.stopped()
        if env.state in self.counts:
            self._count(env, env.state, -1)
        env.state = ENDED
        for timer in env.timers:
            timer.cancel()
        env.timers = ()
        # A vanished environment left the function when it vanished; the run's end only kills it.
        env.end_reason = env.end_reason or reason
        env.ended_at = env.ended_at if env.ended_at is not None else self.now()
        self._close_socket(env)
        if signal_ is not None and env.pid is not None:
            signal_group(env.pid, signal_)
        self.events.env_reclaim.fire(env=env)

    def _vanish(self, env: Environment, reason: str) -> None:
        """Reclaim without closing anything: the process stays frozen and its connections stay open,
        as when a microVM disappears without sending FIN."""
        function = env.function
        function.idle.discard(env)
        self._set_state(env, VANISHED)
        for timer in env.timers:
            timer.cancel()
        env.timers = ()
        env.vanished = True
        env.end_reason = reason
        env.ended_at = self.now()
        self._close_socket(env)
        self._vanished[env.id] = env
        self.events.env_vanish.fire(env=env)

    def _set_state(self, env: Environment, state: str) -> None:
        # Twice per invocation (thaw, freeze): the counting is written out rather than called.
        function = env.function
        old = env.state
        counts = function.counts
        counts[old] -= 1
        counts[state] += 1
        if function.service:
            env.state = state
            return
        counts = self.counts
        counts[old] -= 1
        counts[state] += 1
        running_before = old in _RUNNING
        running_after = state in _RUNNING
        if running_before and not running_after:
            function.policy.stopped()
        elif running_after and not running_before:
            function.policy.started()
        env.state = state

    def _count(self, env: Environment, state: str, delta: int) -> None:
        # The run's counts are of Lambda environments; a service's instances count only for the service.
        env.function.counts[state] += delta
        if not env.function.service:
            self.counts[state] += delta

    def _close_socket(self, env: Environment) -> None:
        if env.endpoint is not None:
            env.endpoint.close()
        if env.sock is not None:
            self.loop.remove_reader(env.sock)
            env.sock.close()
            env.sock = None

    def _on_exited(self, pid: int, wait_status: int) -> None:
        env = self._by_pid.get(pid)
        if env is not None:
            self._exited(env, describe_wait_status(wait_status))

    def _exited(self, env: Environment, how: str) -> None:
        env.exit = how
        env.exited_at = self.now()
        if env.state == VANISHED:
            self._count(env, VANISHED, -1)
            env.state = ENDED
        elif env.state != ENDED:
            self._died(env)
        self._forget(env)

    def _forget(self, env: Environment) -> None:
        self._envs.pop(env.id, None)
        self._vanished.pop(env.id, None)
        if env.pid is not None:
            self._by_pid.pop(env.pid, None)
        self.events.env_end.fire(env=env)

    # ------------------------------------------------------------------------------------------------
    # deadlines: every one is kept here, never by the environments

    def _invocation_timeout(self, env: Environment, seq: int) -> None:
        inv = env.current
        if inv is None or inv.seq != seq or env.state != BUSY:
            return  # finished in time (or the environment went another way)
        # The loop may have run late rather than the invocation: take a reply already waiting (the
        # handler's own duration, checked when the result is read, still decides whether it timed out).
        self._drain(env)
        if env.current is not inv:
            return
        self._finish(env, inv, self.now(), status="timeout", kind="timeout", message=env.function.timeout_message)
        self._end(env, "timeout", signal_=signal.SIGKILL)

    def _init_deadline(self, env: Environment) -> None:
        if env.state != INITIALISING:
            return
        self._drain(env)
        if env.state != INITIALISING:
            return
        if env.current is not None:
            self._finish(env, env.current, self.now(), status="timeout", kind="timeout",
                         message=env.function.init_timeout_message)
        self._end(env, "init_timeout", signal_=signal.SIGKILL)
        if env.requests is not None:
            self._service_instance_lost(env, "timeout", "timeout", env.function.init_timeout_message)
        if env.pid is None:
            self._forget(env)  # the zygote never answered; if it does, the process is killed at once

    def _idle_check(self, env: Environment) -> None:
        if env.state in (ENDED, VANISHED):
            return
        ttl = env.function.config.env_idle_ttl_s
        idle_for = self.now() - env.last_used if env.state == FROZEN else 0.0
        if idle_for >= ttl:
            self._reclaim(env, "idle")
        else:
            timer = self.loop.call_later(ttl - idle_for, self._idle_check, env)
            env.timers = tuple(t for t in env.timers if not t.cancelled) + (timer,)

    def _lifetime_reached(self, env: Environment) -> None:
        if env.state == FROZEN:
            self._reclaim(env, "max_lifetime")
        elif env.state in (INITIALISING, BUSY):
            env.recycle = True

    def _reclaim(self, env: Environment, reason: str) -> None:
        if env.function.config.reclaim == "vanish":
            self._vanish(env, reason)
        else:
            # SIGKILL: the kernel closes the sockets, so the database sees a clean disconnect.
            self._end(env, reason, signal_=signal.SIGKILL)

    # ------------------------------------------------------------------------------------------------
    # what displays and the sampler's view read

    def live_environments(self) -> list[Environment]:
        """Environments not yet reported as exited (vanished ones included)."""
        return list(self._envs.values())


class _ArrivalStream:
    """One function's arrivals: a single timer that dispatches every arrival due (a bounded batch at a
    time, so the loop keeps reading replies and seeing stop requests when it falls behind) and re-arms
    itself for the next one."""

    def __init__(self, supervisor: Supervisor, function: Function, arrivals: Iterator[float], load_start: float):
        self.supervisor = supervisor
        self.function = function
        self.arrivals = arrivals
        self.load_start = load_start
        self.next_at = next(arrivals, None)
        self.timer: Timer | None = None
        self.closed = self.next_at is None

    @property
    def done(self) -> bool:
        return self.next_at is None

    def schedule(self) -> None:
        if self.next_at is not None:
            sup = self.supervisor
            self.timer = sup.loop.call_at(sup.t0 + self.load_start + self.next_at, self._due)
        elif not self.closed:
            self.closed = True
            self.supervisor._open_streams -= 1

    def _due(self) -> None:
        sup = self.supervisor
        start = self.load_start
        now = sup.now()
        deadline = now + ARRIVAL_BATCH_S
        for i in range(1, ARRIVAL_BATCH + 1):
            if self.next_at is None or start + self.next_at > now:
                break
            sup._arrive(self.function, start + self.next_at)
            self.next_at = next(self.arrivals, None)
            if not i % 16:  # the clock is read once per arrival at most in a backlog, once per 16 otherwise
                now = sup.now()
                if now > deadline:
                    break
            elif self.next_at is not None and start + self.next_at > now:
                now = sup.now()  # the next arrival may have fallen due while this one was dispatched
        self.schedule()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.next_at = None
        self.schedule()  # counts the stream closed


class _Deadlines:
    """One function's invocation timeouts. Every invocation of a function has the same timeout, so the
    deadlines come in the order the invocations were sent: a FIFO with a single loop timer for its head
    replaces a heap entry per invocation. Entries name the environment and the invocation's number, not
    the invocation, so a finished one is not kept alive; they are dropped when they fall due."""

    def __init__(self, loop: Loop, expired: Callable[[Environment, int], None]) -> None:
        self.loop = loop
        self.expired = expired
        self.entries: deque[tuple[float, Environment, int]] = deque()
        self.timer: Timer | None = None

    def add(self, deadline: float, env: Environment, seq: int) -> None:
        self.entries.append((deadline, env, seq))
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._due)

    def _due(self) -> None:
        self.timer = None
        entries = self.entries
        now = self.loop.time()
        while entries and entries[0][0] <= now:
            _, env, seq = entries.popleft()
            self.expired(env, seq)
        if entries:
            self.timer = self.loop.call_at(entries[0][0], self._due)


class _Ticker:
    """Calls `on_tick` every `tick_s` while the loop runs (the runner's flushes, display, reaping)."""

    def __init__(self, loop: Loop, on_tick: Callable[[], None] | None, tick_s: float) -> None:
        self.loop = loop
        self.on_tick = on_tick
        self.tick_s = tick_s
        self.timer = loop.call_later(tick_s, self._tick)

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick()
        self.timer = self.loop.call_later(self.tick_s, self._tick)

    def cancel(self) -> None:
        self.timer.cancel()


class _RuntimeListener:
    """Turns one environment's Runtime API requests into the supervisor's reports."""

    def __init__(self, supervisor: Supervisor, env: Environment) -> None:
        self.supervisor = supervisor
        self.env = env

    def on_next(self) -> None:
        self.supervisor._next_requested(self.env)

    def on_response(self, request_id: str, body: bytes) -> None:
        sup, env = self.supervisor, self.env
        sup._result(env, request_id, "ok", "", "", "", (sup.clock() - env.sent_at) * 1000)

    def on_error(self, request_id: str, error_type: str, body: bytes) -> None:
        from .runtime_api import error_summary

        sup, env = self.supervisor, self.env
        body_type, text = error_summary(body)
        type_name = body_type or error_type or "Error"
        kind = classify([type_name, error_type], text)
        sup._result(env, request_id, "handler_error", kind, type_name, f"{type_name}: {text}"[:2000],
                    (sup.clock() - env.sent_at) * 1000)

    def on_init_error(self, error_type: str, body: bytes) -> None:
        from .runtime_api import error_summary
        from .runtimes import LOAD_ERROR_TYPES

        body_type, text = error_summary(body)
        type_name = body_type or error_type or "Runtime.Unknown"
        fatal = error_type in LOAD_ERROR_TYPES or type_name in LOAD_ERROR_TYPES
        self.supervisor._init_failed(self.env, fatal, type_name, f"{type_name}: {text}"[:2000])

    def on_protocol_error(self, reason: str) -> None:
        if self.env.state not in (ENDED, VANISHED):
            self.supervisor._protocol_error(self.env, reason)


def describe_wait_status(status: int) -> str:
    """`exit 0`, `exit 1`, `SIGKILL`, ...: how a process ended, by signal name."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"
