"""The sampler: what the database (and the proxy) sees, every `--sample-interval`, in its own process.

It runs apart from the supervisor's interpreter so that its queries, its socket scans and its CSV writes
never take the loop's time (nor its GIL). It reads the fleet (environments, their pids and states, the
counters) from the shared memory the supervisor keeps (`fleet.py`) and never asks the loop anything.

Each sample is stamped with the time its connections query answered (seconds since the run's t0, the
same monotonic clock as the supervisor's), each query runs under a statement timeout, and when a sample
comes late the ticks it missed are dropped and counted (`samples_missed`), never fired in a burst.

For each server-side connection it finds the environment that owns it, and so that environment's state
(busy, frozen, initialising, vanished, or unknown) and function. Two ties are used: the
`lambdaemu-env-<id>` application name every environment gets through PGAPPNAME (PostgreSQL, needs no
handler code) and, for the rest, the connection's client port matched against the sockets of the
environments' own processes (their /proc/<pid>/fd entries against /proc/net/tcp): never a scan of every
process on the machine.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .environment import APPNAME_PREFIX
from .fleet import FleetState
from .processes import child_pythonpath, die_with_parent, set_parent_death_signal, wait_or_kill
from .results import SAMPLE_COLUMNS

#: Longest a sampling query may run, whatever the interval (a stuck server must not stop sampling).
STATEMENT_TIMEOUT_S = 5.0
#: Wait before the last sample of a run that ended normally.
SETTLE_S = 0.3


@dataclass(frozen=True)
class SamplerConfig:
    """What the sampler process needs, sent once the database is up."""

    db: Any  # a started provider (picklable copy: no process handles), queried for connections
    proxy: Any  # the proxy provider, or None
    interval_s: float
    t0: float  # the supervisor's t0 (time.monotonic() is one clock for every process)
    samples_path: str
    functions_path: str
    connections_path: str
    functions: tuple[str, ...]


# --- attribution ----------------------------------------------------------------------------------------


def attribute(rows: Iterable[Any], envs: dict[int, tuple[int, int, str]],
              port_owner: Callable[[], dict[int, int]]) -> list[tuple[int, int, str] | None]:
    """For each connection row, the owning environment's (pid, function index, state), or None.

    `envs` maps env id → (pid, function index, state); `port_owner()` (called at most once, only when a
    name does not tell) maps client port → pid."""
    by_pid = {pid: info for info in envs.values() if (pid := info[0])}
    ports: dict[int, int] | None = None
    found: list[tuple[int, int, str] | None] = []
    for row in rows:
        owner = None
        name = getattr(row, "application_name", "") or ""
        if name.startswith(APPNAME_PREFIX):
            try:
                owner = envs.get(int(name[len(APPNAME_PREFIX):]))
            except ValueError:
                owner = None
        if owner is None and row.client_port is not None:
            if ports is None:
                ports = port_owner()
            pid = ports.get(row.client_port)
            owner = by_pid.get(pid) if pid is not None else None
        found.append(owner)
    return found


def _tcp_inodes(server_port: int) -> dict[int, int]:
    """socket inode → local port of every TCP connection on this machine to `server_port`."""
    inodes: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) < 10:
                        continue
                    remote_port = int(fields[2].rpartition(":")[2], 16)
                    if remote_port == server_port:
                        inodes[int(fields[9])] = int(fields[1].rpartition(":")[2], 16)
        except OSError:
            pass
    return inodes


def port_owners(server_port: int, pids: Iterable[int]) -> dict[int, int]:
    """Client port → pid for the connections to `server_port` held by `pids` (only their sockets are
    looked at)."""
    inodes = _tcp_inodes(server_port)
    owners: dict[int, int] = {}
    if not inodes:
        return owners
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                port = inodes.get(int(target[8:-1]))
                if port is not None:
                    owners[port] = pid
    return owners


# --- the sampler process ----------------------------------------------------------------------------


class _Sampler:
    """Takes samples and writes samples.csv and functions.csv (inside the sampler process)."""

    def __init__(self, config: SamplerConfig, fleet: FleetState) -> None:
        self.config = config
        self.fleet = fleet
        self.db = config.db
        self.proxy = config.proxy
        self._conn: Any = None
        self._proxy_conn: Any = None
        self.samples = 0
        self.missed = 0
        self._samples_fh = open(config.samples_path, "a", newline="")
        self._functions_fh = open(config.functions_path, "a", newline="")
        self._connections_fh = open(config.connections_path, "a", newline="")
        self._samples_csv = csv.writer(self._samples_fh)
        self._functions_csv = csv.writer(self._functions_fh)
        self._connections_csv = csv.writer(self._connections_fh)

    def close(self) -> None:
        for conn in (self._conn, self._proxy_conn):
            _close_quietly(conn)
        self._samples_fh.close()
        self._functions_fh.close()
        self._connections_fh.close()

    def run(self, control: socket.socket) -> None:
        interval = self.config.interval_s
        base = self.config.t0
        self._sample_logged()  # before the load: where the server's counters start from
        try:
            control.send(b"ready")
        except OSError:
            return
        tick = math.floor((time.monotonic() - base) / interval) + 1
        while True:
            wait = base + tick * interval - time.monotonic()
            if wait > 0:
                ready, _, _ = select.select([control], [], [], wait)
                if ready:
                    if control.recv(4096) == b"stop":
                        # Servers publish a session's statistics as its backend ends (PostgreSQL flushes
                        # them at exit): give the last ones a moment before the last look.
                        time.sleep(SETTLE_S)
                    self._sample_logged()  # the last look at the database, on "stop" and on EOF alike
                    return
            self._sample_logged()
            # A sample that came late (a slow server, a busy machine) drops the ticks it ran over.
            next_tick = math.floor((time.monotonic() - base) / interval) + 1
            self.missed += max(0, next_tick - tick - 1)
            tick = next_tick

    def _sample_logged(self) -> None:
        # A sample that fails for an unforeseen reason is logged and the next tick tries again: the
        # sampler must outlive any one bad moment of the run.
        try:
            self.sample()
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    def _connect(self) -> Any:
        conn = self.db.admin_connect()
        _set_statement_timeout(conn, self.db.engine, min(max(self.config.interval_s, 1.0), STATEMENT_TIMEOUT_S))
        return conn

    def sample(self) -> None:
        """Take one sample now and write it."""
        fleet = self.fleet
        row: dict[str, Any] = dict.fromkeys(SAMPLE_COLUMNS, "")
        errors = []
        rows: list[Any] = []
        owners: list[Any] = []
        queried = time.monotonic()
        answered = queried
        try:
            if self._conn is None:
                self._conn = self._connect()
            rows = self.db.connections(self._conn)
            answered = time.monotonic()
            if hasattr(self.db, "threads_connected"):
                row["threads_connected"] = self.db.threads_connected(self._conn)
            if hasattr(self.db, "counters"):
                counters = self.db.counters(self._conn)
                row.update(sessions_opened=_blank(counters.sessions_opened), refused=_blank(counters.refused))
        except Exception as exc:  # noqa: BLE001 - one failed poll must not end the sampling
            errors.append(f"database: {_first_line(exc)}")
            self._conn = _close_quietly(self._conn)
            answered = time.monotonic()
        # The fleet as of the moment the server answered, so both halves of the picture are of one instant.
        envs = {env_id: (pid, func, state) for env_id, pid, func, state in fleet.environments()}
        states = Counter(r.state for r in rows)
        # Attempts still authenticating (or being refused) are not connections the server holds.
        established = len(rows) - states["connecting"]
        row.update(connections=established, connecting=states["connecting"], active=states["active"],
                   idle=states["idle"], idle_in_transaction=states["idle_in_transaction"], other=states["other"])
        server_owners: list[Any] = [None] * len(rows)
        if self.proxy is None:
            owners = attribute(rows, envs, lambda: port_owners(self.db.port, (p for p, _, _ in envs.values() if p)))
            server_owners = owners
        else:
            # Behind a proxy the server's connections belong to the proxy; what environments hold are
            # their client connections to it, so those are what the held_* columns attribute.
            try:
                if self._proxy_conn is None:
                    self._proxy_conn = self.proxy.admin_connect()
                stats = self.proxy.stats(self._proxy_conn)
                row.update(proxy_clients=stats.client_connections, proxy_servers=stats.server_connections,
                           proxy_waiting=stats.waiting_clients, proxy_max_wait_ms=round(stats.max_wait_ms, 1))
                clients = [_Client(port) for port in stats.client_ports]
                owners = attribute(clients, envs, lambda: port_owners(self.proxy.port,
                                                                      (p for p, _, _ in envs.values() if p)))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"proxy: {_first_line(exc)}")
                self._proxy_conn = _close_quietly(self._proxy_conn)
        # What environments hold are established connections; an attempt being refused holds nothing. (Behind
        # a proxy the owners are of client connections, all established.)
        sessions = owners if self.proxy is not None else [
            owner for row, owner in zip(rows, owners) if row.state != "connecting"]
        held = Counter(owner[2] if owner else "unknown" for owner in sessions)
        holders = {owner[0] for owner in sessions if owner}
        unconnected = sum(1 for pid, _, state in envs.values() if state in ("busy", "frozen") and pid not in holders)
        held_by_function = Counter(owner[1] for owner in sessions if owner)
        row.update(held_busy=held["busy"], held_frozen=held["frozen"], held_initialising=held["initialising"],
                   held_vanished=held["vanished"], held_serving=held["serving"], held_unknown=held["unknown"])
        self._release_vanished(envs, owners)

        # Environments by state from the table just read (the counters are published every 100 ms; the
        # table is current).
        by_state: Counter[tuple[int, str]] = Counter((func, state) for _, func, state in envs.values())
        totals = fleet.totals()
        for state in ("initialising", "busy", "frozen", "vanished", "serving"):
            totals[state] = sum(n for (_, st), n in by_state.items() if st == state)
        t_s = round(answered - self.config.t0, 3)
        self.samples += 1
        row.update(t_s=t_s, sample_ms=round((answered - queried) * 1000, 1), samples_missed=self.missed,
                   envs=totals["initialising"] + totals["busy"] + totals["frozen"],
                   envs_busy=totals["busy"], envs_frozen=totals["frozen"], envs_initialising=totals["initialising"],
                   envs_vanished=totals["vanished"], envs_unconnected=unconnected, service_instances=totals["serving"],
                   in_flight=totals["busy"] + totals["initialising"],
                   invocations=totals["invocations"], throttles=totals["throttles"], errors=totals["errors"],
                   cold_starts=totals["cold_starts"], max_connections=self.db.max_connections,
                   sample_error="; ".join(errors)[:300])
        self._samples_csv.writerow([row[c] for c in SAMPLE_COLUMNS])
        self._samples_fh.flush()
        for index, name in enumerate(self.config.functions):
            f = fleet.totals(index)
            for state in ("initialising", "busy", "frozen", "vanished", "serving"):
                f[state] = by_state.get((index, state), 0)
            self._functions_csv.writerow([
                t_s, name, f["initialising"] + f["busy"] + f["frozen"], f["busy"], f["frozen"], f["initialising"],
                f["vanished"], f["busy"] + f["initialising"], f["invocations"], f["throttles"], f["errors"],
                f["cold_starts"], held_by_function.get(index, 0), f["serving"]])
        self._functions_fh.flush()
        self._write_connections(t_s, rows, server_owners)
        fleet.publish(last_sample_ms=int(t_s * 1000), connections=established, max_connections=self.db.max_connections,
                      samples=self.samples, samples_missed=self.missed)

    def _write_connections(self, t_s: float, rows: list[Any], owners: list[Any]) -> None:
        # Behind a proxy the server's sessions belong to the proxy: their owner is unknown, but their user
        # is still the application's (the proxy logs in as the client's user).
        counts: Counter[tuple[str, str, str]] = Counter()
        for row, owner in zip(rows, owners):
            counts[(getattr(row, "user", "") or "", row.state, owner[2] if owner else "unknown")] += 1
        self._connections_csv.writerows([t_s, app, state, owner_state, n]
                                        for (app, state, owner_state), n in sorted(counts.items()))
        self._connections_fh.flush()

    def _release_vanished(self, envs: dict[int, tuple[int, int, str]], owners: list[Any]) -> None:
        # A vanished environment the server shows no connection of holds nothing any more.
        holding = {owner[0] for owner in owners if owner and owner[2] == "vanished"}
        for env_id, (pid, _, state) in envs.items():
            if state == "vanished" and pid and pid not in holding:
                self.fleet.release(env_id)


@dataclass(frozen=True)
class _Client:
    client_port: int
    application_name: str = ""


def _blank(value: int | None) -> Any:
    return "" if value is None else value


def _set_statement_timeout(conn: Any, engine: str, seconds: float) -> None:
    try:
        if engine == "postgres":
            conn.execute(f"SET statement_timeout = {int(seconds * 1000)}")
        else:
            with conn.cursor() as cur:
                try:
                    cur.execute(f"SET SESSION max_statement_time = {seconds:g}")  # MariaDB
                except Exception:  # noqa: BLE001 - MySQL names it differently (milliseconds)
                    cur.execute(f"SET SESSION max_execution_time = {int(seconds * 1000)}")
    except Exception:  # noqa: BLE001 - a server without the setting still gets sampled
        pass


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


def sampler_main(control_fd: int, fleet_fd: int) -> None:
    """The sampler process: wait for its configuration, sample until told to stop (or until the
    supervisor is gone), then exit."""
    set_parent_death_signal(signal.SIGKILL)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the supervisor decides when sampling ends
    control = socket.socket(fileno=control_fd)
    data = control.recv(1 << 20)
    if not data or data == b"stop":
        return  # the run ended before the database was up
    config: SamplerConfig = pickle.loads(data)
    fleet = FleetState(config.functions, fd=fleet_fd)
    sampler = _Sampler(config, fleet)
    try:
        sampler.run(control)
    finally:
        sampler.close()
        control.close()


# --- the supervisor's handle ------------------------------------------------------------------------


class SamplerProcess:
    """Starts the sampler process (before any thread of this process exists), hands it its
    configuration once the database is up, and stops it."""

    def __init__(self, fleet: FleetState, log_path: Path) -> None:
        self.fleet = fleet
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        """Start the process; it waits for `begin`."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from emulator.sampler import sampler_main; "
                 "sampler_main(int(sys.argv[1]), int(sys.argv[2]))", str(theirs.fileno()), str(self.fleet.fd)],
                pass_fds=[theirs.fileno(), self.fleet.fd], start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGKILL),
                env={**os.environ, "PYTHONPATH": child_pythonpath()},
            )
        theirs.close()
        self.sock = mine

    def begin(self, config: SamplerConfig, timeout_s: float = 15.0) -> bool:
        """Start sampling with `config`, and wait (at most `timeout_s`) until the first sample is taken, so
        the load starts with the server's counters known. Returns whether it was."""
        assert self.sock is not None
        self.sock.send(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
        ready, _, _ = select.select([self.sock], [], [], timeout_s)
        return bool(ready) and self.sock.recv(16) == b"ready"

    def stop(self, timeout_s: float = 10.0, *, fast: bool = False) -> None:
        """Take a last sample (unless `fast`) and end the process. Idempotent."""
        if self.sock is not None:
            try:
                if fast:
                    self.sock.close()
                else:
                    self.sock.send(b"stop")
            except OSError:
                pass
        if self.proc is not None:
            if fast:
                self.proc.kill()
            wait_or_kill(self.proc, timeout_s)
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

