"""Shared helpers for the benchmark scripts: machine facts, percentiles, the printed table, --json output,
waiting for a quiet machine, the floor child processes, handler files, running `lambdaemu` (this
checkout's or another's) while watching it, reading a run's invocations.csv, and the leftover checks.

Benchmarks measure; they do not assert. Each script prints a small table with the figure, the floor
measured in the same run (where there is one), their ratio and the target, and `--json` prints the same
as one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere finds the package and workloads
    sys.path.insert(0, str(REPO))

#: A handler that imports nothing and returns at once (environment start, idle memory).
TRIVIAL_HANDLER = "def handler(event, context):\n    return None\n"
#: A handler that holds its environment 300 ms without any database (dispatch).
SLEEP_HANDLER = "import time\n\n\ndef handler(event, context):\n    time.sleep(0.3)\n    return None\n"


def write_handler(directory: Path, name: str, source: str) -> str:
    """Write a handler file into `directory`; returns its `--handler` spec (path:handler)."""
    path = directory / f"{name}.py"
    path.write_text(source)
    return f"{path}:handler"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def dist(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """n, mean, p50, p90, p99, max of `values`, rounded."""
    values = list(values)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), digits),
        "p50": round(pct(values, 50), digits),
        "p90": round(pct(values, 90), digits),
        "p99": round(pct(values, 99), digits),
        "max": round(max(values), digits),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to two places (None when either is missing or b is 0)."""
    return round(a / b, 2) if a is not None and b else None


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--no-wait-quiet", action="store_true",
                   help="start at once instead of waiting until the machine is quiet")
    p.add_argument("--max-load", type=float, default=0.5,
                   help="a quiet machine has a 1-minute load average below this (default 0.5)")
    p.add_argument("--quiet-timeout", type=float, default=600.0,
                   help="seconds to wait for a quiet machine before measuring anyway (default 600)")
    return p


def prepare(args: argparse.Namespace, checkout: Path | None = None) -> dict[str, Any]:
    """Common start of every benchmark: subreaper, wait for a quiet machine, machine facts, and the code
    measured (`checkout`, default this one; checked again by `emit`)."""
    become_subreaper()
    busy = None if args.no_wait_quiet else wait_quiet(max_load=args.max_load, timeout_s=args.quiet_timeout)
    info = machine()
    info["cpu_busy_before_start"] = None if busy is None else round(busy, 3)
    info["code"] = code_state(checkout or REPO)
    return info


def code_state(repo: Path = REPO) -> dict[str, Any]:
    """Which code is measured: git HEAD of `repo`, whether emulator/ or workloads/ differ from it, and a
    digest of their files. Other engineers commit to checkouts while benchmarks run, so `emit` compares
    the digest at the end with the one at the start. Read-only git commands only."""
    import hashlib

    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", *argv], cwd=repo, capture_output=True, text=True)

    digest = hashlib.sha256()
    for path in sorted([*(repo / "emulator").rglob("*.py"), *(repo / "workloads").rglob("*.py")]):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    dirty = git("diff", "--quiet", "HEAD", "--", "emulator", "workloads").returncode != 0
    return {"checkout": str(repo), "head": head, "emulator_workloads_differ_from_head": dirty,
            "digest": digest.hexdigest()[:16]}


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width table."""
    rows = [[_fmt(c) for c in r] for r in rows]
    header = list(header)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    if value is None:
        return "-"
    return str(value)


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """Print the table (stderr when --json, so stdout is exactly one JSON object). Says which code was
    measured and the load average at the end, and warns when emulator/ or workloads/ changed while the
    benchmark ran."""
    info = result.get("machine", {})
    info["loadavg_at_end"] = loadavg()
    start = info.get("code")
    if start is not None:
        end = code_state(Path(start["checkout"]))
        # A new commit that leaves emulator/ and workloads/ as they were (e.g. results) changes nothing measured.
        changed = (end["digest"], end["emulator_workloads_differ_from_head"]) != \
            (start["digest"], start["emulator_workloads_differ_from_head"])
        result["code_changed_during_run"] = changed
        text += (f"\ncode: git {start['head']} in {start['checkout']}"
                 + (" + uncommitted changes in emulator/ or workloads/" if start["emulator_workloads_differ_from_head"]
                    else "") + f" (digest {start['digest']})")
        if changed:
            text += f"\nWARNING: the code changed while this ran (now git {end['head']}, digest {end['digest']})"
    text += f"\nload average at start {info.get('loadavg_at_start')}, at end {info['loadavg_at_end']}"
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- a quiet machine and the CPU it gives -------------------------------------------------------------


def become_subreaper() -> None:
    """Make this process the reaper of every orphan it leaves (PR_SET_CHILD_SUBREAPER), so that
    `leftovers()` sees what a benchmark left running even when the parent of it has exited. Other
    engineers' processes on the same machine are not descendants and so are not reported."""
    from emulator.processes import set_child_subreaper

    set_child_subreaper()


