"""Events the supervisor fires; stats, writers and the live display subscribe to them.

The supervisor does not import its observers: it fires `events.invocation_end.fire(invocation=...)`
and whoever listens, listens (the shape of locust's `event.py` and SQLAlchemy's `PoolEvents`).
Listeners run on the supervisor's thread, in its loop: they must be quick.
"""

from __future__ import annotations

from typing import Any, Callable


class EventHook:
    """A list of listeners called in order with keyword arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[..., Any]] = []

    def add_listener(self, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Subscribe; returns the listener so it can be used as a decorator."""
        self._listeners.append(listener)
        return listener

    def fire(self, **kwargs: Any) -> None:
        for listener in self._listeners:
            listener(**kwargs)


class Events:
    """The supervisor's events.

    - `env_start(env)`: an environment was forked and its init phase began.
    - `env_ready(env)`: its init phase finished.
    - `env_end(env)`: it ended (`env.end_reason`, `env.exit` say how); fired once its exit status is known.
    - `invocation_end(invocation)`: an invocation finished with any status, including `throttled`.
    """

    def __init__(self) -> None:
        self.env_start = EventHook("env_start")
        self.env_ready = EventHook("env_ready")
        self.env_end = EventHook("env_end")
        self.invocation_end = EventHook("invocation_end")
