"""Lambda's scaling policy, apart from any process: which idle environment takes an invocation, how
fast a function may add environments, and when an invocation is throttled.

Everything here is pure bookkeeping over a clock, so it is tested on a fake clock without processes
(tests/test_policy.py); the supervisor supplies the mechanism (forking, signalling, sockets).

- `IdlePool`: idle (frozen) environments in routing order (newest, oldest, mru, lru, random).
- `ScalingTokens`: the per-function scaling rate, a token bucket refilled continuously.
- `Account`: the account's concurrency limit shared by every function, with reserved concurrency carved
  out of it; `FunctionPolicy`: one function's share of that (its in-flight count, reserved limit,
  tokens), and the throttle decision with its reason.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any, Callable, Iterable

from .errors import UsageError

#: Throttle reasons, with the exception Lambda returns for each (HTTP 429).
THROTTLE_REASONS = {
    "account_concurrency": "TooManyRequestsException (ConcurrentInvocationLimitExceeded)",
    "reserved_concurrency": "TooManyRequestsException (ReservedFunctionConcurrentInvocationLimitExceeded)",
    "scale_rate": "TooManyRequestsException (Rate Exceeded: scaling rate)",
}

#: Concurrency Lambda always leaves unreserved in an account (reservations may not take it).
UNRESERVED_MINIMUM = 100

ROUTING = ("newest", "oldest", "mru", "lru", "random")


class IdlePool:
    """Idle environments, ordered by the routing strategy.

    One heap serves every strategy by its key: newest/oldest by creation order (`env.id`), mru/lru by
    last use (`env.use_seq`), random by a random draw. Removal is lazy: an entry counts only while its
    environment still carries the same idle token (`env.idle_token`) and is `idle_state`. Stale entries
    are dropped when they reach the top, and the heap is rebuilt when they outnumber live ones, so it
    stays proportional to the idle environments, not to the run's history.
    """

    def __init__(self, routing: str, rng: random.Random, idle_state: Any = "frozen") -> None:
        if routing not in ROUTING:
            raise ValueError(routing)
        self.routing = routing
        self.idle_state = idle_state
        self._key: Callable[[Any], float] = {
            "newest": lambda env: -env.id,
            "oldest": lambda env: env.id,
            "mru": lambda env: -env.use_seq,
            "lru": lambda env: env.use_seq,
            "random": lambda env: rng.random(),
        }[routing]
        self._heap: list[tuple[float, int, int, Any]] = []
        self._count = 0
        self._tiebreak = itertools.count()

    def push(self, env: Any) -> None:
        """`env` became idle."""
        env.idle_token += 1
        heapq.heappush(self._heap, (self._key(env), next(self._tiebreak), env.idle_token, env))
        self._count += 1

    def discard(self, env: Any) -> None:
        """Forget `env` (it is being reclaimed while idle)."""
        env.idle_token += 1
        self._count -= 1
        if len(self._heap) > 2 * self._count + 64:
            self._compact()

    def pop(self) -> Any | None:
        """The idle environment routing picks, taken out of the pool; None when none is idle."""
        while self._heap:
            _, _, token, env = heapq.heappop(self._heap)
            if token == env.idle_token and env.state == self.idle_state:
                env.idle_token += 1
                self._count -= 1
                return env
        return None

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap
                      if entry[2] == entry[3].idle_token and entry[3].state == self.idle_state]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return self._count

    def heap_size(self) -> int:
        """Entries held, stale ones included (for memory checks)."""
        return len(self._heap)


class ScalingTokens:
    """A token bucket: at most `count` new environments per `window_s`, refilled continuously, full at
    the start (Lambda's per-function scaling rate: 1000 environments per 10 s)."""

    def __init__(self, count: int, window_s: float, clock: Callable[[], float]) -> None:
        self.count = count
        self.window_s = window_s
        self.clock = clock
        self._tokens = float(count)
        self._at = clock()

    def available(self) -> float:
        """Tokens in the bucket now."""
        now = self.clock()
        self._tokens = min(float(self.count), self._tokens + (now - self._at) * self.count / self.window_s)
        self._at = now
        return self._tokens

    def take(self) -> bool:
        """Take one token if there is one."""
        if self.available() < 1.0:
            return False
        self._tokens -= 1.0
        return True


class FunctionPolicy:
    """One function's concurrency bookkeeping: invocations in flight (each holds an environment, busy
    or initialising), its reserved concurrency, its scaling tokens."""

    def __init__(self, name: str, account: "Account", *, reserved: int | None,
                 scale_rate: tuple[int, float], clock: Callable[[], float]) -> None:
        self.name = name
        self.account = account
        self.reserved = reserved
        self.tokens = ScalingTokens(scale_rate[0], scale_rate[1], clock)
        self.in_flight = 0

    def admit(self) -> str:
        """"" when one more invocation may run now, else the throttle reason."""
        if self.reserved is not None:
            return "reserved_concurrency" if self.in_flight >= self.reserved else ""
        if self.account.unreserved_in_flight >= self.account.unreserved_limit:
            return "account_concurrency"
        return ""

    def admit_new_environment(self) -> str:
        """Like `admit`, for an invocation that needs a new environment: also takes a scaling token."""
        reason = self.admit()
        if reason:
            return reason
        return "" if self.tokens.take() else "scale_rate"

    def started(self) -> None:
        """An invocation (or a provisioned environment's init) began to hold an environment."""
        self.in_flight += 1
        if self.reserved is None:
            self.account.unreserved_in_flight += 1

    def stopped(self) -> None:
        """It no longer does (the environment froze, ended or vanished)."""
        self.in_flight -= 1
        if self.reserved is None:
            self.account.unreserved_in_flight -= 1


class Account:
    """The account: one concurrency limit shared by every function. A function with reserved concurrency
    may use exactly that much, and nobody else may; the rest (at least `UNRESERVED_MINIMUM`, as Lambda
    requires) is shared by the functions without a reservation."""

    def __init__(self, concurrency_limit: int, clock: Callable[[], float]) -> None:
        self.concurrency_limit = concurrency_limit
        self.clock = clock
        self.functions: dict[str, FunctionPolicy] = {}
        self.unreserved_in_flight = 0
        #: Concurrency the functions without a reservation share (kept up to date by add_function: it
        #: is read for every invocation).
        self.unreserved_limit = concurrency_limit

    @property
    def reserved_total(self) -> int:
        """Concurrency carved out by reservations."""
        return sum(f.reserved or 0 for f in self.functions.values())

    def add_function(self, name: str, *, reserved: int | None, scale_rate: tuple[int, float]) -> FunctionPolicy:
        """Register a function (call `check_reservations` once all are added)."""
        policy = FunctionPolicy(name, self, reserved=reserved, scale_rate=scale_rate, clock=self.clock)
        self.functions[name] = policy
        self.unreserved_limit = self.concurrency_limit - self.reserved_total
        return policy

    def in_flight(self) -> int:
        """Invocations in flight across the account."""
        return sum(f.in_flight for f in self.functions.values())


def check_reservations(concurrency_limit: int, reserved: Iterable[tuple[str, int | None]], *,
                       limit_flag: str = "--concurrency-limit", reserved_flag: str | None = None) -> None:
    """Raise UsageError when reservations take more than Lambda allows: the account keeps
    `UNRESERVED_MINIMUM` unreserved. The message names the functions and the sum (or `reserved_flag`,
    for the one function of a command line)."""
    taken = [(name, r) for name, r in reserved if r]
    total = sum(r for _, r in taken)
    if not taken:
        return
    allowed = concurrency_limit - UNRESERVED_MINIMUM
    if total > allowed:
        names = ", ".join(f"{name} {r}" for name, r in taken)
        what = f"{reserved_flag} {total}" if reserved_flag else f"reserved concurrency ({names}; sum {total})"
        raise UsageError(
            f"{what} exceeds what the account can reserve: "
            f"{limit_flag} {concurrency_limit} minus the {UNRESERVED_MINIMUM} Lambda keeps unreserved = "
            f"{max(allowed, 0)}; lower the reservations or raise {limit_flag} to at least "
            f"{total + UNRESERVED_MINIMUM}")