def _proc_stat() -> tuple[int, int]:
    """(all jiffies, idle jiffies) of the machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def cpu_busy(interval_s: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval_s` (from /proc/stat), whoever uses them."""
    t1, i1 = _proc_stat()
    time.sleep(interval_s)
    t2, i2 = _proc_stat()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def wait_quiet(max_busy: float = 0.10, max_load: float = 0.5, timeout_s: float = 600.0) -> float:
    """Wait until the machine is quiet: other work uses < `max_busy` of all CPUs for 3 s in a row and the
    1-minute load average is below `max_load`, so the figures are this benchmark's, not a concurrent test
    run's. Returns the last busy fraction; after `timeout_s` measures anyway (and says so)."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    said = 0.0
    busy = cpu_busy()
    while time.monotonic() < deadline:
        load = os.getloadavg()[0]
        quiet = quiet + 1 if busy < max_busy and load < max_load else 0
        if quiet >= 3:
            return busy
        if quiet == 0 and time.monotonic() - said > 60:
            said = time.monotonic()
            log(f"machine busy ({busy:.0%} of all CPUs used, load average {load:.2f}); waiting for it to be quiet")
        busy = cpu_busy()
    log(f"machine still busy ({busy:.0%}, load average {os.getloadavg()[0]:.2f}) after {timeout_s:.0f} s; "
        "measuring anyway")
    return busy


class CpuAccount:
    """CPU used during a window: by this process, by its reaped descendants (zygote and environments, once
    the zygote has been waited for), and by the whole machine (/proc/stat), so the share used by other
    processes (e.g. a concurrent test run) is recorded next to the figures."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.self0, self.children0 = self._own()
        self.busy0 = self._busy_s()

    @staticmethod
    def _own() -> tuple[float, float]:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    @staticmethod
    def _busy_s() -> float:
        total, idle = _proc_stat()
        return (total - idle) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, float]:
        """Core-seconds used since construction: `self`, `descendants`, `machine`, `others` (the rest)."""
        wall = time.monotonic() - self.t0
        s, c = self._own()
        machine = self._busy_s() - self.busy0
        mine = (s - self.self0) + (c - self.children0)
        ncpu = os.cpu_count() or 1
        return {"wall_s": round(wall, 2), "self_cpu_s": round(s - self.self0, 2),
                "descendants_cpu_s": round(c - self.children0, 2), "machine_cpu_s": round(machine, 2),
                "machine_pct_of_all_cpus": round(100 * machine / max(1e-9, wall * ncpu), 1),
                "others_cpu_s": round(max(0.0, machine - mine), 2),
                "others_pct_of_machine": round(100 * max(0.0, machine - mine) / max(1e-9, wall * ncpu), 1)}


# --- leftovers ----------------------------------------------------------------------------------------


