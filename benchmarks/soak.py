"""Soak: a long run at 167 req/s loses no arrival, keeps the supervisor's memory flat and leaves nothing.

Figure: the real `lambdaemu run --rps 167 --duration <--minutes>m --seed <--seed> --max-connections 400`
(default workload: embedded PostgreSQL, `workloads.sqlalchemy_pool`, 300 ms per invocation, Poisson
arrivals; the server's limit raised so that the invocations do their work rather than fail on "too many
clients" after the cold-start burst, see BENCHMARKS.md), as a user runs it. While it runs, the
lambdaemu process (the supervisor: loop, writers, summary) is sampled every --rss-interval seconds with
psutil (RSS, CPU time), with the machine's CPU use. Afterwards:

- every arrival has a row: the rows of invocations.csv against the arrivals of the same schedule, counted
  here from `emulator.load.schedule("poisson", rps, duration, seed)` (the schedule the CLI builds);
- memory stays flat: the supervisor's RSS at the end of the load window against its RSS one minute into
  the load (a quarter of the way in, for runs shorter than 4 minutes);
- nothing is left: no process labelled `LAMBDAEMU_RUN_ID=<run id>`, no process of the run's servers, no
  work directory, no descendant of this script.

Targets (issue): rows == arrivals; RSS at the end <= 1.10 x RSS at minute 1; nothing left.

    python benchmarks/soak.py [--minutes 10] [--json]
"""

from __future__ import annotations

from typing import Any

from _common import (Workdir, add_max_connections, emit, invocation_figures, leftovers, log, max_connections_flags,
                     parser, prepare, ratio, run_lambdaemu, run_leftovers, table, trouble, verdict)

from emulator import load

TARGET_RSS_RATIO = 1.10


def rss_at(samples: list[dict[str, float]], t_s: float) -> dict[str, float] | None:
    """The sample nearest `t_s`."""
    return min(samples, key=lambda s: abs(s["t_s"] - t_s)) if samples else None


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load window (default 10)")
    p.add_argument("--rps", type=float, default=167.0)
    p.add_argument("--seed", type=int, default=1, help="arrival seed (default 1)")
    add_max_connections(p)
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--workdir", default=None, help="where the run directory goes (default: a scratch "
                   "directory under benchmarks/, removed afterwards)")
    args = p.parse_args()
    info = prepare(args)
    duration_s = args.minutes * 60
    arrivals = sum(1 for _ in load.schedule("poisson", args.rps, duration_s, args.seed))

    flags = ["--rps", f"{args.rps:g}", "--duration", f"{duration_s:g}s", "--seed", str(args.seed),
             *max_connections_flags(args)]
    with Workdir(args.workdir) as tmp:
        log(f"soak: {args.rps:g} req/s for {args.minutes:g} min ({arrivals} arrivals in the schedule)")
        run = run_lambdaemu(flags, tmp / "run", monitor_interval_s=args.rss_interval)
        inv = invocation_figures(tmp / "run" / "invocations.csv") if (tmp / "run" / "invocations.csv").exists() \
            else {}
    run_id = run["run"].get("run_id", "?")
    by_run = run_leftovers(run_id)
    left = leftovers()

    monitor = run["monitor"]
    load_from = monitor.load_started_s or 0.0
    load_to = load_from + duration_s
    in_load = [s for s in monitor.samples if load_from <= s["t_s"] <= load_to]
    reference = rss_at(in_load, load_from + min(60.0, duration_s / 4))
    end = in_load[-1] if in_load else None
    rss_ratio = ratio(end["rss_mb"], reference["rss_mb"]) if end and reference else None
    per_minute = [rss_at(in_load, load_from + 60 * m) for m in range(int(args.minutes) + 1)]
    summary = run["summary"]
    rows = inv.get("rows")
    result: dict[str, Any] = {
        "benchmark": "soak", "machine": info,
        "command": "lambdaemu run " + " ".join(flags) + " --out <tmp>",
        "exit_code": run["exit_code"], "run_status": run["run"].get("status"), "wall_s": run["wall_s"],
        "arrivals_in_schedule": arrivals, "invocation_rows": rows, "summary_invocations": summary.get("invocations"),
        "statuses": inv.get("statuses"), "errors": summary.get("errors"),
        "dispatch_lag_ms": inv.get("dispatch_lag_ms"), "peak_environments": summary.get("peak_environments"),
        "ideal_peak_environments": inv.get("ideal_peak_environments"),
        "environments_started": summary.get("environments"),
        "rss_reference": reference, "rss_end": end, "rss_ratio": rss_ratio,
        "rss_max_mb": max((s["rss_mb"] for s in in_load), default=None),
        "rss_per_minute": per_minute, "rss_samples": monitor.samples, "load_started_s": monitor.load_started_s,
        "cpu_during_load": monitor.window(load_from, load_to), "cpu_account": run["cpu_account"],
        "stderr_tail": run["stderr_tail"], "run_leftovers": by_run, "leftover_processes": left,
        "target": {"every_arrival_has_a_row": rows == arrivals,
                   "rss_flat": rss_ratio is not None and rss_ratio <= TARGET_RSS_RATIO,
                   "nothing_left": not by_run and not left},
    }
    t = result["target"]
    lag = inv.get("dispatch_lag_ms") or {}
    cpu = result["cpu_during_load"]
    text = table([
        ["arrivals in the schedule / rows in invocations.csv", f"{arrivals} / {rows}",
         verdict(t["every_arrival_has_a_row"])],
        ["supervisor RSS MB at minute 1 -> end of load (ratio)",
         f"{reference and reference['rss_mb']} -> {end and end['rss_mb']} ({rss_ratio}x)", verdict(t["rss_flat"])],
        ["processes / work directories left", f"{len(by_run) + len(left)}", verdict(t["nothing_left"])],
        ["exit code / run status", f"{run['exit_code']} / {result['run_status']}", ""],
        ["statuses", str(inv.get("statuses")), ""],
        ["dispatch lag ms p50 / p99 / max", f"{lag.get('p50')} / {lag.get('p99')} / {lag.get('max')}", ""],
        ["peak environments / ideal", f"{result['peak_environments']} / {result['ideal_peak_environments']}", ""],
        ["supervisor RSS MB by minute", " ".join(str(s and s["rss_mb"]) for s in per_minute), ""],
        ["machine CPU during the load, % of all CPUs: mean / max",
         f"{cpu.get('machine_busy_pct_mean')} / {cpu.get('machine_busy_pct_max')}", ""],
        ["lambdaemu process CPU during the load, % of one core", str(cpu.get("process_cpu_pct_of_one_core")), ""],
        ["other processes' CPU over the run, % of all CPUs", str(run["cpu_account"]["others_pct_of_machine"]), ""],
    ], ["soak", "value", "target"])
    text += (f"\n\ntargets: every arrival has a row; RSS at the end <= {TARGET_RSS_RATIO} x RSS at minute 1; "
             "nothing left after the run")
    text += trouble(run["stderr_tail"], by_run, left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
