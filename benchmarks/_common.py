"""Shared helpers for the benchmark scripts: machine facts, percentiles, the printed table, --json output,
the floor child processes, and the leftover-process check.

Benchmarks measure; they do not assert. Each script prints a small table with the figure, the floor
measured in the same run, their ratio and the target, and `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere finds the package and workloads
    sys.path.insert(0, str(REPO))


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
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


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


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--no-wait-quiet", action="store_true",
                   help="start at once instead of waiting until other processes leave the CPUs idle")
    return p


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Common start of every benchmark: subreaper, wait for a quiet machine, machine facts, and the code
    measured (checked again by `emit`)."""
    become_subreaper()
    busy = None if args.no_wait_quiet else wait_quiet()
    info = machine()
    info["cpu_busy_before_start"] = None if busy is None else round(busy, 3)
    info["code"] = code_state()
    return info


def code_state() -> dict[str, Any]:
    """Which code is measured: git HEAD, whether emulator/ or workloads/ differ from it, and a digest of
    their files. Other engineers commit to this checkout while benchmarks run, so `emit` compares the
    digest at the end with the one at the start. Read-only git commands only."""
    import hashlib

    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", *argv], cwd=REPO, capture_output=True, text=True)

    digest = hashlib.sha256()
    for path in sorted([*(REPO / "emulator").rglob("*.py"), *(REPO / "workloads").rglob("*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    dirty = git("diff", "--quiet", "HEAD", "--", "emulator", "workloads").returncode != 0
    return {"head": head, "emulator_workloads_differ_from_head": dirty, "digest": digest.hexdigest()[:16]}


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
    measured, and warns when emulator/ or workloads/ changed while the benchmark ran."""
    start = result.get("machine", {}).get("code")
    if start is not None:
        end = code_state()
        result["code_changed_during_run"] = end != start
        text += (f"\ncode: git {start['head']}"
                 + (" + uncommitted changes in emulator/ or workloads/" if start["emulator_workloads_differ_from_head"]
                    else "") + f" (digest {start['digest']})")
        if end != start:
            text += f"\nWARNING: the code changed while this ran (now git {end['head']}, digest {end['digest']})"
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def become_subreaper() -> None:
    """Make this process the reaper of every orphan it leaves (PR_SET_CHILD_SUBREAPER), so that
    `leftovers()` sees what a benchmark left running even when the parent of it has exited. Other
    engineers' processes on the same machine are not descendants and so are not reported."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


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


def cpu_busy(interval_s: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval_s` (from /proc/stat), whoever uses them."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]), idle

    t1, i1 = read()
    time.sleep(interval_s)
    t2, i2 = read()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def wait_quiet(max_busy: float = 0.10, timeout_s: float = 600.0) -> float:
    """Wait until the machine is quiet (other work on it uses < `max_busy` of all CPUs for 3 s in a row),
    so the figures are this benchmark's, not a concurrent test run's. Returns the last busy fraction."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    busy = cpu_busy()
    while time.monotonic() < deadline:
        quiet = quiet + 1 if busy < max_busy else 0
        if quiet >= 3:
            return busy
        if quiet == 0:
            log(f"machine busy ({busy:.0%} of all CPUs used by other processes); waiting for it to be quiet")
        busy = cpu_busy()
    log(f"machine still busy ({busy:.0%}) after {timeout_s:.0f} s; measuring anyway")
    return busy


class Workdir:
    """A scratch directory removed at exit. Default: under benchmarks/, the same kind of directory a real
    run writes results/<run-id>/logs to, rather than /tmp, where other test suites' leftovers have made
    creating a file cost up to ~0.7 ms on this machine (see BENCHMARKS.md)."""

    def __init__(self, base: str | None) -> None:
        import tempfile

        root = Path(base) if base else Path(__file__).resolve().parent
        self.path = Path(tempfile.mkdtemp(prefix=".work-", dir=root))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


# --- floors ------------------------------------------------------------------------------------------


def preloaded_python_argv(code: str) -> list[str]:
    """A fresh interpreter that imports emulator.environment.PRELOAD and calls gc.freeze() (as the
    zygote does), then runs `code`."""
    prelude = (
        "import gc, importlib, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from emulator.environment import PRELOAD\n"
        "for name in PRELOAD:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "gc.collect()\n"
        "gc.freeze()\n"
    )
    return [sys.executable, "-c", prelude + code]


class CpuAccount:
    """CPU used during a window: by this process, by its reaped descendants (zygote and environments, once
    the zygote has been waited for), and by the whole machine (/proc/stat), so the share used by other
    processes (e.g. a concurrent test run) is recorded next to the figures."""

    def __init__(self) -> None:
        import resource

        self._resource = resource
        self.t0 = time.monotonic()
        self.self0, self.children0 = self._own()
        self.busy0 = self._busy_s()

    def _own(self) -> tuple[float, float]:
        s = self._resource.getrusage(self._resource.RUSAGE_SELF)
        c = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    @staticmethod
    def _busy_s() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return busy / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, float]:
        """Core-seconds used since construction: `self`, `descendants`, `machine`, `others` (the rest)."""
        wall = time.monotonic() - self.t0
        s, c = self._own()
        machine = self._busy_s() - self.busy0
        mine = (s - self.self0) + (c - self.children0)
        return {"wall_s": round(wall, 2), "self_cpu_s": round(s - self.self0, 2),
                "descendants_cpu_s": round(c - self.children0, 2), "machine_cpu_s": round(machine, 2),
                "others_cpu_s": round(max(0.0, machine - mine), 2),
                "others_pct_of_machine": round(100 * max(0.0, machine - mine) / max(1e-9, wall * (os.cpu_count() or 1)), 1)}
