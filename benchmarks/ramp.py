"""Ramp from no environment: does the control plane keep Lambda's time while a burst of cold starts
takes the CPU?

Figure: the real `lambdaemu run` with the default workload (embedded PostgreSQL, `workloads.sqlalchemy_pool`,
300 ms of `pg_sleep` per invocation, Poisson arrivals with a fixed --seed) at each --rps for --duration,
starting with no environment. From the run's invocations.csv:

- dispatch lag (start - scheduled, `lag_ms`) p50 / p99 / max over every arrival of the whole run;
- `ideal_peak_environments`: the most invocations that would overlap had each started exactly at its
  scheduled time and taken its own measured init + duration (throttled arrivals hold nothing), computed
  here, so a checkout whose summary.json lacks `fidelity` is measured the same way (summary.json's
  figure, at 1 ms resolution, is shown beside it when there is one);
- init_ms (cold starts) and duration_ms (inside the handler) p50 / p99: what the environments' lower CPU
  priority (`--env-nice`) costs a handler.

Against `peak_environments` from summary.json (the most environments alive at once). Also the machine's
CPU while the load ran (all CPUs, from /proc/stat, sampled every 0.5 s), the lambdaemu process's own CPU,
and what the run left behind (nothing may remain).

`--checkout DIR` runs another checkout's CLI (its `.venv/bin/lambdaemu`, from DIR), to measure the same
ramp before a change, e.g. the old control plane:

    git worktree add --detach /tmp/bench-old-cf1acd6 cf1acd6
    cd /tmp/bench-old-cf1acd6 && python3 -m venv .venv && .venv/bin/pip install -e .
    python benchmarks/ramp.py --checkout /tmp/bench-old-cf1acd6

(A directory under $TMPDIR named `lambdaemu-*` would be taken for a leftover by `lambdaemu cleanup`.)

Targets (issue): dispatch lag p99 <= 5 ms over the whole run; peak_environments <= 1.05 x ideal.

    python benchmarks/ramp.py [--rps 167 500] [--duration 30] [--env-nice N ...] [--repeat N]
                              [--checkout DIR] [--json]
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from _common import (Workdir, add_max_connections, dist, emit, invocation_figures, leftovers, log,
                     loadavg, max_connections_flags, parser, prepare, ratio, run_lambdaemu, run_leftovers, table,
                     verdict, wait_quiet)

TARGET_LAG_P99_MS = 5.0
TARGET_PEAK_RATIO = 1.05


def environment_figures(path: Path) -> dict[str, Any]:
    """From environments.csv: how long environments took to get going, apart from their own init phase:
    spawn request -> the zygote's "spawned" reply (`spawned_s - created_s`; absent in older checkouts), and
    spawn request -> ready minus the init the environment measured (everything outside init_ms)."""
    spawn, outside_init = [], []
    if path.exists():
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                created, ready, init = r.get("created_s"), r.get("ready_s"), r.get("init_ms")
                if created and r.get("spawned_s"):
                    spawn.append((float(r["spawned_s"]) - float(created)) * 1000)
                if created and ready and init:
                    outside_init.append((float(ready) - float(created)) * 1000 - float(init))
    return {"request_to_spawned_ms": dist(spawn, 1), "request_to_ready_minus_init_ms": dist(outside_init, 1)}


def ramp(rps: float, nice: int | None, args: Any, workdir: Path) -> dict[str, Any]:
    """One run of the ramp; its figures."""
    flags = ["--rps", f"{rps:g}", "--duration", f"{args.duration:g}", "--seed", str(args.seed)]
    flags += max_connections_flags(args)
    if nice is not None:
        flags += ["--env-nice", str(nice)]
    out = workdir / f"run-{rps:g}-{'default' if nice is None else nice}-{len(list(workdir.iterdir()))}"
    run = run_lambdaemu(flags, out, checkout=args.checkout)
    inv = invocation_figures(out / "invocations.csv") if (out / "invocations.csv").exists() else {}
    summary = run["summary"]
    monitor = run["monitor"]
    load_from = monitor.load_started_s or 0.0
    cpu_window = monitor.window(load_from, load_from + args.duration)
    peak = summary.get("peak_environments")
    ideal = inv.get("ideal_peak_environments")
    lag = inv.get("dispatch_lag_ms", {})
    return {
        "rps": rps, "env_nice": nice if nice is not None else "default",
        "command": "lambdaemu run " + " ".join(flags) + " --out <tmp>",
        "exit_code": run["exit_code"], "run_status": run["run"].get("status"), "wall_s": run["wall_s"],
        "invocations": inv.get("rows"), "statuses": inv.get("statuses"), "cold_starts": inv.get("cold_starts"),
        "errors": summary.get("errors"), "throttles": summary.get("throttles"),
        "dispatch_lag_ms": lag,
        "peak_environments": peak,
        "ideal_peak_environments": ideal,
        "first_init_ms": inv.get("first_init_ms"),
        "ideal_peak_environments_first_init": inv.get("ideal_peak_environments_first_init"),
        "peak_over_ideal_first_init": ratio(peak, inv.get("ideal_peak_environments_first_init")),
        "summary_ideal_peak_environments": (summary.get("fidelity") or {}).get("ideal_peak_environments"),
        "peak_over_ideal": ratio(peak, ideal),
        "environments_started": summary.get("environments"),
        "init_ms": inv.get("init_ms"), "duration_ms": inv.get("duration_ms"),
        "added_ms_warm": inv.get("added_ms_warm"),
        "environment_start": environment_figures(out / "environments.csv"),
        "peak_connections": summary.get("peak_connections"), "max_connections": summary.get("max_connections"),
        "samples_missed": (summary.get("fidelity") or {}).get("samples_missed"),
        "cpu_during_load": cpu_window,
        "cpu_account": run["cpu_account"],
        "target": {"lag_p99_pass": lag.get("p99", float("inf")) <= TARGET_LAG_P99_MS,
                   "peak_pass": peak is not None and bool(ideal) and peak <= TARGET_PEAK_RATIO * ideal},
        "stderr_tail": run["stderr_tail"],
        "run_leftovers": run_leftovers(run["run"].get("run_id", "?")),
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rps", type=float, nargs="+", default=[167.0, 500.0], help="rates to ramp to (default 167 500)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    p.add_argument("--seed", type=int, default=1, help="arrival seed, the same for every run (default 1)")
    p.add_argument("--env-nice", type=int, nargs="*", default=[None],
                   help="--env-nice values to compare, one run each (default: the CLI's default; an older "
                        "checkout may not have the option)")
    add_max_connections(p)
    p.add_argument("--repeat", type=int, default=1, help="runs of each combination, interleaved (default 1)")
    p.add_argument("--checkout", type=Path, default=None,
                   help="measure another checkout's lambdaemu (its .venv), e.g. the commit before a change")
    p.add_argument("--workdir", default=None, help="where the run directories go (default: a scratch "
                   "directory under benchmarks/, removed afterwards)")
    args = p.parse_args()
    if args.checkout is not None:
        args.checkout = args.checkout.resolve()
    info = prepare(args, args.checkout)

    runs = []
    with Workdir(args.workdir) as tmp:
        for i in range(args.repeat):
            for rps in args.rps:
                for nice in args.env_nice:
                    if runs and not args.no_wait_quiet:
                        # The previous run raised the load average itself: only the CPU must be idle.
                        wait_quiet(max_load=float("inf"), timeout_s=args.quiet_timeout)
                    log(f"ramp {i + 1}/{args.repeat}: {rps:g} req/s for {args.duration:g} s from no environment"
                        + ("" if nice is None else f", --env-nice {nice}"))
                    before = loadavg()
                    runs.append({**ramp(rps, nice, args, tmp), "loadavg_before": before})
    left = leftovers()

    result = {"benchmark": "ramp", "machine": info, "duration_s": args.duration, "seed": args.seed,
              "max_connections": args.max_connections or "server default",
              "targets": {"lag_p99_ms_max": TARGET_LAG_P99_MS, "peak_over_ideal_max": TARGET_PEAK_RATIO},
              "runs": runs, "leftover_processes": left}

    def d(figures: dict | None, *keys: str) -> str:
        figures = figures or {}
        return " / ".join(str(figures.get(k)) for k in keys)

    rows = []
    for r in runs:
        cpu = r["cpu_during_load"]
        rows.append([f"{r['rps']:g}", r["env_nice"], r["loadavg_before"][0], f"{r['run_status']} ({r['exit_code']})",
                     r["invocations"], d(r["dispatch_lag_ms"], "p50", "p99", "max"),
                     f"{r['peak_environments']} / {r['ideal_peak_environments']} = {r['peak_over_ideal']}x",
                     f"{r['ideal_peak_environments_first_init']} ({r['first_init_ms']} ms)",
                     d(r["init_ms"], "p50", "p99"), d(r["duration_ms"], "p50", "p99"),
                     d(r["added_ms_warm"], "p50", "p99"),
                     d(r["environment_start"]["request_to_ready_minus_init_ms"], "p50", "p99"),
                     f"{cpu.get('machine_busy_pct_mean')} / {cpu.get('machine_busy_pct_max')}",
                     r["cpu_account"]["others_pct_of_machine"], cpu.get("process_cpu_pct_of_one_core"),
                     f"{verdict(r['target']['lag_p99_pass'])} / {verdict(r['target']['peak_pass'])}"])
    text = table(rows, ["rps", "nice", "load", "run", "invocations", "lag ms p50/p99/max", "peak / ideal",
                        "ideal at first init",
                        "init ms p50/p99", "duration ms p50/p99", "added warm ms p50/p99",
                        "start outside init ms p50/p99", "machine CPU % mean/max", "others %", "lambdaemu CPU %",
                        "lag / peak"])
    text += (f"\n\ntargets: dispatch lag p99 <= {TARGET_LAG_P99_MS:g} ms; peak environments <= "
             f"{TARGET_PEAK_RATIO} x ideal. 'load': the 1-minute load average before the run. 'ideal at first "
             "init': the ideal with every cold start taking the first one's init (in brackets). 'added warm': "
             "(end - start) - duration of warm invocations. 'start outside init': spawn request to ready minus "
             "the environment's own init_ms (environments.csv). CPU over the load window: the machine's (% of "
             "all CPUs), the lambdaemu process's (% of one core); 'others': processes not reaped by this "
             "benchmark before the run ended (other users, and the run's database server), % of all CPUs over "
             "the whole run")
    for r in runs:
        extra = []
        if r["errors"] and r["errors"].get("total"):
            extra.append(f"errors {r['errors']}")
        if r["throttles"] and r["throttles"].get("total"):
            extra.append(f"throttles {r['throttles']}")
        if r["exit_code"]:
            extra.append("stderr: " + r["stderr_tail"][-300:])
        if r["run_leftovers"]:
            extra.append("LEFT BY THE RUN: " + "; ".join(r["run_leftovers"]))
        if extra:
            text += f"\n{r['rps']:g} req/s, nice {r['env_nice']}: " + "; ".join(extra)
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
