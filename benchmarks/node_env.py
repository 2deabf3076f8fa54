"""Node.js environments: start time and private memory per environment with sequelize + pg loaded, and how
many fit on this machine.

Node cannot be forked from a preloaded zygote, so every Node environment is a new process. Figures, for
--envs environments started one after another (each kept alive, frozen, while the next starts, as in a
run), each with its own `RuntimeEndpoint` on one `Loop` (tests/runtime_harness.py `RuntimeEnv`, which starts
it with `emulator.runtimes.command(...).popen`):
- sequelize: `workloads/node/sequelize_pool.js` (its init requires sequelize, which loads pg, and creates
  the Sequelize instance and its pool; no connection yet). Start = from just before the process is
  spawned to the endpoint's first `on_next` (init done). Then one invocation (`WORK_SECONDS=0`: one
  `SELECT pg_sleep(0)`, against a real embedded PostgreSQL) so the pool holds one connection, then
  SIGSTOP once its next `GET /next` is held, as the supervisor freezes it. Memory is read when all are
  frozen: USS (pages only this process maps: what ending it frees), PSS, RSS (psutil `memory_full_info`).
  CPU = the process's user + system time at init done.
- bootstrap: the same for a handler file that requires nothing (lambdaemu's Node bootstrap alone).

Floors, measured in the same run: `node -e 0` spawned and waited for (start), one just before each
environment (paired); and, for memory, bare `node -e "setInterval(() => {}, 1e9)"` processes (the smallest
Node process that stays alive), frozen and measured the same way.

"Fit": how many sequelize environments the memory available at start holds (MemAvailable / p50 USS,
keeping 2 GiB for the database and the supervisor), and how many cold starts per second the CPUs take
(cores / CPU seconds per start). There is no target in the issue; these are the figures it asks for.

    python benchmarks/node_env.py [--envs 30] [--json]
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from _common import REPO, Workdir, dist, emit, leftovers, log, parser, prepare, ratio, table

from emulator.databases.postgres import PostgresServer
from emulator.loop import Loop
from emulator.runtimes import node_executable, node_version
from tests.runtime_harness import RuntimeEnv  # the tests' one-environment supervisor

MB = 1024 * 1024
NODE_WORKLOADS = REPO / "workloads" / "node"
RESERVE_GIB = 2.0


def node_e0(node: str) -> float:
    """ms to spawn `node -e 0` and see it exit."""
    t0 = time.perf_counter()
    subprocess.run([node, "-e", "0"], check=True)
    return (time.perf_counter() - t0) * 1000


def memory(pid: int) -> dict[str, int]:
    m = psutil.Process(pid).memory_full_info()
    return {"uss": m.uss, "pss": m.pss, "rss": m.rss}


def start_environments(spec: str, task_root: Path, n: int, extra: dict[str, str], node: str, logs: Path,
                       loop: Loop) -> tuple[list[dict], list[RuntimeEnv]]:
    """Start `n` environments one after another; each is invoked once and frozen before the next starts."""
    rows, envs = [], []
    for i in range(n):
        floor_ms = node_e0(node)
        env = RuntimeEnv(spec, task_root=task_root, env={**extra, "PGAPPNAME": f"lambdaemu-env-{i}"},
                         log_path=logs / f"{Path(spec).stem}-{i:03d}.log", loop=loop)
        envs.append(env)
        if not env.wait_next(30) or env.listener.kinds() != ["next"]:
            raise SystemExit(f"{spec}: environment {i} did not start: {env.listener.events}; see {env.log_path}")
        start_ms = (time.monotonic() - env.spawned_at) * 1000
        cpu = psutil.Process(env.proc.pid).cpu_times()
        outcome = env.invoke({}, function_timeout_s=10)
        if outcome[0] != "response" or not env.wait_next(30):
            raise SystemExit(f"{spec}: environment {i} failed its invocation: {outcome}")
        env.freeze()
        rows.append({"start_ms": start_ms, "cpu_s": cpu.user + cpu.system, "floor_ms": floor_ms})
    return rows, envs


def stop(envs: list[RuntimeEnv]) -> None:
    for env in envs:
        env.close()


def idle_node_floor(node: str, n: int) -> list[dict]:
    """Bare Node processes kept alive by a timer, frozen, measured."""
    procs = [subprocess.Popen([node, "-e", "setInterval(() => {}, 1e9)"], start_new_session=True)
             for _ in range(n)]
    try:
        time.sleep(1.0)
        for proc in procs:
            os.killpg(proc.pid, signal.SIGSTOP)
        return [memory(p.pid) for p in procs]
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mb(rows: list[dict], key: str) -> dict:
    return dist([r[key] / MB for r in rows], 2)


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--envs", type=int, default=30, help="environments of each kind (default 30)")
    p.add_argument("--workdir", default=None, help="where the environments' logs go (default: under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)
    node = node_executable()
    info["node"] = node_version(node)
    available_gib = mem_available_gib()
    assert (NODE_WORKLOADS / "node_modules" / "sequelize").is_dir(), "run: npm ci --prefix workloads/node"

    loop = Loop()
    db = PostgresServer(provider="embedded", run_id=f"bench-node-{os.getpid()}", max_connections=max(100, 3 * args.envs))
    envs: list[RuntimeEnv] = []
    try:
        db.start()
        with Workdir(args.workdir) as tmp:
            logs = tmp / "logs"
            logs.mkdir()
            (tmp / "empty.js").write_text("exports.handler = async () => null;\n")
            log(f"floor: bare idle node, {args.envs} processes")
            floor_mem = idle_node_floor(node, args.envs)
            log(f"bootstrap: {args.envs} environments, a handler that requires nothing")
            boot, envs = start_environments("empty.js:handler", tmp, args.envs, {}, node, logs, loop)
            boot_mem = [memory(e.proc.pid) for e in envs]
            stop(envs)
            log(f"sequelize: {args.envs} environments, workloads/node/sequelize_pool.js, one pooled connection each")
            extra = {**db.handler_env(), "WORK_SECONDS": "0"}
            seq, envs = start_environments("sequelize_pool.js:handler", NODE_WORKLOADS, args.envs, extra, node,
                                           logs, loop)
            time.sleep(0.5)
            seq_mem = [memory(e.proc.pid) for e in envs]
            with db.admin_connect() as conn:
                held = sum(1 for r in db.connections(conn) if r.application_name.startswith("lambdaemu-env-"))
            stop(envs)
    finally:
        stop(envs)
        db.stop()
        loop.close()
    left = leftovers()

    floor_start = dist([r["floor_ms"] for r in boot + seq], 1)
    seq_start, boot_start = dist([r["start_ms"] for r in seq], 1), dist([r["start_ms"] for r in boot], 1)
    seq_cpu = dist([r["cpu_s"] * 1000 for r in seq], 1)
    seq_uss, boot_uss, floor_uss = mb(seq_mem, "uss"), mb(boot_mem, "uss"), mb(floor_mem, "uss")
    usable_gib = max(0.0, available_gib - RESERVE_GIB)
    fit_memory = int(usable_gib * 1024 / seq_uss["p50"]) if seq_uss.get("p50") else 0
    starts_per_s = round((os.cpu_count() or 1) / (seq_cpu["p50"] / 1000), 1) if seq_cpu.get("p50") else None
    result = {
        "benchmark": "node_env",
        "machine": info,
        "envs": args.envs,
        "start_ms": {"sequelize": seq_start, "bootstrap": boot_start, "floor_node_e0": floor_start},
        "init_cpu_ms": {"sequelize": seq_cpu, "bootstrap": dist([r["cpu_s"] * 1000 for r in boot], 1)},
        "memory_mb": {"sequelize": {k: mb(seq_mem, k) for k in ("uss", "pss", "rss")},
                      "bootstrap": {k: mb(boot_mem, k) for k in ("uss", "pss", "rss")},
                      "floor_idle_node": {k: mb(floor_mem, k) for k in ("uss", "pss", "rss")}},
        "db_connections_held_by_frozen_sequelize_envs": held,
        "ratio_start_p50_to_floor": ratio(seq_start["p50"], floor_start["p50"]),
        "ratio_uss_p50_to_floor": ratio(seq_uss["p50"], floor_uss["p50"]),
        "fit": {"mem_available_gib": round(available_gib, 1), "reserve_gib": RESERVE_GIB,
                "environments_by_memory": fit_memory, "cold_starts_per_s_by_cpu": starts_per_s},
        "leftover_processes": left,
    }

    def row(name: str, d: dict, floor: dict) -> list:
        return [name, d["n"], d["p50"], d["p90"], d["max"], floor["p50"], ratio(d["p50"], floor["p50"])]

    text = table([
        row("start ms, sequelize + pg (spawn -> first GET /next)", seq_start, floor_start),
        row("start ms, bootstrap alone", boot_start, floor_start),
        row("USS MiB, sequelize + pg, 1 pooled connection, frozen", seq_uss, floor_uss),
        row("USS MiB, bootstrap alone, frozen", boot_uss, floor_uss),
        row("PSS MiB, sequelize + pg", mb(seq_mem, "pss"), mb(floor_mem, "pss")),
        row("RSS MiB, sequelize + pg", mb(seq_mem, "rss"), mb(floor_mem, "rss")),
    ], ["figure", "n", "p50", "p90", "max", "floor p50", "ratio"])
    text += (
        f"\nfloors: start = `node -e 0` spawned and reaped; memory = bare idle node (setInterval), frozen"
        f"\ninit CPU per sequelize environment: p50 {seq_cpu['p50']} ms; database connections held by the "
        f"frozen sequelize environments: {held}"
        f"\nfit: {fit_memory} sequelize environments in {usable_gib:.1f} GiB (MemAvailable {available_gib:.1f} GiB "
        f"- {RESERVE_GIB} GiB reserve) at p50 USS; CPU: {starts_per_s} cold starts/s on {os.cpu_count()} cores"
        f"\nnode {info['node']}"
        + ("\nLEFTOVER PROCESSES:\n" + "\n".join(left) if left else "")
    )
    emit(args, result, text)


if __name__ == "__main__":
    main()
