"""End-to-end: `lambdaemu run --duration 60 --rps 167 --pool-max 5` wall time, as a user runs it.

Figure: wall-clock time of the real `lambdaemu` command (this checkout's, installed next to the
interpreter running this script) as a subprocess, from exec to exit, including the embedded
PostgreSQL's start and teardown, environment shutdown, summary and chart; plus the run's own figures from
summary.json (achieved rps, peak connections, errors, fidelity) and run.json (load window), and what the
run left behind (nothing may remain: processes labelled with its run id, its servers, its work
directories).

Floor: the run's own load window (--duration): the part of the wall time that is the requested load; the
rest is the emulator's fixed cost (start, drain, teardown, writing results).

Target (issue): finishes within 70 s wall, including database start and teardown.

    python benchmarks/run_60s.py [--duration 60] [--json] [-- extra lambdaemu run flags]
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import (Workdir, emit, leftovers, parser, prepare, ratio, run_lambdaemu, run_leftovers, table, trouble,
                     verdict)

TARGET_WALL_S = 70.0


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--duration", default="60", help="--duration for lambdaemu run (default 60)")
    p.add_argument("--rps", default="167")
    p.add_argument("--pool-max", default="5")
    p.add_argument("--workdir", default=None, help="where the run directory goes (default: a scratch "
                   "directory under benchmarks/, removed afterwards)")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="stress variant: N busy-looping processes run alongside (as a concurrent test suite would)")
    p.add_argument("extra", nargs="*", help="more lambdaemu run flags, after --")
    args = p.parse_args()
    info = prepare(args)

    with Workdir(args.workdir) as tmp:
        flags = ["--duration", args.duration, "--rps", args.rps, "--pool-max", args.pool_max, *args.extra]
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.background_load)]
        try:
            out = run_lambdaemu(flags, tmp / "run")
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    run, summary = out["run"], out["summary"]
    by_run = run_leftovers(run.get("run_id", "?"))
    left = leftovers()

    duration = float(args.duration)
    wall = out["wall_s"]
    errors = summary.get("errors", {})
    result = {
        "benchmark": "run_60s",
        "machine": info,
        "command": "lambdaemu run {} --out <tmp>".format(" ".join(flags)),
        "background_load_processes": args.background_load,
        "exit_code": out["exit_code"],
        "wall_s": wall,
        "floor_load_window_s": duration,
        "overhead_s": round(wall - duration, 2),
        "ratio": ratio(wall, duration),
        "run_status": run.get("status"),
        "load_window_s": run.get("load_window_s"),
        "load_start_s": run.get("load_start_s"),
        "summary": {k: summary.get(k) for k in (
            "target_rps", "achieved_rps", "arrival_rps", "invocations", "ok", "cold_starts", "throttles",
            "errors", "peak_connections", "max_connections", "peak_environments", "latency_ms",
            "dispatch_lag_ms", "init_ms", "fidelity")},
        "cpu_account": out["cpu_account"],
        "target": {"wall_s_max": TARGET_WALL_S, "pass": wall <= TARGET_WALL_S and out["exit_code"] == 0},
        "stderr_tail": out["stderr_tail"],
        "run_leftovers": by_run,
        "leftover_processes": left,
    }
    lag = summary.get("dispatch_lag_ms") or {}
    rows = [
        ["wall time, exec to exit (s)", wall],
        ["floor: requested load window --duration (s)", duration],
        ["fixed cost: wall - duration (s)", result["overhead_s"]],
        ["load started at (s after the run's t0)", run.get("load_start_s")],
        ["exit code / run status", f"{out['exit_code']} / {run.get('status')}"],
        ["achieved rps (target)", f"{summary.get('achieved_rps')} ({summary.get('target_rps')})"],
        ["invocations / ok / cold starts", f"{summary.get('invocations')} / {summary.get('ok')} / "
                                           f"{summary.get('cold_starts')}"],
        ["errors", json.dumps(errors)],
        ["throttles", json.dumps(summary.get("throttles"))],
        ["peak connections / max_connections", f"{summary.get('peak_connections')} / {summary.get('max_connections')}"],
        ["peak environments (ideal)", f"{summary.get('peak_environments')} "
                                      f"({(summary.get('fidelity') or {}).get('ideal_peak_environments')})"],
        ["latency ms p50 / p99", f"{(summary.get('latency_ms') or {}).get('p50')} / "
                                 f"{(summary.get('latency_ms') or {}).get('p99')}"],
        ["dispatch lag ms p50 / p99 / max", f"{lag.get('p50')} / {lag.get('p99')} / {lag.get('max')}"],
    ]
    text = table(rows, ["run_60s", "value"])
    if args.background_load:
        text += f"\n\nSTRESS VARIANT: {args.background_load} busy-looping processes ran alongside"
    cpu = out["cpu_account"]
    text += (f"\n\nratio wall / load window: {result['ratio']}x"
             f"\ntarget: wall <= {TARGET_WALL_S:g} s -> {verdict(result['target']['pass'])}"
             f"\nCPU during the run (core-s): lambdaemu and its children {cpu['descendants_cpu_s']}, "
             f"other processes on the machine {cpu['others_cpu_s']} ({cpu['others_pct_of_machine']}% of all CPUs)")
    text += trouble(out["stderr_tail"], by_run, left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
