"""Private memory per idle (frozen) environment, without and with an open pooled database connection.

Figure: `emulator.runner.run()` (the Python API behind `lambdaemu run`: an embedded PostgreSQL, the
zygote warmed against it, the sampler) with `provisioned=--envs`, and one arrival per environment
(`arrivals=load.fixed`), so each environment is initialised, invoked once and frozen; one more arrival
comes seconds later, to keep the run going while the display measures. The display's `update`, called
at every tick of the loop, waits until every environment has been frozen for --settle seconds, then
reads each frozen environment's memory (pids from the shared fleet state) with psutil
`memory_full_info()`: USS (pages only this process maps: what ending it would free) and PSS (its share of
pages it shares, e.g. with the zygote and its siblings). Two handlers:

- idle: a generated no-import handler file, `init_delay_s=0`;
- pooled connection: the default workload `workloads.sqlalchemy_pool` (SQLAlchemy QueuePool created at
  import, `WORK_SECONDS=0` so the invocation runs `SELECT 1`). Each frozen environment holds one open
  pooled connection (the sampler's `held_frozen` column says how many the server saw).

Floor, measured in the same run: --envs bare forks of a fresh interpreter that imported
`emulator.zygote.PRELOAD` and called `gc.freeze()` (as the zygote does); each child stops itself
(SIGSTOP) at once and is measured the same way. The zygote's own USS/PSS/RSS is reported too.

Targets (issue): private memory <= 3 MB per idle environment, <= 10 MB with an open pooled connection.

    python benchmarks/memory.py [--envs 50] [--json]
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psutil

from _common import (TRIVIAL_HANDLER, TickDisplay, Workdir, dist, emit, leftovers, log, parser,
                     preloaded_python_argv, prepare, ratio, run_info, run_leftovers, summary, table, verdict,
                     write_handler)

from emulator import load
from emulator.config import RunConfig
from emulator.runner import run

TARGET_IDLE_MB, TARGET_POOLED_MB = 3.0, 10.0
MB = 1024 * 1024

FLOOR_CODE = """
import json, os, signal, psutil
n = int(sys.argv[1])
pids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    os.waitpid(pid, os.WUNTRACED)  # returns once the child has stopped
    pids.append(pid)
rows = []
for pid in pids:
    m = psutil.Process(pid).memory_full_info()
    rows.append({"uss": m.uss, "pss": m.pss, "rss": m.rss})
