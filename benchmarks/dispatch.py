"""Dispatch overhead at 1000 req/s: latency the supervisor adds to each warm invocation, and its CPU.

Figure: `emulator.supervisor.Supervisor` (wired as runner.py wires it, without database or sampler) runs a
generated no-database handler that sleeps 300 ms (`time.sleep`), with constant arrivals at --rps for
--duration (about rps x 0.3 s concurrent environments; concurrency limit 1000 and the default scale rate
1000/10s, so nothing is throttled). For each invocation, from `events.invocation_end`:

- added latency = (end - start) - duration_ms reported by the environment: the supervisor's dispatch (thaw,
  send, the environment's receive and reply, the supervisor noticing the reply), cold starts excluded;
- scheduling lag = start - scheduled: how late the loop took the arrival;
- caller-visible overhead = (end - scheduled) - duration_ms, the sum of the two.

The supervisor's CPU (getrusage RUSAGE_SELF of this process: the supervisor loop is its only thread;
environments and the zygote are other processes) over the steady window (after --warmup), as a % of one
core.

Floor, measured in the same run (before and after the load): a bare SOCK_SEQPACKET socketpair round trip
to a child process that echoes (marshal an invoke message as the supervisor does, send, the child receives
it and sends it back, receive and unmarshal), with the parent blocked in recv(); also the same round trip
with the parent waiting in epoll, as the supervisor does.

Targets (issue): added latency p50 <= 0.5 ms and p99 <= 2 ms, supervisor CPU <= 10% of one core.

    python benchmarks/dispatch.py [--rps 1000] [--duration 20] [--json]
"""

from __future__ import annotations

import marshal
import os
import resource
import select
import socket
import time
import uuid
from pathlib import Path

from _common import CpuAccount, Workdir, dist, emit, leftovers, log, parser, prepare, ratio, table

from emulator import load
from emulator.config import RunConfig
from emulator.events import Events
from emulator.supervisor import Supervisor

TARGET_P50_MS, TARGET_P99_MS, TARGET_CPU_PCT = 0.5, 2.0, 10.0


