"""Private memory per idle (frozen) environment, without and with an open pooled database connection.

Figure: `emulator.supervisor.Supervisor` (wired as runner.py wires it) provisions --envs environments,
invokes each once (`load.fixed`, one arrival per environment), lets them freeze, then reads each
environment's memory with psutil `memory_full_info()`: USS (pages only this process maps: what ending it
would free) and PSS (its share of pages it shares, e.g. with the zygote and its siblings). Two handlers:

- idle: a generated no-import handler file, `init_delay_s=0`;
- pooled connection: the default workload `workloads.sqlalchemy_pool` (SQLAlchemy QueuePool created at
  import, `WORK_SECONDS=0` so the invocation runs `SELECT 1`), against a real embedded PostgreSQL started
  with `emulator.databases.postgres.PostgresServer(provider="embedded")`; the function's environment is
  `runner.function_env`, and the zygote warms the drivers (`Supervisor.warm()`) before any environment
  is forked, as in a run. Each frozen environment holds one open pooled connection.

Floor, measured in the same run: --envs bare forks of a fresh interpreter that imported
`emulator.environment.PRELOAD` and called `gc.freeze()` (as the zygote does); each child stops itself
(SIGSTOP) at once and is measured the same way. The zygote's own USS/PSS/RSS is reported too.

Targets (issue): private memory <= 3 MB per idle environment, <= 10 MB with an open pooled connection.

    python benchmarks/memory.py [--envs 50] [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

from _common import Workdir, dist, emit, leftovers, log, parser, preloaded_python_argv, prepare, ratio, table

from emulator import load
from emulator.config import RunConfig
from emulator.databases.postgres import PostgresServer
from emulator.events import Events
from emulator.runner import function_env
from emulator.supervisor import FROZEN, Supervisor

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


def frozen_environments(handler: str, n: int, workdir: Path, config_extra: dict, db=None) -> dict:
    """Provision `n` environments for `handler`, invoke each once, let them freeze; measure them."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    config = RunConfig(handler=handler, init_delay_s=0, provisioned=n, **config_extra)
    events = Events()
    statuses: dict[str, int] = {}
    warm_error = None

    def on_end(invocation) -> None:
        statuses[invocation.status] = statuses.get(invocation.status, 0) + 1

    events.invocation_end.add_listener(on_end)
    supervisor = Supervisor(config, handler_env={}, logs_dir=logs, events=events,
                            run_id=f"bench-memory-{os.getpid()}")
    supervisor.start()  # before the database's client threads, as runner.run does
    try:
        if db is not None:
            db.start()
            supervisor.handler_env = function_env(config, db)
            warm_error = supervisor.warm()  # as runner.run does once the database is up
        supervisor.provision(n)
        supervisor.run_load(load.fixed([0.0] * n), on_tick=lambda: None)
        supervisor.idle(1.0)  # let every environment settle frozen
        envs = [e for e in supervisor.live_environments() if e.state == FROZEN]
        rows = [measure(e.pid) for e in envs]
        zygote = measure(supervisor._zygote.pid) if supervisor._zygote is not None else {}
        connections = None
        if db is not None:
            with db.admin_connect() as conn:
                connections = sum(1 for r in db.connections(conn) if r.application_name.startswith("lambdaemu-env-"))
    finally:
        supervisor.shutdown()
    return {"environments": rows, "zygote": zygote, "statuses": statuses, "frozen": len(envs),
            "db_connections_held": connections, "zygote_warm_error": warm_error}


def mb_dist(rows: list[dict], key: str) -> dict:
    return dist([r[key] / MB for r in rows])


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--envs", type=int, default=50)
    p.add_argument("--workdir", default=None,
                   help="where the environments' log files go (default: a scratch directory under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)

    log(f"floor: {args.envs} bare forks of a preloaded, gc-frozen interpreter")
    fl = floor(args.envs)
    with Workdir(args.workdir) as tmp:
        handler = tmp / "trivial_handler.py"
        handler.write_text("def handler(event, context):\n    return None\n")
        log(f"idle: {args.envs} environments, trivial handler")
        idle = frozen_environments(f"{handler}:handler", args.envs, tmp, {})
        log(f"pooled: {args.envs} environments, workloads.sqlalchemy_pool (WORK_SECONDS=0), embedded PostgreSQL")
        db = PostgresServer(provider="embedded", run_id=f"bench-memory-{os.getpid()}")
        try:
            pooled = frozen_environments("workloads.sqlalchemy_pool:handler", args.envs, tmp,
                                         {"work_s": 0.0, "pool_max": 5}, db=db)
        finally:
            db.stop()
    left = leftovers()

    f_uss, f_pss = mb_dist(fl["children"], "uss"), mb_dist(fl["children"], "pss")
    i_uss, i_pss, i_rss = (mb_dist(idle["environments"], k) for k in ("uss", "pss", "rss"))
    p_uss, p_pss, p_rss = (mb_dist(pooled["environments"], k) for k in ("uss", "pss", "rss"))
    result = {
        "benchmark": "memory",
        "machine": info,
        "envs": args.envs,
        "idle": {"uss_mb": i_uss, "pss_mb": i_pss, "rss_mb": i_rss, "statuses": idle["statuses"],
                 "zygote_mb": {k: round(v / MB, 2) for k, v in idle["zygote"].items()}},
        "pooled_connection": {"uss_mb": p_uss, "pss_mb": p_pss, "rss_mb": p_rss, "statuses": pooled["statuses"],
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
        f"\ntargets: idle USS <= {TARGET_IDLE_MB} MB -> {'PASS' if t['pass_idle'] else 'FAIL'} (median), "
        f"{'PASS' if t['pass_idle_every_env'] else 'FAIL'} (every environment); "
        f"pooled USS <= {TARGET_POOLED_MB} MB -> {'PASS' if t['pass_pooled'] else 'FAIL'} (median), "
        f"{'PASS' if t['pass_pooled_every_env'] else 'FAIL'} (every environment)"
    )
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
