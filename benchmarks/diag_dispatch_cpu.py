"""DIAGNOSIS (not a benchmark): where the supervisor's CPU goes at 1000 req/s (dispatch.py's provisioned
scenario): user vs system time, context switches (voluntary: the loop sleeping; involuntary: the loop
preempted, e.g. by an environment it just woke), and the wall time spent in `_signal_group` (killpg
SIGCONT/SIGSTOP), over the steady window. For a per-function profile, run py-spy on it:
`py-spy record -p <pid> -d 10 -r 500 --nonblocking -f raw -o out.raw` (see BENCHMARKS.md).

Also, in the same run, the CPU floor: a minimal loop over as many forked children doing exactly the
supervisor's syscalls per invocation (epoll wait, killpg SIGCONT, marshal + send, recv + unmarshal, killpg
SIGSTOP) at the same rate, with none of its bookkeeping. --envs-sched batch|nice5 puts the environments
under SCHED_BATCH (no wake-up preemption of the supervisor) or nice +5, to test whether preemption by the
environments it wakes is what costs the supervisor CPU.

    python benchmarks/diag_dispatch_cpu.py [--duration 15] [--envs-sched none|batch|nice5] [--json]
"""

from __future__ import annotations

import marshal
import os
import resource
import select
import signal
import socket
import time

from _common import Workdir, emit, leftovers, log, parser, prepare, table

import emulator.supervisor as supervisor_module
from emulator import load
from emulator.config import RunConfig
from emulator.events import Events
from emulator.supervisor import Supervisor


def minimal_loop(n: int, rps: float, duration: float, warmup: float) -> float:
    """CPU % of one core of a bare dispatch loop with the supervisor's syscalls (the floor)."""
    children = []
    for _ in range(n):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            os.setpgid(0, 0)
            while True:
                data = theirs.recv(1 << 16)
                if not data:
                    os._exit(0)
                message = marshal.loads(data)
                t0 = time.perf_counter()
                time.sleep(0.3)
                theirs.send(marshal.dumps(("result", message[1], "ok", "", "", "", (time.perf_counter() - t0) * 1000)))
        theirs.close()
        children.append((pid, ours))
    poller = select.epoll()
    owners = {}
    idle = []
    for pid, sock in children:
        poller.register(sock.fileno(), select.EPOLLIN)
        owners[sock.fileno()] = (pid, sock)
        os.killpg(pid, signal.SIGSTOP)
        idle.append((pid, sock))
    total = int(rps * duration)
    t0 = time.monotonic()
    i = 0
    marks: list[tuple[float, float]] = []
    while i < total or len(idle) < n:
        now = time.monotonic() - t0
        while i < total and i / rps <= now:
            pid, sock = idle.pop()
            os.killpg(pid, signal.SIGCONT)
            sock.send(marshal.dumps(("invoke", f"request-{i:012x}", {"seq": i}, 3000.0)))
            i += 1
        if not marks or time.monotonic() - marks[-1][0] >= 0.5:
            r = resource.getrusage(resource.RUSAGE_SELF)
            marks.append((time.monotonic(), r.ru_utime + r.ru_stime))
        timeout = max(0.0, t0 + i / rps - time.monotonic()) if i < total else 0.05
        for fd, _ in poller.poll(timeout):
            pid, sock = owners[fd]
            marshal.loads(sock.recv(1 << 16))
            os.killpg(pid, signal.SIGSTOP)
            idle.append((pid, sock))
    for pid, sock in children:
        os.killpg(pid, signal.SIGKILL)
        sock.close()
    for pid, _ in children:
        os.waitpid(pid, 0)
    poller.close()
    inside = [m for m in marks if t0 + warmup <= m[0] <= t0 + duration]
    (a, ca), (b, cb) = inside[0], inside[-1]
    return round(100 * (cb - ca) / (b - a), 2)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rps", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--envs-sched", choices=("none", "batch", "nice5"), default="none")
    p.add_argument("--no-floor", action="store_true", help="skip the minimal-loop floor")
    args = p.parse_args()
    info = prepare(args)
    calls = [0, 0.0]
    original = supervisor_module._signal_group

    def timed_signal_group(pid: int, sig: int) -> None:
        t0 = time.perf_counter()
        original(pid, sig)
        calls[0] += 1
        calls[1] += time.perf_counter() - t0

    supervisor_module._signal_group = timed_signal_group  # observation only: same call, timed
    marks: list[tuple] = []
    n = int(args.rps * 0.3 * 1.2)
    with Workdir(None) as tmp:
        handler = tmp / "sleep_handler.py"
        handler.write_text("import time\n\n\ndef handler(event, context):\n    time.sleep(0.3)\n")
        (tmp / "logs").mkdir()
        config = RunConfig(handler=f"{handler}:handler", rps=args.rps, duration_s=args.duration, arrivals="constant",
                           init_delay_s=0, provisioned=n)
        sup = Supervisor(config, handler_env={}, logs_dir=tmp / "logs", events=Events(), run_id="bench-diag-cpu")
        sup.start()
        try:
            sup.provision(n)
            for env in sup.live_environments():
                if args.envs_sched == "batch":
                    os.sched_setscheduler(env.pid, os.SCHED_BATCH, os.sched_param(0))
                elif args.envs_sched == "nice5":
                    os.setpriority(os.PRIO_PROCESS, env.pid, 5)

            def tick() -> None:
                r = resource.getrusage(resource.RUSAGE_SELF)
                marks.append((time.monotonic(), r.ru_utime, r.ru_stime, r.ru_nvcsw, r.ru_nivcsw, calls[0], calls[1]))

            log(f"{args.rps:g} req/s for {args.duration:g} s, {n} provisioned environments")
            sup.run_load(load.constant(args.rps, args.duration), on_tick=tick)
        finally:
            sup.shutdown()
            supervisor_module._signal_group = original
    floor = None
    if not args.no_floor:
        log(f"floor: minimal loop with the same syscalls, {n} children, {args.rps:g}/s")
        floor = minimal_loop(n, args.rps, args.duration, args.warmup)
    left = leftovers()
    a = [m for m in marks if m[0] >= marks[0][0] + args.warmup][0]
    b = marks[-2]
    w = b[0] - a[0]
    res = {
        "window_s": round(w, 2),
        "user_pct_of_one_core": round(100 * (b[1] - a[1]) / w, 2),
        "system_pct_of_one_core": round(100 * (b[2] - a[2]) / w, 2),
        "voluntary_ctx_switches_per_s": round((b[3] - a[3]) / w),
        "involuntary_ctx_switches_per_s": round((b[4] - a[4]) / w),
        "signal_group_calls_per_s": round((b[5] - a[5]) / w),
        "signal_group_wall_us_per_call": round(1e6 * (b[6] - a[6]) / max(1, b[5] - a[5]), 1),
        "signal_group_wall_pct_of_one_core": round(100 * (b[6] - a[6]) / w, 2),
        "cpu_us_per_invocation": round(1e6 * ((b[1] - a[1]) + (b[2] - a[2])) / (w * args.rps), 1),
        "environments_sched": args.envs_sched,
        "floor_minimal_loop_cpu_pct_of_one_core": floor,
    }
    text = table([[k, v] for k, v in res.items()], ["supervisor, steady window", "value"])
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    emit(args, {"diagnosis": "dispatch_cpu", "machine": info, **res, "leftover_processes": left}, text)


if __name__ == "__main__":
    main()
