"""Environment start time: from the supervisor's spawn request to the environment's "ready" message.

Figure: `emulator.supervisor.Supervisor`, wired as runner.py wires it (a `ZygoteClient` started first,
environments at the run's default `--env-nice`, a `Loop`, `Events`), provisions one environment at a time
for a trivial handler (a generated file that imports nothing, `init_delay_s=0`): a function with
`provisioned=1`, and `Supervisor.provision()` called once per sample, which asks the zygote for one more
environment without waiting and runs the loop until it is ready. For each environment, the time from
the spawn request (`env.created`) to `env.ready_at` (the loop has read "ready"), split at the moment the
process was told its function (`env.spawned_at`). As in a run, the zygote is asked for a reserve first
(`ZygoteClient.reserve`), so it hands its children forked ahead to the supervisor, which starts each
environment from one of them without asking the zygote; neither the fork nor the zygote is on this path
unless requests come faster than it forks.

Floor, measured in the same run: a bare `os.fork()` + child `os._exit(0)` + `os.waitpid` in a fresh
interpreter that imported `emulator.zygote.PRELOAD` and called `gc.freeze()`, as the zygote does:
--samples forks in a tight loop (half before, half after the environments: the issue's floor), and one
more just before each environment sample (paired: a fork with the same cold caches as the zygote's, and
drift in the machine's speed shows in both).

Target (issue): median environment start <= 5 ms.

    python benchmarks/env_start.py [--samples 200] [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from _common import (TRIVIAL_HANDLER, CpuAccount, Workdir, dist, emit, leftovers, log, parser, pct,
                     preloaded_python_argv, prepare, ratio, table, verdict, write_handler)

from emulator.config import FunctionConfig, RunConfig
from emulator.events import Events
from emulator.loop import Loop
from emulator.supervisor import Supervisor
from emulator.zygote import ZygoteClient

TARGET_P50_MS = 5.0
WARMUP = 10

# For each line "k" read on stdin: k forks in a tight loop, their times (ms) written back as one JSON line.
# Kept running so that floor samples can be taken both in a tight loop (the floor) and one just
# before each environment sample (paired: the same cache and CPU state as the environment's fork).
FLOOR_CODE = """
import json, os, time
for line in sys.stdin:
    samples = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        samples.append((time.perf_counter() - t0) * 1000)
    sys.stdout.write(json.dumps(samples) + "\\n")
    sys.stdout.flush()
