"""A minimal supervisor for one Runtime API environment, for tests: a real `Loop`, a real
`RuntimeEndpoint`, a real process started from `emulator.runtimes.command` in its own process group, and
a listener that records what the endpoint reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from emulator.loop import Loop
from emulator.runtime_api import RuntimeEndpoint, deadline_ms, function_arn
from emulator.runtimes import command

ROOT = Path(__file__).resolve().parent.parent
NODE_WORKLOADS = ROOT / "workloads" / "node"


class Recorder:
    """A RuntimeListener that keeps every call as a tuple: ("next",), ("response", id, body),
    ("error", id, type, body), ("init_error", type, body), ("protocol_error", reason)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_next(self) -> None:
        self.events.append(("next",))

    def on_response(self, request_id: str, body: bytes) -> None:
        self.events.append(("response", request_id, body))

    def on_error(self, request_id: str, error_type: str, body: bytes) -> None:
        self.events.append(("error", request_id, error_type, body))

    def on_init_error(self, error_type: str, body: bytes) -> None:
        self.events.append(("init_error", error_type, body))

    def on_protocol_error(self, reason: str) -> None:
        self.events.append(("protocol_error", reason))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


def run_until(loop: Loop, predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Run the loop until `predicate()` holds or `timeout_s` passes; returns the predicate."""
    end = time.monotonic() + timeout_s
    while not predicate():
        now = time.monotonic()
        if now >= end:
            return predicate()
        loop.run_once(until=min(end, now + 0.05))
    return True


class RuntimeEnv:
    """One environment: `RuntimeEnv(handler, task_root=..., env={...})` starts it; use as a context
    manager (the process group is killed and the endpoint closed at exit)."""

    def __init__(self, handler: str, *, task_root: Path | str, env: Mapping[str, str] | None = None,
                 runtime: str | None = None, log_path: Path | None = None, loop: Loop | None = None,
                 max_body: int | None = None) -> None:
        self.loop = loop or Loop()
        self._own_loop = loop is None
        self.listener = Recorder()
        kwargs: dict[str, Any] = {} if max_body is None else {"max_body": max_body}
        self.endpoint = RuntimeEndpoint(self.loop, self.listener, function_arn=function_arn("test-function"),
                                        **kwargs)
        self.command = command(handler, runtime, str(task_root), function_name="test-function", memory_mb=256)
        address = self.endpoint.listen()
        self.log_path = log_path
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.spawned_at = time.monotonic()
        try:
            self.proc = self.command.popen(address, env or {}, log=log)
        finally:
            if log_path:
                log.close()
        self._seq = 0

    # -- driving -------------------------------------------------------------------------------------------
    def run_until(self, predicate: Callable[[], bool], timeout_s: float = 15.0) -> bool:
        return run_until(self.loop, predicate, timeout_s)

    def wait_next(self, timeout_s: float = 15.0) -> bool:
        """Run until the runtime holds a GET /next (or reported an init error, or exited)."""
        return self.run_until(lambda: self.endpoint.next_pending or self.proc.poll() is not None
                              or "init_error" in self.listener.kinds(), timeout_s)

    def invoke(self, event: Any = None, *, timeout_s: float = 15.0, request_id: str | None = None,
               trace_id: str = "", function_timeout_s: float = 3.0, **headers: str) -> tuple:
        """Deliver one invocation and run until its response or error (or the process ends, or a
        protocol error); returns that event, or ("timeout",)."""
        self._seq += 1
        request_id = request_id or f"req-{self._seq:04d}"
        before = len(self.listener.events)
        self.endpoint.deliver(request_id, json.dumps(event).encode(), deadline_ms(function_timeout_s), trace_id,
                              **headers)

        def answered() -> tuple | None:
            for ev in self.listener.events[before:]:
                if ev[0] in ("response", "error", "protocol_error"):
                    return ev
            return None

        self.run_until(lambda: answered() is not None or self.proc.poll() is not None, timeout_s)
        return answered() or (("exited", self.proc.returncode) if self.proc.poll() is not None else ("timeout",))

    def result(self, event: Any = None, **kwargs: Any) -> Any:
        """Invoke and return the decoded response body (fails the test on anything else)."""
        outcome = self.invoke(event, **kwargs)
        assert outcome[0] == "response", f"expected a response, got {outcome!r}; log:\n{self.log()}"
        return json.loads(outcome[2])

    def freeze(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    # -- ending --------------------------------------------------------------------------------------------
    def close(self) -> None:
        # The whole group, even when its leader has exited: a handler may have started children.
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
        self.proc.wait(timeout=10)
        self.endpoint.close()
        if self._own_loop:
            self.loop.close()

    def __enter__(self) -> "RuntimeEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