class EchoFloor:
    """A child process that echoes every SOCK_SEQPACKET message back (forked before any thread)."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self.sock.close()
            while True:
                data = theirs.recv(1 << 16)
                if not data:
                    os._exit(0)
                theirs.send(data)
        theirs.close()

    def round_trips(self, n: int, use_epoll: bool) -> list[float]:
        """`n` round trips of an invoke message serialised as the supervisor does (marshal), in ms."""
        poller = select.epoll()
        poller.register(self.sock.fileno(), select.EPOLLIN)
        prefix = str(uuid.uuid4())[:24]
        samples = []
        for i in range(n + 100):
            message = ("invoke", f"{prefix}{i:012x}", {"seq": i}, 3000.0)
            t0 = time.perf_counter()
            self.sock.send(marshal.dumps(message))
            if use_epoll:
                poller.poll(1.0)
            marshal.loads(self.sock.recv(1 << 16))
            if i >= 100:
                samples.append((time.perf_counter() - t0) * 1000)
        poller.close()
        return samples

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


def run_load(args, workdir: Path, provisioned: int = 0) -> dict:
    """One load run with `provisioned` environments initialised before it."""
    handler = workdir / "sleep_handler.py"
    handler.write_text("import time\n\n\ndef handler(event, context):\n    time.sleep(0.3)\n    return None\n")
    logs = workdir / "logs"
    logs.mkdir()
    config = RunConfig(handler=f"{handler}:handler", rps=args.rps, duration_s=args.duration, arrivals="constant",
                       init_delay_s=0, concurrency_limit=1000, timeout_s=3, provisioned=provisioned)
    events = Events()
    rows: list[tuple] = []
    events.invocation_end.add_listener(lambda invocation: rows.append(
        (invocation.scheduled, invocation.start, invocation.end, invocation.duration_ms, invocation.cold,
         invocation.status)))
    supervisor = Supervisor(config, handler_env={}, logs_dir=logs, events=events, run_id="bench-dispatch")
    cpu_ticks: list[tuple[float, float]] = []

    def tick() -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu_ticks.append((supervisor.now(), ru.ru_utime + ru.ru_stime))

    account = CpuAccount()
    supervisor.start()
    try:
        if provisioned:
            supervisor.provision(provisioned)
        load_start = supervisor.now()
        tick()
        supervisor.run_load(load.constant(args.rps, args.duration), load_start=load_start, on_tick=tick,
                            tick_s=0.5)
        tick()
        peak = supervisor.peak_environments
    finally:
        supervisor.shutdown()
    return {"cpu_account": account.stop(), "rows": rows, "cpu_ticks": cpu_ticks, "load_start": load_start,
            "peak_environments": peak,
            "provisioned": provisioned}


def cpu_percent(ticks: list[tuple[float, float]], start: float, end: float) -> float:
    """CPU % of one core between the first tick at or after `start` and the last at or before `end`."""
    inside = [t for t in ticks if start <= t[0] <= end]
    if len(inside) < 2:
        return float("nan")
    (t1, c1), (t2, c2) = inside[0], inside[-1]
    return round(100.0 * (c2 - c1) / (t2 - t1), 2)


def timeline(rows: list[tuple], load_start: float, bucket_s: float = 1.0) -> list[dict]:
    """Per-bucket (by scheduled time) counts of statuses and cold starts, and the worst scheduling lag."""
    buckets: dict[int, dict] = {}
    for sch, s, _, _, cold, status in rows:
        b = buckets.setdefault(int((sch - load_start) / bucket_s), {"cold": 0, "max_lag_ms": 0.0})
        b[status] = b.get(status, 0) + 1
        b["cold"] += bool(cold)
        b["max_lag_ms"] = max(b["max_lag_ms"], round((s - sch) * 1000, 1))
    return [{"t_s": k * bucket_s, **buckets[k]} for k in sorted(buckets)]


def analyse(out: dict, args) -> dict:
    """Figures of one load run."""
    rows, load_start = out["rows"], out["load_start"]
    ok = [r for r in rows if r[5] == "ok"]
    warm = [r for r in ok if not r[4]]
    steady = [r for r in warm if r[0] - load_start >= args.warmup]
    cold = [r for r in ok if r[4]]

    def figures(sel: list[tuple]) -> dict:
        return {
            "added_ms": dist([(e - s) * 1000 - d for _, s, e, d, _, _ in sel]),
            "scheduling_lag_ms": dist([(s - sch) * 1000 for sch, s, _, _, _, _ in sel]),
            "caller_overhead_ms": dist([(e - sch) * 1000 - d for sch, _, e, d, _, _ in sel]),
        }

    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[5]] = statuses.get(r[5], 0) + 1
    return {
        "provisioned": out["provisioned"],
        "invocations": len(rows), "statuses": statuses, "cold_starts": len(cold),
        "peak_environments": out["peak_environments"],
        "steady_state": figures(steady),
        "all_warm": figures(warm),
        "cold_start_added_ms": dist([(e - s) * 1000 - d for _, s, e, d, _, _ in cold]),
        "supervisor_cpu_pct_of_one_core": {
            "steady": cpu_percent(out["cpu_ticks"], load_start + args.warmup, load_start + args.duration),
            "whole_load": cpu_percent(out["cpu_ticks"], load_start, float("inf")),
        },
        "timeline_1s": timeline(rows, load_start),
        "cpu_account": out["cpu_account"],
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rps", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds after the load start excluded from the steady-state figures")
    p.add_argument("--scenario", choices=("both", "provisioned", "cold"), default="both",
                   help="provisioned: environments initialised before the load (pure dispatch); cold: the load "
                        "starts with no environment, as `lambdaemu run` does (default: both, provisioned first)")
    p.add_argument("--provisioned", type=int, default=None,
                   help="environments provisioned in the provisioned scenario (default: rps x 0.3 s x 1.2)")
    p.add_argument("--floor-samples", type=int, default=5000)
    p.add_argument("--workdir", default=None,
                   help="where the environments' log files go (default: a scratch directory under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)
    n_prov = args.provisioned if args.provisioned is not None else int(args.rps * 0.3 * 1.2)

    echo = EchoFloor()  # forked before the supervisor starts anything
    runs: dict[str, dict] = {}
    try:
        log(f"floor: {args.floor_samples} socketpair round trips (before the load)")
        floor_recv = echo.round_trips(args.floor_samples // 2, use_epoll=False)
        floor_epoll = echo.round_trips(args.floor_samples // 2, use_epoll=True)
        for scenario in ("provisioned", "cold"):
            if args.scenario not in ("both", scenario):
                continue
            n = n_prov if scenario == "provisioned" else 0
            with Workdir(args.workdir) as tmp:
                log(f"load ({scenario}, {n} provisioned): {args.rps:g} req/s constant for {args.duration:g} s, "
                    "300 ms sleep handler")
                runs[scenario] = analyse(run_load(args, tmp, n), args)
        log("floor: again (after the load)")
        floor_recv += echo.round_trips(args.floor_samples // 2, use_epoll=False)
        floor_epoll += echo.round_trips(args.floor_samples // 2, use_epoll=True)
    finally:
        echo.close()
    left = leftovers()

    fl, fe = dist(floor_recv, 4), dist(floor_epoll, 4)
    for r in runs.values():
        added = r["steady_state"]["added_ms"]
        caller = r["steady_state"]["caller_overhead_ms"]
        cpu = r["supervisor_cpu_pct_of_one_core"]["steady"]
        r["ratio_p50"] = ratio(added.get("p50", 0), fl["p50"])
        r["ratio_p99"] = ratio(added.get("p99", 0), fl["p99"])
        r["target"] = {
            "pass_p50": added.get("p50", float("inf")) <= TARGET_P50_MS,
            "pass_p99": added.get("p99", float("inf")) <= TARGET_P99_MS,
            "pass_cpu": cpu <= TARGET_CPU_PCT,
            "no_throttles_or_errors": set(r["statuses"]) == {"ok"},
            "caller_overhead_pass_p50": caller.get("p50", float("inf")) <= TARGET_P50_MS,
            "caller_overhead_pass_p99": caller.get("p99", float("inf")) <= TARGET_P99_MS,
        }
    result = {
        "benchmark": "dispatch",
        "machine": info,
        "rps": args.rps, "duration_s": args.duration, "warmup_s": args.warmup,
        "targets": {"added_p50_ms_max": TARGET_P50_MS, "added_p99_ms_max": TARGET_P99_MS,
                    "cpu_pct_max": TARGET_CPU_PCT},
        "floor_round_trip_recv_ms": fl,
        "floor_round_trip_epoll_ms": fe,
        "scenarios": runs,
        "leftover_processes": left,
    }

    def row(name: str, d: dict) -> list:
        return [name, d.get("n"), d.get("p50"), d.get("p90"), d.get("p99"), d.get("max")]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    parts = []
    for name, r in runs.items():
        st, aw = r["steady_state"], r["all_warm"]
        t = r["target"]
        cpu = r["supervisor_cpu_pct_of_one_core"]
        text = f"== scenario: {name} ({r['provisioned']} provisioned environments) ==\n" + table([
            row(f"added latency, warm, steady (t >= {args.warmup:g} s)", st["added_ms"]),
            row("scheduling lag (start - scheduled), steady", st["scheduling_lag_ms"]),
            row("caller-visible overhead (lag + added), steady", st["caller_overhead_ms"]),
            row("added latency, all warm invocations", aw["added_ms"]),
            row("scheduling lag, all warm invocations", aw["scheduling_lag_ms"]),
        ], ["ms", "n", "p50", "p90", "p99", "max"])
        text += (
            f"\ninvocations {r['invocations']} {r['statuses']}, cold starts {r['cold_starts']}, "
            f"peak environments {r['peak_environments']}"
            f"\nsupervisor CPU: {cpu['steady']}% of one core (steady), {cpu['whole_load']}% (whole load)"
            f"\nCPU over the scenario (core-s): {r['cpu_account']}"
            f"\nratio of added latency to floor (blocking recv): p50 {r['ratio_p50']}x, p99 {r['ratio_p99']}x"
            f"\ntargets: added p50 <= {TARGET_P50_MS} ms {verdict(t['pass_p50'])}; p99 <= {TARGET_P99_MS} ms "
            f"{verdict(t['pass_p99'])}; CPU <= {TARGET_CPU_PCT}% {verdict(t['pass_cpu'])}; "
            f"no throttles/errors {verdict(t['no_throttles_or_errors'])}"
            f"\n  caller-visible overhead (incl. scheduling lag): p50 {verdict(t['caller_overhead_pass_p50'])}, "
            f"p99 {verdict(t['caller_overhead_pass_p99'])}"
        )
        if name == "cold":
            text += "\ntimeline (by scheduled second): " + "; ".join(
                f"{b['t_s']:g}s " + ",".join(f"{k}={v}" for k, v in b.items() if k != "t_s")
                for b in r["timeline_1s"][:6]) + " ..."
        parts.append(text)
    parts.append(table([row("floor: socketpair round trip, blocking recv", fl),
                        row("floor: socketpair round trip, epoll wait", fe)],
                       ["ms", "n", "p50", "p90", "p99", "max"]))
    text = "\n\n".join(parts)
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
