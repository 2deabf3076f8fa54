"""Dispatch overhead at 1000 req/s: latency the supervisor adds to each warm invocation, and its CPU with
the sampler running.

Figure: `emulator.runner.run()` (the Python API behind `lambdaemu run`: zygote, sampler process, an
embedded PostgreSQL the sampler polls every second, the run directory) with a generated no-database
handler that sleeps 300 ms (`time.sleep`), constant arrivals (`arrivals=load.constant(--rps,
--duration)`), concurrency limit 1000 and the default scale rate 1000/10s, so nothing is throttled.
From the run's invocations.csv, for each warm ok invocation scheduled after --warmup:

- added latency = (end - start) - duration_ms reported by the environment: the supervisor's dispatch (thaw,
  send, the environment's receive and reply, the supervisor noticing the reply);
- scheduling lag = start - scheduled (`lag_ms`): how late the loop took the arrival;
- caller-visible overhead = (end - scheduled) - duration_ms, the sum of the two.

The supervisor's CPU: `runner.run` runs the loop in this process (its only thread), and calls the
display's `update` at every 0.5 s tick; the display here records `getrusage(RUSAGE_SELF)` with
`supervisor.now()` (and the sampler process's CPU time), so the CPU over the steady window (after
--warmup) is the control plane's, as a % of one core, with the sampler taking its samples alongside.

Floor, measured in the same run (before and after the load): a bare SOCK_SEQPACKET socketpair round trip
of the same messages to a forked child: the invoke message marshalled out (`protocol.encode_invoke`), the
child's JSON result back (`protocol.send_report`), received and checked as the supervisor does
(`protocol.read_report`); with the parent blocked in recv(), and waiting in epoll as the loop does.

Targets (issue): added latency p50 <= 0.5 ms and p99 <= 2 ms, supervisor CPU <= 10% of one core.

    python benchmarks/dispatch.py [--rps 1000] [--duration 20] [--scenario both|provisioned|cold] [--json]
"""

from __future__ import annotations

import os
import resource
import select
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from _common import (SLEEP_HANDLER, CpuAccount, Row, TickDisplay, Workdir, added_ms, dist, emit, ideal_peak,
                     leftovers, log, parser, prepare, ratio, read_invocations, run_info, run_leftovers, summary,
                     table, verdict, write_handler)

from emulator import load
from emulator.config import RunConfig
from emulator.protocol import encode_invoke, read_report, receive_invoke, send_report
from emulator.runner import run

TARGET_P50_MS, TARGET_P99_MS, TARGET_CPU_PCT = 0.5, 2.0, 10.0


class EchoFloor:
    """A child process that answers every invoke message with a result message, as an environment whose
    handler takes no time would (forked before any thread)."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self.sock.close()
            while (message := receive_invoke(theirs)) is not None:
                send_report(theirs, ("result", message[1], "ok", "", "", "", 0.0))
            os._exit(0)
        theirs.close()

    def round_trips(self, n: int, use_epoll: bool) -> list[float]:
        """`n` round trips (after 100 unmeasured ones), in ms."""
        poller = select.epoll()
        poller.register(self.sock.fileno(), select.EPOLLIN)
        prefix = str(uuid.uuid4())[:24]
        samples = []
        for i in range(n + 100):
            t0 = time.perf_counter()
            self.sock.send(encode_invoke(f"{prefix}{i:012x}", {"seq": i}, 3000.0))
            if use_epoll:
                poller.poll(1.0)
            read_report(self.sock)
            if i >= 100:
                samples.append((time.perf_counter() - t0) * 1000)
        poller.close()
        return samples

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)


class CpuRecorder(TickDisplay):
    """At every tick: `supervisor.now()`, this process's CPU time (the loop's) and the sampler's."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float, float | None]] = []
        self._sampler: Any = None
        self._looked = False

    def update(self, supervisor: Any, fleet: Any) -> None:
        if not self._looked:
            self._looked = True  # found once: scanning the process table every tick would cost the loop
            self._sampler = _sampler_process()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        sampler_cpu = None
        if self._sampler is not None:
            try:
                t = self._sampler.cpu_times()
                sampler_cpu = t.user + t.system
            except Exception:  # noqa: BLE001 - it ended
                self._sampler = None
        self.ticks.append((supervisor.now(), ru.ru_utime + ru.ru_stime, sampler_cpu))


