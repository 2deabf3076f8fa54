"""The control plane's event loop: one epoll, one clock, one timer heap, the signals.

Everything the supervisor does happens in callbacks of this loop: a socket became readable (an
environment replied, the zygote reported a spawn or an exit, a runtime sent an HTTP request), or a timer
fell due (an arrival, an invocation timeout, an idle reclaim). Nothing here blocks except the one
`epoll.poll` in `run_once`, and that wait ends at the next timer.

Why not asyncio: this wait runs twice per invocation, and the raw epoll call with an fd → callback dict
costs a fraction of asyncio's Handle and selector bookkeeping (measured in BENCHMARKS.md §2: the
supervisor's CPU at 1000 req/s is mostly epoll_wait and the signals it sends).

The clock is injectable (`clock=`), so policy built on the loop's timers can be tested on a fake clock
(`FakeClock`) without processes: a `run_once` with nothing ready advances the fake clock to the next timer.
"""

from __future__ import annotations

import heapq
import itertools
import select
import socket
import time
from typing import Any, Callable

#: epoll's wait takes milliseconds; a timer due within this much is run now instead of after a 0 ms wait.
_TIMER_SLACK_S = 0.0002


class Timer:
    """A scheduled callback. `cancel()` is O(1): the entry stays in the heap and is skipped when due
    (lazy cancel), and it drops its callback so a cancelled timer keeps nothing alive."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple) -> None:
        self.when = when
        self.callback: Callable[..., Any] | None = callback
        self.args: tuple = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run this timer (a no-op once it has run)."""
        self.cancelled = True
        self.callback = None
        self.args = ()


class FakeClock:
    """A clock for tests: time moves only when told (or when a loop with nothing ready jumps to its
    next timer)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        self.t += seconds


class Loop:
    """A minimal event loop over epoll. Not thread-safe: use it from one thread only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._fake = isinstance(clock, FakeClock)
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], Any]] = {}
        self._writers: dict[int, Callable[[], Any]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._closed = False
        # A socketpair whose write end is given to signal.set_wakeup_fd (by the CLI), so a signal
        # interrupts the wait; reading it only drains it: the signal handler records what to do.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r, self._drain_wakeup)

    # -- time ------------------------------------------------------------------------------------------
    def time(self) -> float:
        """The loop's clock (monotonic seconds)."""
        return self.clock()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run `callback(*args)` at clock time `when` (or as soon after as the loop gets to it)."""
        timer = Timer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run `callback(*args)` `delay_s` seconds from now."""
        return self.call_at(self.clock() + delay_s, callback, *args)

    def next_timer(self) -> float | None:
        """When the earliest live timer is due (None: no timer)."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def pending_timers(self) -> int:
        """Timers in the heap, cancelled ones not yet dropped included (for memory checks)."""
        return len(self._timers)

    # -- I/O -------------------------------------------------------------------------------------------
    def add_reader(self, fd: Any, callback: Callable[[], Any]) -> None:
        """Call `callback()` whenever `fd` (an int or an object with fileno()) is readable."""
        self._register(_fileno(fd), callback, self._readers)

    def remove_reader(self, fd: Any) -> None:
        """Stop watching `fd` for reading (no-op if it was not watched)."""
        self._unregister(_fileno(fd), self._readers)

    def add_writer(self, fd: Any, callback: Callable[[], Any]) -> None:
        """Call `callback()` whenever `fd` is writable (remove it once the pending data is sent)."""
        self._register(_fileno(fd), callback, self._writers)

    def remove_writer(self, fd: Any) -> None:
        """Stop watching `fd` for writing (no-op if it was not watched)."""
        self._unregister(_fileno(fd), self._writers)

    def _mask(self, fd: int) -> int:
        return (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)

    def _register(self, fd: int, callback: Callable[[], Any], table: dict[int, Callable[[], Any]]) -> None:
        existed = fd in self._readers or fd in self._writers
        table[fd] = callback
        if existed:
            self._epoll.modify(fd, self._mask(fd))
        else:
            self._epoll.register(fd, self._mask(fd))

    def _unregister(self, fd: int, table: dict[int, Callable[[], Any]]) -> None:
        if table.pop(fd, None) is None:
            return
        mask = self._mask(fd)
        try:
            if mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed: the kernel dropped it from the epoll set

    def watching(self, fd: Any) -> bool:
        """Whether `fd` is watched for reading or writing."""
        fd = _fileno(fd)
        return fd in self._readers or fd in self._writers

    # -- running ---------------------------------------------------------------------------------------
    def run_timers(self) -> int:
        """Run the timers due now; returns how many ran. Timers added by these callbacks wait for the next
        call, even when already due, so a callback that re-arms itself (an arrival backlog) cannot keep
        the loop from its sockets."""
        ran = 0
        timers = self._timers
        newest = next(self._seq)  # timers added from here on have a larger sequence number
        now = self.clock() + _TIMER_SLACK_S
        while timers:
            when, seq, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            if when > now or seq > newest:
                break
            heapq.heappop(timers)
            callback, args = timer.callback, timer.args
            timer.cancel()  # ran: drop references
            assert callback is not None
            callback(*args)
            ran += 1
        return ran

    def poll_io(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` (0: do not wait) for I/O and run the ready callbacks; returns how many
        callbacks ran."""
        events = self._epoll.poll(max(0.0, timeout_s))
        ran = 0
        for fd, mask in events:
            # A callback earlier in this batch may have removed (and closed) this fd.
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                callback = self._readers.get(fd)
                if callback is not None:
                    callback()
                    ran += 1
            if mask & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                callback = self._writers.get(fd)
                if callback is not None:
                    callback()
                    ran += 1
        return ran

    def run_once(self, until: float | None = None) -> None:
        """Wait for I/O until the next timer (or `until`, or forever when neither; not at all when a timer
        is already due), run what became ready, then run the timers that are due. Replies are read before
        deadlines are judged, so a loop that ran late does not time out an invocation whose answer was
        already waiting.

        With a `FakeClock` nothing waits: when no I/O is ready the clock jumps to the next deadline.
        """
        deadline = self.next_timer()
        if until is not None:
            deadline = until if deadline is None else min(deadline, until)
        now = self.clock()
        timeout = -1.0 if deadline is None else max(0.0, deadline - now)
        if self._fake:
            ran = self.poll_io(0)
            if not ran and deadline is not None and deadline > now:
                self.clock.advance(deadline - now)  # type: ignore[attr-defined]
        else:
            self.poll_io(timeout)
        self.run_timers()

    # -- signals and shutdown --------------------------------------------------------------------------
    def wakeup_fd(self) -> int:
        """The file descriptor to give `signal.set_wakeup_fd`, so a signal interrupts the wait."""
        return self._wake_w.fileno()

    def wake(self) -> None:
        """Interrupt a wait in progress (safe from another thread or a signal handler)."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        """Release the epoll fd and the wake-up socketpair. Idempotent; timers are dropped."""
        if self._closed:
            return
        self._closed = True
        self._timers.clear()
        self._readers.clear()
        self._writers.clear()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else fd.fileno()