"""


class FloorFork:
    """A fresh interpreter that imported PRELOAD and called gc.freeze(); times bare fork + child
    _exit(0) + waitpid in it (ms)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(preloaded_python_argv(FLOOR_CODE), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def samples(self, k: int) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def sample(self) -> float:
        return self.samples(1)[0]

    def cpu_s(self) -> float:
        """CPU time (user + system) of the floor process and its reaped forks so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


_FLOOR_CPU_AT_START: dict[int, float] = {}


def floor_cpu_s(floor: FloorFork) -> float:
    """Floor-process CPU since environment_starts() began."""
    return floor.cpu_s() - _FLOOR_CPU_AT_START.get(floor.proc.pid, 0.0)


def environment_starts(samples: int, workdir: Path, floor: FloorFork | None = None) -> dict[str, list[float]]:
    """Provision `samples` environments one at a time; return per-environment times in ms. With `floor`,
    one floor sample is taken just before each environment."""
    handler = write_handler(workdir, "trivial_handler", TRIVIAL_HANDLER)
    logs = workdir / "logs"
    logs.mkdir()
    config = RunConfig(handler=handler, init_delay_s=0, provisioned=1)
    run_id = f"bench-env-start-{os.getpid()}"
    request_to_ready, request_to_fork, fork_to_ready, init_ms, floor_ms = [], [], [], [], []
    if floor is not None:
        _FLOOR_CPU_AT_START[floor.proc.pid] = floor.cpu_s()
    events = Events()
    started: list = []
    events.env_spawn.add_listener(lambda env: started.append(env))
    loop = Loop()
    zygote = ZygoteClient(logs, run_id, nice=config.env_nice)
    zygote.start()
    zygote.reserve(1)  # as the runner does before the load: spares held by the supervisor from now on
    supervisor = Supervisor([FunctionConfig.from_run_config(config, {})], concurrency_limit=config.concurrency_limit,
                            zygote=zygote, loop=loop, events=events, logs_dir=logs, run_id=run_id)
    try:
        supervisor.start()
        for i in range(samples + WARMUP):
            floor_sample = floor.sample() if floor is not None else None
            supervisor.provision()  # one more provisioned environment, initialised before it returns
            env = started[-1]
            assert env.ready_at is not None, f"environment {env.id} did not become ready"
            if i < WARMUP:
                continue
            request_to_ready.append((env.ready_at - env.created) * 1000)
            request_to_fork.append((env.spawned_at - env.created) * 1000)
            fork_to_ready.append((env.ready_at - env.spawned_at) * 1000)
            init_ms.append(env.init_ms)
            if floor_sample is not None:
                floor_ms.append(floor_sample)
    finally:
        supervisor.shutdown()
        zygote.close()
        loop.close()
    return {"request_to_ready": request_to_ready, "request_to_fork": request_to_fork,
            "fork_to_ready": fork_to_ready, "init_ms": init_ms, "floor": floor_ms}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="environments (and floor forks) to measure")
    p.add_argument("--workdir", default=None,
                   help="where the environments' log files go (default: a scratch directory under benchmarks/)")
    args = p.parse_args()
    info = prepare(args)
    floor_proc = FloorFork()  # started before the supervisor's zygote: no thread exists yet
    try:
        log(f"floor: {args.samples} bare forks in a tight loop (half before, half after the environments)")
        floor_proc.samples(WARMUP)
        tight = floor_proc.samples(args.samples // 2)
        with Workdir(args.workdir) as tmp:
            log(f"{args.samples} environments provisioned one at a time (logs in {tmp}), each paired with "
                "a floor fork taken just before it")
            account = CpuAccount()
            envs = environment_starts(args.samples, tmp, floor_proc)
            cpu = account.stop()
            # The floor process is not reaped yet: its forks count as "others"; take them out.
            cpu["others_cpu_s"] = round(max(0.0, cpu["others_cpu_s"] - floor_cpu_s(floor_proc)), 2)
            cpu["others_pct_of_machine"] = round(100 * cpu["others_cpu_s"] / (cpu["wall_s"] * (os.cpu_count() or 1)), 1)
        tight += floor_proc.samples(args.samples - args.samples // 2)
    finally:
        floor_proc.close()
    paired = envs["floor"]
    left = leftovers()

    start = dist(envs["request_to_ready"])
    after_fork = dist(envs["fork_to_ready"])
    to_fork = dist(envs["request_to_fork"])
    inside = dist(envs["init_ms"])
    fl, fp = dist(tight), dist(paired)
    result = {
        "benchmark": "env_start",
        "machine": info,
        "samples": args.samples,
        "environment_start_ms": start,
        "environment_request_to_forked_ms": to_fork,
        "environment_fork_to_ready_ms": after_fork,
        "environment_reported_init_ms": inside,
        "floor_bare_fork_tight_loop_ms": fl,
        "floor_bare_fork_paired_ms": fp,
        "ratio_p50": ratio(start["p50"], fl["p50"]),
        "ratio_p90": ratio(start["p90"], fl["p90"]),
        "ratio_p50_to_paired_floor": ratio(start["p50"], fp["p50"]),
        "median_of_paired_ratios": round(pct([a / b for a, b in zip(envs["request_to_ready"], paired)], 50), 2),
        "cpu_account_during_environments": cpu,  # others_cpu_s excludes the floor process
        "target": {"p50_ms_max": TARGET_P50_MS, "pass": start["p50"] <= TARGET_P50_MS},
        "leftover_processes": left,
    }
    rows = [
        ["environment start (spawn request -> ready)", start["p50"], start["p90"], start["p99"], start["mean"]],
        ["  request -> process told its function (env.spawned_at)", to_fork["p50"], to_fork["p90"], to_fork["p99"],
         to_fork["mean"]],
        ["  told -> ready (env.ready_at - env.spawned_at)", after_fork["p50"], after_fork["p90"],
         after_fork["p99"], after_fork["mean"]],
        ["    of which init phase reported by the environment", inside["p50"], inside["p90"], inside["p99"],
         inside["mean"]],
        ["floor: bare fork + _exit + waitpid, tight loop (preloaded, gc.freeze)", fl["p50"], fl["p90"], fl["p99"],
         fl["mean"]],
        ["floor: the same, one just before each environment (paired)", fp["p50"], fp["p90"], fp["p99"], fp["mean"]],
    ]
    text = table(rows, ["ms", "p50", "p90", "p99", "mean"])
    text += (f"\n\nratio to floor (tight loop): p50 {result['ratio_p50']}x, p90 {result['ratio_p90']}x; "
             f"to the paired floor: p50 {result['ratio_p50_to_paired_floor']}x, median of paired ratios "
             f"{result['median_of_paired_ratios']}x"
             f"\ntarget: median <= {TARGET_P50_MS} ms -> {verdict(result['target']['pass'])}"
             f" ({start['p50']} ms, n={start['n']})")
    text += f"\nCPU while the environments started (core-s): {cpu}"
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, result, text)


if __name__ == "__main__":
    main()