def _sampler_process() -> Any:
    import psutil

    for child in psutil.Process().children():
        try:
            if any("sampler_main" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            pass
    return None


def cpu_percent(ticks: list[tuple], start: float, end: float, column: int = 1) -> float | None:
    """CPU % of one core between the first tick at or after `start` and the last at or before `end`."""
    inside = [t for t in ticks if start <= t[0] <= end and t[column] is not None]
    if len(inside) < 2:
        return None
    first, last = inside[0], inside[-1]
    return round(100.0 * (last[column] - first[column]) / (last[0] - first[0]), 2)


def cpu_windows(ticks: list[tuple], start: float, end: float, width_s: float = 5.0) -> list[float]:
    """The loop's CPU % in consecutive windows of `width_s` (its spread within one run)."""
    found = []
    t = start
    while t + width_s <= end + 1e-9:
        value = cpu_percent(ticks, t, t + width_s)
        if value is not None:
            found.append(value)
        t += width_s
    return found


def run_load(args: Any, workdir: Path, provisioned: int) -> dict[str, Any]:
    """One run through `runner.run` with `provisioned` environments initialised before the load."""
    handler = write_handler(workdir, "sleep_handler", SLEEP_HANDLER)
    out = workdir / "run"
    config = RunConfig(handler=handler, rps=args.rps, duration_s=args.duration, arrivals="constant",
                       init_delay_s=0, concurrency_limit=1000, timeout_s=3, provisioned=provisioned, out=str(out),
                       env_nice=args.env_nice)
    recorder = CpuRecorder()
    account = CpuAccount()
    result = run(config, display=recorder, arrivals=load.constant(args.rps, args.duration))
    cpu = account.stop()
    info = run_info(out)
    return {"status": result.status, "error": result.error, "cpu_account": cpu, "ticks": recorder.ticks,
            "load_start": info.get("load_start_s", 0.0), "rows": list(read_invocations(out / "invocations.csv")),
            "summary": summary(out), "run_leftovers": run_leftovers(info.get("run_id", "?")),
            "provisioned": provisioned}


def timeline(rows: list[Row], load_start: float, bucket_s: float = 1.0) -> list[dict]:
    """Per-bucket (by scheduled time) counts of statuses and cold starts, and the worst scheduling lag."""
    buckets: dict[int, dict] = {}
    for r in rows:
        b = buckets.setdefault(int((r.scheduled - load_start) / bucket_s), {"cold": 0, "max_lag_ms": 0.0})
        b[r.status] = b.get(r.status, 0) + 1
        b["cold"] += r.cold
        b["max_lag_ms"] = max(b["max_lag_ms"], round(r.lag_ms, 1))
    return [{"t_s": k * bucket_s, **buckets[k]} for k in sorted(buckets)]


def analyse(out: dict[str, Any], args: Any) -> dict[str, Any]:
    """Figures of one run."""
    rows, load_start = out["rows"], out["load_start"]
    ok = [r for r in rows if r.status == "ok"]
    warm = [r for r in ok if not r.cold]
    steady = [r for r in warm if r.scheduled - load_start >= args.warmup]
    cold = [r for r in ok if r.cold]

    def figures(sel: list[Row]) -> dict:
        return {"added_ms": dist([added_ms(r) for r in sel]),
                "scheduling_lag_ms": dist([r.lag_ms for r in sel]),
                "caller_overhead_ms": dist([r.latency_ms - r.duration_ms for r in sel])}

    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    steady_from, steady_to = load_start + args.warmup, load_start + args.duration
    s = out["summary"]
    return {
        "provisioned": out["provisioned"], "run_status": out["status"], "run_error": out["error"],
        "invocations": len(rows), "statuses": statuses, "cold_starts": len(cold),
        "peak_environments": s.get("peak_environments"),
        "ideal_peak_environments": ideal_peak(rows),
        "summary_fidelity": s.get("fidelity"),
        "samples_taken": (s.get("fidelity") or {}).get("samples"),
        "steady_state": figures(steady),
        "all_warm": figures(warm),
        "cold_start_added_ms": dist([added_ms(r) for r in cold]),
        "scheduling_lag_all_ms": dist([r.lag_ms for r in rows]),
        "supervisor_cpu_pct_of_one_core": {
            "steady": cpu_percent(out["ticks"], steady_from, steady_to),
            "whole_load": cpu_percent(out["ticks"], load_start, float("inf")),
            "steady_5s_windows": cpu_windows(out["ticks"], steady_from, steady_to),
        },
        "sampler_cpu_pct_of_one_core_steady": cpu_percent(out["ticks"], steady_from, steady_to, column=2),
        "timeline_1s": timeline(rows, load_start),
        "cpu_account": out["cpu_account"],
        "run_leftovers": out["run_leftovers"],
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
    p.add_argument("--env-nice", type=int, default=10, help="the environments' --env-nice (default 10, the CLI's)")
    p.add_argument("--floor-samples", type=int, default=5000)
    p.add_argument("--workdir", default=None,
                   help="where the run directory goes (default: a scratch directory under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)
    n_prov = args.provisioned if args.provisioned is not None else int(args.rps * 0.3 * 1.2)

    echo = EchoFloor()  # forked before anything else is started
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
                    "300 ms sleep handler, sampler on an embedded PostgreSQL")
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
        r["ratio_p50"] = ratio(added.get("p50"), fl["p50"])
        r["ratio_p99"] = ratio(added.get("p99"), fl["p99"])
        r["target"] = {
            "pass_p50": added.get("p50", float("inf")) <= TARGET_P50_MS,
            "pass_p99": added.get("p99", float("inf")) <= TARGET_P99_MS,
            "pass_cpu": cpu is not None and cpu <= TARGET_CPU_PCT,
            "no_throttles_or_errors": set(r["statuses"]) == {"ok"},
            "caller_overhead_pass_p50": caller.get("p50", float("inf")) <= TARGET_P50_MS,
            "caller_overhead_pass_p99": caller.get("p99", float("inf")) <= TARGET_P99_MS,
        }
    result = {
        "benchmark": "dispatch",
        "machine": info,
        "rps": args.rps, "duration_s": args.duration, "warmup_s": args.warmup, "env_nice": args.env_nice,
        "targets": {"added_p50_ms_max": TARGET_P50_MS, "added_p99_ms_max": TARGET_P99_MS,
                    "cpu_pct_max": TARGET_CPU_PCT},
        "floor_round_trip_recv_ms": fl,
        "floor_round_trip_epoll_ms": fe,
        "scenarios": runs,
        "leftover_processes": left,
    }

    def row(name: str, d: dict) -> list:
        return [name, d.get("n"), d.get("p50"), d.get("p90"), d.get("p99"), d.get("max")]

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
            row("scheduling lag, every invocation", r["scheduling_lag_all_ms"]),
        ], ["ms", "n", "p50", "p90", "p99", "max"])
        text += (
            f"\nrun {r['run_status']}{' (' + r['run_error'] + ')' if r['run_error'] else ''}; "
            f"invocations {r['invocations']} {r['statuses']}, cold starts {r['cold_starts']}, "
            f"peak environments {r['peak_environments']} (ideal {r['ideal_peak_environments']}), "
            f"samples taken {r['samples_taken']}"
            f"\nsupervisor CPU with the sampler running: {cpu['steady']}% of one core (steady), "
            f"{cpu['whole_load']}% (whole load); 5 s windows {cpu['steady_5s_windows']}; "
            f"sampler process {r['sampler_cpu_pct_of_one_core_steady']}%"
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
        if r["run_leftovers"]:
            text += "\nLEFT BY THE RUN:\n" + "\n".join(r["run_leftovers"])
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
