"""Events the supervisor fires; stats, writers, the sampler's shared view and the live display subscribe.

The supervisor does not import its observers: it fires `events.invocation_end.fire(invocation=...)`
and whoever listens, listens (the shape of locust's `event.py` and SQLAlchemy's `PoolEvents`).
Listeners run on the supervisor's thread, in its loop: they must be quick and must not block (no
waiting I/O; buffered writes flushed at the loop's tick).
"""

from __future__ import annotations

from typing import Any, Callable


class EventHook:
    """A list of listeners called in order with keyword arguments: `hook.fire(**kwargs)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[..., Any]] = []
        # Events fire several times per invocation: one nobody listens to costs a no-op call only.
        self.fire = self._nobody

    def add_listener(self, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Subscribe; returns the listener so it can be used as a decorator."""
        self._listeners.append(listener)
        self.fire = self._everyone
        return listener

    def _everyone(self, **kwargs: Any) -> None:
        """Call every listener with `kwargs`."""
        for listener in self._listeners:
            listener(**kwargs)

    def _nobody(self, **kwargs: Any) -> None:
        pass


class Events:
    """The supervisor's events, in the order an environment meets them.

    - `env_spawn(env)`: a new environment was asked of the zygote; it is `initialising` from now on and
      counts towards concurrency and the scaling rate (its pid is not known yet).
    - `env_started(env)`: the zygote forked it (`env.pid` is set).
    - `env_ready(env)`: its init phase finished.
    - `invocation_start(invocation, env)`: an invocation was given to an environment (warm or cold).
    - `env_thaw(env)` / `env_freeze(env)`: continued before an invocation / stopped after one.
    - `throttle(invocation)`: an arrival was refused (`invocation.throttle_reason`); `invocation_end`
      follows for it too.
    - `invocation_end(invocation)`: an invocation finished with any status.
    - `env_vanish(env)`: reclaimed in vanish mode: out of service, process frozen, connections open.
    - `env_reclaim(env)`: taken out of service for any reason (`env.end_reason`: idle, timeout, crash,
      run_end, ...); its process is being ended.
    - `env_end(env)`: its process is gone (`env.exit` says how), fired once, last.
    """

    NAMES = ("env_spawn", "env_started", "env_ready", "invocation_start", "env_thaw", "env_freeze",
             "throttle", "invocation_end", "env_vanish", "env_reclaim", "env_end")

    def __init__(self) -> None:
        for name in self.NAMES:
            setattr(self, name, EventHook(name))

    env_spawn: EventHook
    env_started: EventHook
    env_ready: EventHook
    invocation_start: EventHook
    env_thaw: EventHook
    env_freeze: EventHook
    throttle: EventHook
    invocation_end: EventHook
    env_vanish: EventHook
    env_reclaim: EventHook
    env_end: EventHook