def leftovers(grace_s: float = 5.0) -> list[str]:
    """Descendants of this process still running (postgres servers, zygotes, environments) after a
    benchmark cleaned up; zombies are reaped. Waits up to `grace_s` for processes that are ending."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        while True:  # reap orphans handed to us as subreaper
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        alive = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def trouble(stderr_tail: str = "", by_run: Sequence[str] = (), left: Sequence[str] = ()) -> str:
    """The lines a benchmark's report ends with when something went wrong: lambdaemu's stderr (a failed
    exit), what the run left on the machine, and this benchmark's own leftover descendants."""
    text = ""
    if stderr_tail:
        text += "\nlambdaemu stderr (tail):\n" + stderr_tail
    if by_run:
        text += "\nLEFT BY THE RUN:\n" + "\n".join(by_run)
    if left:
        text += "\nLEFTOVER PROCESSES:\n" + "\n".join(left)
    return text


def run_leftovers(run_id: str) -> list[str]:
    """What a finished run left anywhere on the machine, whoever its parent now is: processes labelled
    `LAMBDAEMU_RUN_ID=<run_id>` (zygote, environments, what handlers started), processes naming one of
    the run's work directories on their command line (its database servers), and the work directories
    themselves (`$TMPDIR/lambdaemu-<run_id>-*`)."""
    import psutil

    from emulator.cleanup import labelled_processes
    from emulator.databases.base import WORKDIR_PREFIX

    found = [f"{proc.pid} labelled {run_id}: {' '.join(_cmdline(proc))[:120]}" for proc in labelled_processes(run_id)]
    marker = f"{WORKDIR_PREFIX}{run_id}-"
    for proc in psutil.process_iter(["pid"]):
        cmdline = " ".join(_cmdline(proc))
        if marker in cmdline and proc.pid != os.getpid():
            found.append(f"{proc.pid} server of {run_id}: {cmdline[:120]}")
    found += [f"work directory {path}" for path in sorted(Path(tempfile.gettempdir()).glob(marker + "*"))]
    return found


def _cmdline(proc: Any) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


class Workdir:
    """A scratch directory removed at exit. Default: under benchmarks/, the same kind of directory a real
    run writes results/<run-id>/logs to, rather than /tmp, where other test suites' leftovers have made
    creating a file cost up to ~0.7 ms on this machine (see BENCHMARKS.md)."""

    def __init__(self, base: str | None) -> None:
        root = Path(base) if base else Path(__file__).resolve().parent
        self.path = Path(tempfile.mkdtemp(prefix=".work-", dir=root))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


# --- floors ------------------------------------------------------------------------------------------


def preloaded_python_argv(code: str) -> list[str]:
    """A fresh interpreter that imports emulator.zygote.PRELOAD and calls gc.freeze() (as the zygote
    does), then runs `code`."""
    prelude = (
        "import gc, importlib, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from emulator.zygote import PRELOAD\n"
        "for name in PRELOAD:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "gc.collect()\n"
        "gc.freeze()\n"
    )
    return [sys.executable, "-c", prelude + code]


# --- runs through runner.run -----------------------------------------------------------------------------


class TickDisplay:
    """A `runner.Display` that shows nothing; subclasses measure in `update`, which `runner.run` calls at
    every tick of the loop (0.5 s) with the supervisor and the shared fleet state."""

    def start(self, config: Any, run_dir: Path) -> None:
        """Nothing to show."""

    def phase(self, text: str) -> None:
        """Nothing to show."""

    def update(self, supervisor: Any, fleet: Any) -> None:
        """Called at every tick."""

    def stop(self) -> None:
        """Nothing to stop."""


def run_info(run_dir: Path) -> dict[str, Any]:
    """run.json of a run directory ({} when missing)."""
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a run directory ({} when missing)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --- runs of the lambdaemu command ---------------------------------------------------------------------


def add_max_connections(p: argparse.ArgumentParser) -> None:
    """--max-connections for benchmarks that run the default workload through `lambdaemu run`."""
    p.add_argument("--max-connections", type=int, default=400,
                   help="the server's max_connections (default 400, so every invocation gets its connection and "
                        "does its 300 ms even when a cold-start burst overshoots; 0: the server's default of 100)")


def max_connections_flags(args: argparse.Namespace) -> list[str]:
    """The `lambdaemu run` flags for `add_max_connections`'s option."""
    return ["--max-connections", str(args.max_connections)] if args.max_connections else []


