"""The fleet's state, shared with the sampler process through memory: counters and a table of
environments (id, pid, function, state), written by the supervisor's event listeners and read by the
sampler without ever asking the loop anything.

The memory is an anonymous `memfd` mapping: the sampler gets the file descriptor at start (pass_fds), so
there is no name to leak in /dev/shm when a run is killed. Writes are single aligned stores, so a reader
sees each value whole; a sample may see an environment a moment before or after a transition, which is
the resolution of sampling anyway.

Each environment's state is written as it changes (one byte: two writes per invocation, thaw and freeze).
The counters are kept as Python integers by `FleetRecorder` and published every 100 ms (`publish`): a
write to shared memory per event would cost the loop more than everything else it does per invocation.

The table has `CAPACITY` slots indexed by `env_id % CAPACITY`, each carrying its environment's id, so a
reader can tell a slot's current owner. More than `CAPACITY` environments alive at once (vanished ones
included) is beyond what one machine can hold.

`RunStats` is the named view of the counters (see the README's counters table).
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Sequence

#: Cumulative counters (per function and for the whole run), then the environments by state now.
COUNTERS = ("invocations", "ok", "throttles", "errors", "cold_starts", "environments_started",
            "environments_ended", "initialising", "busy", "frozen", "vanished", "serving")
_C = {name: i for i, name in enumerate(COUNTERS)}
#: State codes in the table (0: empty or ended).
STATE_CODES = {"initialising": 1, "busy": 2, "frozen": 3, "vanished": 4, "serving": 5}
STATE_NAMES = {code: name for name, code in STATE_CODES.items()}
#: What the sampler publishes for the live display: time of the last sample (ms since t0), established
#: connections, max_connections, samples taken, samples missed.
DISPLAY = ("last_sample_ms", "connections", "max_connections", "samples", "samples_missed")
CAPACITY = 1 << 16


class FleetState:
    """The shared memory (see the module docstring). Create it in the supervisor's process with
    `FleetState(functions)`; open it in the sampler with `FleetState(functions, fd=...)`."""

    def __init__(self, functions: Sequence[str], fd: int | None = None, capacity: int = CAPACITY) -> None:
        self.functions = list(functions)
        self.capacity = capacity
        n_counters = (len(self.functions) + 1) * len(COUNTERS)
        sizes = [8 * n_counters, 8 * len(DISPLAY), 8 * capacity, 4 * capacity, 2 * capacity, capacity, capacity]
        size = sum(sizes)
        if fd is None:
            fd = os.memfd_create("lambdaemu-fleet", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self._mm = mmap.mmap(fd, size)
        view = memoryview(self._mm)
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        parts = [view[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
        self.counters = parts[0].cast("q")
        self.display = parts[1].cast("q")
        self.ids = parts[2].cast("q")
        self.pids = parts[3].cast("i")
        self.funcs = parts[4].cast("h")
        self.states = parts[5].cast("b")
        #: Set by the sampler for a vanished environment the server shows no connection of.
        self.released = parts[6].cast("b")
        self._views = parts
        self._width = len(COUNTERS)

    def close(self) -> None:
        """Unmap and close the descriptor (idempotent)."""
        if self._mm.closed:
            return
        for name in ("counters", "display", "ids", "pids", "funcs", "states", "released"):
            getattr(self, name).release()
        for part in self._views:
            part.release()
        self._mm.close()
        try:
            os.close(self.fd)
        except OSError:
            pass

    # -- writer side (the supervisor's listeners) ------------------------------------------------------
    def set_state(self, env_id: int, function: int, state: str | None, pid: int = 0) -> None:
        """Record an environment's state (None: ended)."""
        slot = env_id % self.capacity
        if self.ids[slot] != env_id:
            if not state:
                return  # not (any more) in the table
            self.ids[slot] = env_id
            self.funcs[slot] = function
            self.released[slot] = 0
            self.pids[slot] = pid
        elif pid:
            self.pids[slot] = pid
        self.states[slot] = STATE_CODES[state] if state else 0  # last: a reader never sees a new state with an old owner

    def set_pid(self, env_id: int, pid: int) -> None:
        """The environment's process id became known."""
        slot = env_id % self.capacity
        if self.ids[slot] == env_id:
            self.pids[slot] = pid

    def is_released(self, env_id: int) -> bool:
        """Whether the sampler found no server connection of this (vanished) environment."""
        slot = env_id % self.capacity
        return self.ids[slot] == env_id and bool(self.released[slot])

    # -- reader side ----------------------------------------------------------------------------------
    def counter(self, name: str, function: int | None = None) -> int:
        """A counter of the run, or of function index `function`."""
        base = 0 if function is None else (function + 1) * self._width
        return self.counters[base + _C[name]]

    def totals(self, function: int | None = None) -> dict[str, int]:
        """Every counter of the run (or of one function) by name."""
        base = 0 if function is None else (function + 1) * self._width
        return {name: self.counters[base + i] for i, name in enumerate(COUNTERS)}

    def environments(self) -> list[tuple[int, int, int, str]]:
        """(env_id, pid, function index, state) of every environment in the table now."""
        import numpy as np

        # A copy: the supervisor keeps writing while this reads.
        states = np.frombuffer(bytes(self._views[5]), dtype=np.int8)
        found = []
        for slot in np.flatnonzero(states).tolist():
            code = self.states[slot]
            if code:
                found.append((self.ids[slot], self.pids[slot], self.funcs[slot], STATE_NAMES[code]))
        return found

    def release(self, env_id: int) -> None:
        """Mark a vanished environment as holding no server connection (the sampler's side)."""
        slot = env_id % self.capacity
        if self.ids[slot] == env_id and self.states[slot] == STATE_CODES["vanished"]:
            self.released[slot] = 1

    def write_counters(self, rows: list[list[int]]) -> None:
        """Copy the counters (row 0: the run; row 1 + i: function i; COUNTERS order) into shared memory."""
        counters, width = self.counters, self._width
        for r, row in enumerate(rows):
            base = r * width
            for i, value in enumerate(row):
                counters[base + i] = value

    def publish(self, **values: int) -> None:
        """Sampler → display: the latest figures (names from DISPLAY)."""
        for name, value in values.items():
            self.display[DISPLAY.index(name)] = int(value)

    def published(self) -> dict[str, int]:
        """The latest figures the sampler published."""
        return {name: self.display[i] for i, name in enumerate(DISPLAY)}


