"""End-to-end: `lambdaemu run --duration 60 --rps 167 --pool-max 5` wall time, as a user runs it.

Figure: wall-clock time of the real `lambdaemu` command as a subprocess, from exec to exit, including the
embedded PostgreSQL's start and teardown, environment shutdown, summary and chart; plus the run's own
figures from summary.json (achieved rps, peak connections, errors) and run.json (load window).

Floor: the run's own load window (--duration): the part of the wall time that is the requested load; the
rest is the emulator's fixed cost (start, drain, teardown, writing results).

Target (issue): finishes within 70 s wall, including database start and teardown.

    python benchmarks/run_60s.py [--duration 60] [--json] [-- extra lambdaemu run flags]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from _common import REPO, CpuAccount, Workdir, emit, leftovers, log, parser, prepare, ratio, table

TARGET_WALL_S = 70.0


def lambdaemu() -> list[str]:
    """The installed `lambdaemu` console script (falls back to `python -m emulator.cli`)."""
    found = shutil.which("lambdaemu")
    return [found] if found else [sys.executable, "-m", "emulator.cli"]


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
        out = tmp / "run"
        argv = lambdaemu() + ["run", "--duration", args.duration, "--rps", args.rps, "--pool-max", args.pool_max,
                              "--out", str(out), *args.extra]
        log("running: " + " ".join(argv))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.background_load)]
        account = CpuAccount()
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        finally:
            wall = time.monotonic() - t0
            for hog in hogs:
                hog.kill()
                hog.wait()
        cpu = account.stop()
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    left = leftovers()

    duration = float(args.duration)
    errors = summary.get("errors", {})
    result = {
        "benchmark": "run_60s",
        "machine": info,
        "command": "lambdaemu run --duration {} --rps {} --pool-max {} --out <tmp>{}".format(
            args.duration, args.rps, args.pool_max, "".join(" " + a for a in args.extra)),
        "background_load_processes": args.background_load,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 2),
        "floor_load_window_s": duration,
        "overhead_s": round(wall - duration, 2),
        "ratio": ratio(wall, duration),
        "run_status": run.get("status"),
        "load_window_s": run.get("load_window_s"),
        "load_start_s": run.get("load_start_s"),
        "summary": {k: summary.get(k) for k in (
            "target_rps", "achieved_rps", "arrival_rps", "invocations", "ok", "cold_starts", "throttles",
            "errors", "peak_connections", "max_connections", "peak_environments", "latency_ms",
            "dispatch_lag_ms", "init_ms")},
        "cpu_account": cpu,
        "target": {"wall_s_max": TARGET_WALL_S, "pass": wall <= TARGET_WALL_S and proc.returncode == 0},
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        "leftover_processes": left,
    }
    rows = [
        ["wall time, exec to exit (s)", result["wall_s"]],
        ["floor: requested load window --duration (s)", duration],
        ["fixed cost: wall - duration (s)", result["overhead_s"]],
        ["load started at (s after the run's t0)", run.get("load_start_s")],
        ["exit code / run status", f"{proc.returncode} / {run.get('status')}"],
        ["achieved rps (target)", f"{summary.get('achieved_rps')} ({summary.get('target_rps')})"],
        ["invocations / ok / cold starts", f"{summary.get('invocations')} / {summary.get('ok')} / "
                                           f"{summary.get('cold_starts')}"],
        ["errors", json.dumps(errors)],
        ["throttles", json.dumps(summary.get("throttles"))],
        ["peak connections / max_connections", f"{summary.get('peak_connections')} / {summary.get('max_connections')}"],
        ["peak environments", summary.get("peak_environments")],
        ["latency ms p50 / p99", f"{(summary.get('latency_ms') or {}).get('p50')} / "
                                 f"{(summary.get('latency_ms') or {}).get('p99')}"],
        ["dispatch lag ms p50 / p99", f"{(summary.get('dispatch_lag_ms') or {}).get('p50')} / "
                                      f"{(summary.get('dispatch_lag_ms') or {}).get('p99')}"],
    ]
    text = table(rows, ["run_60s", "value"])
    if args.background_load:
        text += f"\n\nSTRESS VARIANT: {args.background_load} busy-looping processes ran alongside"
    text += (f"\n\nratio wall / load window: {result['ratio']}x"
             f"\ntarget: wall <= {TARGET_WALL_S:g} s -> {'PASS' if result['target']['pass'] else 'FAIL'}")
    text += (f"\nCPU during the run (core-s): lambdaemu and its children {cpu['descendants_cpu_s']}, "
             f"other processes on the machine {cpu['others_cpu_s']} ({cpu['others_pct_of_machine']}% of all CPUs)")
    if proc.returncode:
        text += "\nlambdaemu stderr (tail):\n" + proc.stderr[-1500:]
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