me = psutil.Process().memory_full_info()
for pid in pids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(json.dumps({"children": rows, "parent": {"uss": me.uss, "pss": me.pss, "rss": me.rss}}))
"""


def measure(pid: int) -> dict[str, int]:
    m = psutil.Process(pid).memory_full_info()
    return {"uss": m.uss, "pss": m.pss, "rss": m.rss}


def floor(n: int) -> dict:
    """Bare forks of a preloaded, gc-frozen interpreter, stopped at once."""
    out = subprocess.run(preloaded_python_argv(FLOOR_CODE) + [str(n)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


class FrozenMemory(TickDisplay):
    """Measures every frozen environment once all `n` have been frozen for `settle_s`."""

    def __init__(self, n: int, settle_s: float) -> None:
        self.n = n
        self.settle_s = settle_s
        self.done_at: float | None = None
        self.environments: list[dict[str, int]] = []
        self.zygote: dict[str, int] = {}
        self.measured_at: float | None = None

    def update(self, supervisor: Any, fleet: Any) -> None:
        if self.measured_at is not None:
            return
        totals = fleet.totals()
        if totals["invocations"] < self.n or totals["frozen"] < self.n:
            return
        now = supervisor.now()
        if self.done_at is None:
            self.done_at = now
        if now - self.done_at < self.settle_s:
            return
        self.measured_at = now
        for _, pid, _, state in fleet.environments():
            if state == "frozen":
                self.environments.append(measure(pid))
        if supervisor.zygote.proc is not None:
            self.zygote = measure(supervisor.zygote.proc.pid)


def frozen_environments(handler: str, n: int, workdir: Path, settle_s: float, **config_extra: Any) -> dict:
    """One run: `n` provisioned environments for `handler`, each invoked once, measured frozen."""
    out = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    config = RunConfig(handler=handler, init_delay_s=0, provisioned=n, out=str(out), **config_extra)
    recorder = FrozenMemory(n, settle_s)
    result = run(config, display=recorder, arrivals=load.fixed([0.0] * n + [settle_s + 3.0]))
    s, info = summary(out), run_info(out)
    return {"environments": recorder.environments, "zygote": recorder.zygote, "statuses": s.get("statuses"),
            "run_status": result.status, "run_error": result.error, "frozen": len(recorder.environments),
            "measured_at_s": recorder.measured_at, "db_connections_held": s.get("peak_held_by_frozen"),
            "zygote_warm_error": info.get("zygote_warm_error"), "run_leftovers": run_leftovers(info.get("run_id", "?"))}


def mb_dist(rows: list[dict], key: str) -> dict:
    return dist([r[key] / MB for r in rows])


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--envs", type=int, default=50)
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds every environment stays frozen before it is measured (default 1)")
    p.add_argument("--workdir", default=None,
                   help="where the environments' log files go (default: a scratch directory under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)

    log(f"floor: {args.envs} bare forks of a preloaded, gc-frozen interpreter")
    fl = floor(args.envs)
    with Workdir(args.workdir) as tmp:
        log(f"idle: {args.envs} environments, trivial handler")
        idle = frozen_environments(write_handler(tmp, "trivial_handler", TRIVIAL_HANDLER), args.envs, tmp,
                                   args.settle)
        log(f"pooled: {args.envs} environments, workloads.sqlalchemy_pool (WORK_SECONDS=0), embedded PostgreSQL")
        pooled = frozen_environments("workloads.sqlalchemy_pool:handler", args.envs, tmp, args.settle,
                                     work_s=0.0, pool_max=5)
    left = leftovers()

    f_uss, f_pss = mb_dist(fl["children"], "uss"), mb_dist(fl["children"], "pss")
    i_uss, i_pss, i_rss = (mb_dist(idle["environments"], k) for k in ("uss", "pss", "rss"))
    p_uss, p_pss, p_rss = (mb_dist(pooled["environments"], k) for k in ("uss", "pss", "rss"))
    result = {
        "benchmark": "memory",
        "machine": info,
        "envs": args.envs,
        "idle": {"frozen_measured": idle["frozen"], "run_status": idle["run_status"],
                 "run_leftovers": idle["run_leftovers"], "uss_mb": i_uss, "pss_mb": i_pss, "rss_mb": i_rss,
                 "statuses": idle["statuses"],
                 "zygote_mb": {k: round(v / MB, 2) for k, v in idle["zygote"].items()}},
        "pooled_connection": {"frozen_measured": pooled["frozen"], "run_status": pooled["run_status"],
                              "run_leftovers": pooled["run_leftovers"], "uss_mb": p_uss, "pss_mb": p_pss,
                              "rss_mb": p_rss, "statuses": pooled["statuses"],
                              "db_connections_held": pooled["db_connections_held"],
                              "zygote_warm_error": pooled["zygote_warm_error"],
                              "zygote_mb": {k: round(v / MB, 2) for k, v in pooled["zygote"].items()}},
        "floor_bare_fork": {"uss_mb": f_uss, "pss_mb": f_pss,
                            "parent_mb": {k: round(v / MB, 2) for k, v in fl["parent"].items()}},
        "ratio_idle_uss_p50": ratio(i_uss["p50"], f_uss["p50"]),
        "ratio_pooled_uss_p50": ratio(p_uss["p50"], f_uss["p50"]),
        "target": {"idle_mb_max": TARGET_IDLE_MB, "pooled_mb_max": TARGET_POOLED_MB,
                   "pass_idle": i_uss["p50"] <= TARGET_IDLE_MB, "pass_pooled": p_uss["p50"] <= TARGET_POOLED_MB,
                   "pass_idle_every_env": i_uss["max"] <= TARGET_IDLE_MB,
                   "pass_pooled_every_env": p_uss["max"] <= TARGET_POOLED_MB},
        "leftover_processes": left,
    }

    def row(name: str, d: dict) -> list:
        return [name, d["n"], d["p50"], d["mean"], d["max"]]

    text = table([
        row("idle environment (trivial handler), USS", i_uss),
        row("idle environment (trivial handler), PSS", i_pss),
        row("with open pooled connection (sqlalchemy_pool), USS", p_uss),
        row("with open pooled connection (sqlalchemy_pool), PSS", p_pss),
        row("floor: bare fork of preloaded interpreter, USS", f_uss),
        row("floor: bare fork of preloaded interpreter, PSS", f_pss),
    ], ["MB (MiB)", "n", "p50", "mean", "max"])
    t = result["target"]
    text += (
        f"\n\nzygote (after forking the idle environments): {result['idle']['zygote_mb']}; floor parent: "
        f"{result['floor_bare_fork']['parent_mb']}"
        f"\ninvocations: idle {idle['statuses']}, pooled {pooled['statuses']}; server-side connections held by "
        f"frozen environments: {pooled['db_connections_held']}; zygote warm-up: "
        f"{pooled['zygote_warm_error'] or 'ok'}"
        f"\nratio USS to floor: idle {result['ratio_idle_uss_p50']}x, pooled {result['ratio_pooled_uss_p50']}x"
        f"\ntargets: idle USS <= {TARGET_IDLE_MB} MB -> {verdict(t['pass_idle'])} (median), "
        f"{verdict(t['pass_idle_every_env'])} (every environment); "
        f"pooled USS <= {TARGET_POOLED_MB} MB -> {verdict(t['pass_pooled'])} (median), "
        f"{verdict(t['pass_pooled_every_env'])} (every environment)"
        f"\nenvironments measured (frozen): idle {idle['frozen']}, pooled {pooled['frozen']}; runs: idle "
        f"{idle['run_status']} {idle['run_error']}, pooled {pooled['run_status']} {pooled['run_error']}"
    )
    for name, r in (("idle", idle), ("pooled", pooled)):
        if r["run_leftovers"]:
            text += f"\nLEFT BY THE {name.upper()} RUN:\n" + "\n".join(r["run_leftovers"])
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