class FleetRecorder:
    """Keeps a `FleetState` in step with the supervisor's events: states as they change, counters (kept
    here as integers) when `publish()` is called (the runner calls it every 100 ms and at the end)."""

    def __init__(self, fleet: FleetState, events: Any, function_index: dict[str, int]) -> None:
        self.fleet = fleet
        self.index = function_index
        self.rows = [[0] * len(COUNTERS) for _ in range(len(function_index) + 1)]
        self._states: dict[int, str] = {}  # env id → the state it is counted under
        events.env_spawn.add_listener(self._on_spawn)
        events.env_started.add_listener(lambda env: env.probe or fleet.set_pid(env.id, env.pid))
        events.env_ready.add_listener(lambda env: self._state(env, "serving" if env.function.service else "busy"))
        events.env_thaw.add_listener(lambda env: self._state(env, "busy"))
        events.env_freeze.add_listener(lambda env: self._state(env, "frozen"))
        events.env_vanish.add_listener(lambda env: self._state(env, "vanished"))
        events.env_reclaim.add_listener(lambda env: self._state(env, None))
        events.env_end.add_listener(self._on_end)
        events.invocation_end.add_listener(self._on_invocation)

    def publish(self) -> None:
        """Write the counters to shared memory."""
        self.fleet.write_counters(self.rows)

    def _add(self, counter: int, f: int, delta: int = 1) -> None:
        self.rows[0][counter] += delta
        self.rows[f + 1][counter] += delta

    def _state(self, env: Any, state: str | None) -> None:
        if env.probe:
            return
        f = self.index[env.function.name]
        old = self._states.pop(env.id, None)
        if old is not None:
            self._add(_C[old], f, -1)
        if state:
            self._states[env.id] = state
            self._add(_C[state], f)
        self.fleet.set_state(env.id, f, state)

    def _on_spawn(self, env: Any) -> None:
        if env.probe:
            return
        self._add(_C["environments_started"], self.index[env.function.name])
        # A service's instances are its servers from the start: never a Lambda environment initialising.
        self._state(env, "serving" if env.function.service else "initialising")

    def _on_end(self, env: Any) -> None:
        if env.probe:
            return
        self._state(env, None)
        self._add(_C["environments_ended"], self.index[env.function.name])

    def _on_invocation(self, invocation: Any) -> None:
        if invocation.probe:
            return
        f = self.index[invocation.function]
        status = invocation.status
        counter = _OK if status == "ok" else (_THROTTLES if status == "throttled" else _ERRORS)
        for row in (self.rows[0], self.rows[f + 1]):
            row[_INVOCATIONS] += 1
            row[counter] += 1
            if invocation.cold:
                row[_COLD] += 1


_INVOCATIONS, _OK, _THROTTLES, _ERRORS, _COLD = (_C[n] for n in ("invocations", "ok", "throttles", "errors",
                                                                 "cold_starts"))