def lambdaemu_argv(checkout: Path | None = None) -> list[str]:
    """The `lambdaemu` command of `checkout` (default: the one installed next to this interpreter, i.e.
    this checkout's virtual environment), or `python -m emulator.cli` with that checkout's interpreter."""
    if checkout is None:
        bindir = Path(sys.executable).parent
        python = sys.executable
    else:
        bindir = checkout / ".venv" / "bin"
        python = str(bindir / "python")
        if not Path(python).exists():
            raise SystemExit(f"--checkout {checkout}: no .venv there; create it with: cd {checkout} && "
                             "python3 -m venv .venv && .venv/bin/pip install -e .")
    script = bindir / "lambdaemu"
    return [str(script)] if script.exists() else [python, "-m", "emulator.cli"]


class ProcessMonitor:
    """Watches one process from a thread: its RSS and CPU time, and the whole machine's CPU, every
    `interval_s`; and when the run's run.json first says `running` (the load has started). Times are
    seconds since the monitor started."""

    def __init__(self, pid: int, interval_s: float, run_dir: Path | None = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.run_dir = run_dir
        self.t0 = time.monotonic()
        self.samples: list[dict[str, float]] = []
        self.load_started_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="process-monitor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        last_stat = _proc_stat()
        next_sample = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            # run.json is polled more often than the samples are taken, so the load start is known closely.
            if self.load_started_s is None and self.run_dir is not None:
                try:
                    if json.loads((self.run_dir / "run.json").read_text()).get("status") == "running":
                        self.load_started_s = round(time.monotonic() - self.t0, 2)
                except (OSError, ValueError):
                    pass
            now = time.monotonic()
            if now >= next_sample:
                next_sample += self.interval_s
                stat = _proc_stat()
                busy = 1.0 - (stat[1] - last_stat[1]) / max(1, stat[0] - last_stat[0])
                last_stat = stat
                try:
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
                except psutil.Error:
                    return
                self.samples.append({"t_s": round(now - self.t0, 2), "rss_mb": round(rss / 2**20, 2),
                                     "cpu_s": round(cpu.user + cpu.system, 3),
                                     "machine_busy_pct": round(100 * busy, 1)})
            self._stop.wait(min(0.2, max(0.0, next_sample - time.monotonic())))

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._thread.join()

    def window(self, start_s: float, end_s: float) -> dict[str, Any]:
        """The process's CPU (% of one core) and the machine's CPU use (% of all CPUs, mean and max over
        the intervals) between `start_s` and `end_s`."""
        inside = [s for s in self.samples if start_s <= s["t_s"] <= end_s]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        busy = [s["machine_busy_pct"] for s in inside[1:]]
        return {"from_s": first["t_s"], "to_s": last["t_s"],
                "process_cpu_pct_of_one_core": round(100 * (last["cpu_s"] - first["cpu_s"]) /
                                                     (last["t_s"] - first["t_s"]), 1),
                "machine_busy_pct_mean": round(statistics.fmean(busy), 1), "machine_busy_pct_max": max(busy)}


def run_lambdaemu(flags: Sequence[str], out: Path, *, checkout: Path | None = None,
                  monitor_interval_s: float = 0.5) -> dict[str, Any]:
    """Run `lambdaemu run <flags> --out <out>` of `checkout` (default: this one) from that checkout's
    directory, as a user would, while a `ProcessMonitor` watches the lambdaemu process. Returns the exit
    code, wall time, stderr tail, CPU account, the monitor, run.json and summary.json."""
    cwd = checkout or REPO
    argv = lambdaemu_argv(checkout) + ["run", *flags, "--out", str(out)]
    log("running: " + " ".join(argv[1:]) + f" (in {cwd})")
    account = CpuAccount()
    t0 = time.monotonic()
    with open(out.parent / f"{out.name}.stderr", "w+") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        monitor = ProcessMonitor(proc.pid, monitor_interval_s, out)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            monitor.stop()
        wall = time.monotonic() - t0
        err.seek(0)
        stderr = err.read()
    return {"argv": argv, "cwd": str(cwd), "exit_code": code, "wall_s": round(wall, 2),
            "stderr_tail": stderr[-1500:] if code else "", "cpu_account": account.stop(), "monitor": monitor,
            "run": run_info(out), "summary": summary(out)}


# --- reading invocations.csv -----------------------------------------------------------------------------


class Row(NamedTuple):
    """One row of invocations.csv, typed (times in seconds since the run's t0, durations in ms)."""

    scheduled: float
    start: float
    end: float
    lag_ms: float
    latency_ms: float | None
    cold: bool
    init_ms: float | None
    duration_ms: float | None
    status: str


def _num(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def read_invocations(path: Path) -> Iterator[Row]:
    """The rows of a run's invocations.csv, one at a time. Columns common to every version of the file
    are read by name, so an older checkout's runs read the same."""
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            yield Row(float(r["scheduled_s"]), float(r["start_s"]), float(r["end_s"]), float(r["lag_ms"]),
                      _num(r["latency_ms"]), r["cold"] == "1", _num(r["init_ms"]), _num(r["duration_ms"]),
                      r["status"])


def added_ms(r: Row) -> float:
    """(end - start) - duration of an ok invocation, from invocations.csv's microsecond columns (latency -
    lag - duration; for a cold start this includes its init)."""
    return r.latency_ms - r.lag_ms - r.duration_ms


#: Statuses whose environment was busy until the supervisor ended the invocation, not for a reported time.
_CUT_SHORT = ("timeout", "crash", "init_error", "out_of_memory", "interrupted")


def ideal_peak(rows: Iterable[Row], init_ms: float | None = None) -> int:
    """The most invocations that would overlap had each started exactly at its scheduled time and taken
    its measured init + duration (throttled arrivals hold nothing): the environments an ideal control
    plane would need. Exact (a sweep over start and end events; an end at the same instant as a start
    frees its environment first). summary.json's `fidelity.ideal_peak_environments` is the same figure
    at 1 ms resolution; computed here too so a checkout without it is measured the same way.

    With `init_ms`, every cold start takes that init instead of its own: e.g. the first cold start's, which
    no other environment's start slowed down (the run's own inits grow when many start at once on a small
    machine, and so does an ideal computed from them)."""
    events: list[tuple[float, int]] = []
    for row in rows:
        if row.status == "throttled":
            continue
        init = row.init_ms if init_ms is None or row.init_ms is None else init_ms
        busy_s = ((init or 0.0) + (row.duration_ms or 0.0)) / 1000
        if row.status in _CUT_SHORT:
            busy_s = max(busy_s, row.end - row.start)
        events.append((row.scheduled, 1))
        events.append((row.scheduled + busy_s, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def invocation_figures(path: Path) -> dict[str, Any]:
    """What a run's invocations.csv says: rows by status, dispatch lag (start - scheduled, every row),
    init_ms (cold starts), duration_ms (inside the handler), the time a warm invocation spent outside its
    handler after it was dispatched (`added_ms`: (end - start) - duration_ms: thaw, the environment
    getting the CPU, its reply read) and the ideal peak of environments, also with every cold start
    taking the first one's init (`first_init_ms`, measured before any other environment competed)."""
    rows = list(read_invocations(path))
    first_init = next((r.init_ms for r in sorted(rows, key=lambda r: r.start) if r.init_ms is not None), None)
    return {
        "rows": len(rows),
        "statuses": dict(Counter(r.status for r in rows)),
        "cold_starts": sum(r.cold for r in rows),
        "dispatch_lag_ms": dist([r.lag_ms for r in rows]),
        "init_ms": dist([r.init_ms for r in rows if r.init_ms is not None]),
        "duration_ms": dist([r.duration_ms for r in rows if r.duration_ms is not None]),
        "added_ms_warm": dist([added_ms(r) for r in rows if r.status == "ok" and not r.cold]),
        "ideal_peak_environments": ideal_peak(rows),
        "first_init_ms": first_init,
        "ideal_peak_environments_first_init": ideal_peak(rows, first_init),
    }
