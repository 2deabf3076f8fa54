"""The sampler: what the database (and the proxy) sees, every `--sample-interval`.

It runs in its own thread with its own connection (excluded from the counts) and, for each server-side
connection, finds the environment that owns it and so that environment's state (busy, frozen,
initialising, vanished, or unknown). Two ties are used: the `lambdaemu-env-<id>` application name every
environment gets through PGAPPNAME (PostgreSQL, needs no handler code) and, for the rest, the client port
of the connection matched against the local sockets of environment processes (psutil).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import psutil

from .databases.base import ConnectionRow, Database
from .results import SAMPLE_COLUMNS, CsvWriter

APPNAME_PREFIX = "lambdaemu-env-"


class RunStats:
    """Named cumulative counters, updated from supervisor events (see the README's counters table)."""

    KEYS = ("invocations", "ok", "throttles", "errors", "cold_starts", "environments_started",
            "environments_ended")

    def __init__(self, events: Any) -> None:
        self.counters = dict.fromkeys(self.KEYS, 0)
        self.errors_by_kind: Counter[str] = Counter()
        events.invocation_end.add_listener(self._on_invocation)
        events.env_start.add_listener(lambda env: self._bump("environments_started"))
        events.env_end.add_listener(lambda env: self._bump("environments_ended"))

    def _bump(self, key: str) -> None:
        self.counters[key] += 1

    def _on_invocation(self, invocation: Any) -> None:
        c = self.counters
        c["invocations"] += 1
        if invocation.status == "ok":
            c["ok"] += 1
        elif invocation.status == "throttled":
            c["throttles"] += 1
        else:
            c["errors"] += 1
            self.errors_by_kind[invocation.error_kind] += 1
        if invocation.cold:
            c["cold_starts"] += 1


def attribute(rows: list[ConnectionRow], by_id: dict[int, str], by_pid: dict[int, str],
              port_owner: Callable[[], dict[int, int]]) -> Counter[str]:
    """Count connections by the state of the owning environment ('unknown' when no tie is found)."""
    held: Counter[str] = Counter()
    ports: dict[int, int] | None = None
    for row in rows:
        state = None
        if row.application_name.startswith(APPNAME_PREFIX):
            try:
                state = by_id.get(int(row.application_name[len(APPNAME_PREFIX):]))
            except ValueError:
                state = None
        if state is None and row.client_port is not None:
            if ports is None:
                ports = port_owner()  # only pay for the socket scan when a name does not tell
            pid = ports.get(row.client_port)
            state = by_pid.get(pid) if pid is not None else None
        held[state or "unknown"] += 1
    return held


def local_port_owners(server_port: int) -> dict[int, int]:
    """Local port → pid for every TCP connection on this machine to `server_port`."""
    owners = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == server_port and conn.pid is not None:
            owners[conn.laddr.port] = conn.pid
    return owners


class Sampler(threading.Thread):
    """Polls the database every `interval_s` and writes one row of samples.csv per poll."""

    def __init__(self, db: Database, supervisor: Any, stats: RunStats, writer: CsvWriter, *,
                 interval_s: float, proxy: Any = None) -> None:
        super().__init__(name="lambdaemu-sampler", daemon=True)
        self.db = db
        self.proxy = proxy
        self.supervisor = supervisor
        self.stats = stats
        self.writer = writer
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._conn: Any = None
        self._proxy_conn: Any = None
        self.last: dict[str, Any] = {}
        self.samples = 0

    def stop(self) -> None:
        """Take one last sample and stop."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
        for conn in (self._conn, self._proxy_conn):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - the server may already be gone
                    pass

    def run(self) -> None:
        next_at = time.monotonic()
        while True:
            self.sample()
            if self._stop_event.is_set():
                return
            next_at += self.interval_s
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def sample(self) -> dict[str, Any]:
        """Take one sample now and write it."""
        snap = self.supervisor.snapshot()
        row: dict[str, Any] = dict.fromkeys(SAMPLE_COLUMNS, "")
        row["t_s"] = round(self.supervisor.now(), 3)
        counts = snap["counts"]
        row.update(envs=counts["busy"] + counts["frozen"] + counts["initialising"],
                   envs_busy=counts["busy"], envs_frozen=counts["frozen"],
                   envs_initialising=counts["initialising"], envs_vanished=counts["vanished"],
                   in_flight=snap["in_flight"], max_connections=self.db.max_connections)
        for key in ("invocations", "throttles", "errors", "cold_starts"):
            row[key] = self.stats.counters[key]
        errors = []
        try:
            if self._conn is None:
                self._conn = self.db.admin_connect()
            rows = self.db.connections(self._conn)
            states = Counter(r.state for r in rows)
            row.update(connections=len(rows), active=states["active"], idle=states["idle"],
                       idle_in_transaction=states["idle_in_transaction"], other=states["other"])
            if hasattr(self.db, "threads_connected"):
                row["threads_connected"] = self.db.threads_connected(self._conn)
            if self.proxy is None:
                self._attribute(row, rows, snap, self.db.port)
        except Exception as exc:  # noqa: BLE001 - one failed poll must not end the run
            errors.append(f"database: {_first_line(exc)}")
            self._conn = _close_quietly(self._conn)
        if self.proxy is not None:
            # Behind a proxy the server's connections belong to the proxy; what environments hold are
            # their client connections to it, so those are what the held_* columns attribute.
            try:
                if self._proxy_conn is None:
                    self._proxy_conn = self.proxy.admin_connect()
                stats = self.proxy.stats(self._proxy_conn)
                row.update(proxy_clients=stats.client_connections, proxy_servers=stats.server_connections,
                           proxy_waiting=stats.waiting_clients, proxy_max_wait_ms=round(stats.max_wait_ms, 1))
                clients = [ConnectionRow("", port) for port in stats.client_ports]
                self._attribute(row, clients, snap, self.proxy.port)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"proxy: {_first_line(exc)}")
                self._proxy_conn = _close_quietly(self._proxy_conn)
        row["sample_error"] = "; ".join(errors)[:300]
        self.writer.write([row[c] for c in SAMPLE_COLUMNS])
        self.last = row
        self.samples += 1
        return row


    @staticmethod
    def _attribute(row: dict[str, Any], rows: list[ConnectionRow], snap: dict[str, Any], port: int) -> None:
        held = attribute(rows, snap["by_id"], snap["by_pid"], lambda: local_port_owners(port))
        row.update(held_busy=held["busy"], held_frozen=held["frozen"], held_initialising=held["initialising"],
                   held_vanished=held["vanished"], held_unknown=held["unknown"] + held["ended"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _close_quietly(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
    return None
