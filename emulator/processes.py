"""Process helpers shared by the supervisor, the zygote and the database providers."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

# Loaded at import, not in a child: after a uid change (servers started as an unprivileged user) the
# child may no longer be able to read the Python installation, and forks of the zygote inherit it.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies, so nothing a run started
    outlives lambdaemu even when it is killed with SIGKILL. The kernel clears this on credential
    changes, so a child that changes user must call it after the change (subprocess runs preexec_fn
    after applying user=)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    """Make this process the parent of every orphan among its descendants (instead of init), so
    processes that detached themselves (double fork, setsid) can still be found and ended."""
    _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that arms `set_parent_death_signal(sig)` in the child."""
    return functools.partial(set_parent_death_signal, sig)


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (environments lead their own group, so whatever a
    handler spawned is frozen, thawed and killed with it); fall back to the pid alone in the instant
    before the child has called setpgid. A process already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:
        pass


def child_pythonpath() -> str:
    """PYTHONPATH for the interpreters a run starts (zygote, sampler, janitor): this package and the
    user's handler modules must import from where the user runs."""
    here = str(Path(__file__).resolve().parent.parent)
    parts = [os.getcwd(), here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def wait_or_kill(proc: subprocess.Popen, timeout_s: float, *, group: bool = False) -> None:
    """Wait up to `timeout_s` for `proc` to exit, then SIGKILL it (its whole process group when `group`)
    and reap it."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        if group:
            signal_group(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(5)


def process_identity(pid: int | None = None) -> dict[str, float]:
    """`{"pid", "started"}` for a process (this one by default): its pid with its start time, so a later
    process that reuses the pid is not mistaken for it."""
    import psutil

    proc = psutil.Process(pid)
    return {"pid": proc.pid, "started": round(proc.create_time(), 2)}


def identity_alive(identity: object) -> bool:
    """Whether the process `process_identity()` described is still running (not a zombie either)."""
    import psutil

    try:
        proc = psutil.Process(int(identity["pid"]))  # type: ignore[index]
        # create_time is the boot time plus the start in clock ticks, and the boot time psutil derives
        # can move by a fraction of a second; a reused pid needs the pid counter to wrap, far longer.
        same = abs(proc.create_time() - float(identity["started"])) < 1.0  # type: ignore[index]
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


#: Where environments take their lower priority (`environment_sessions`).
OWN_SESSIONS, ZYGOTE_SESSION = "own", "zygote"
_CAP_SYS_ADMIN = 21


def environment_sessions() -> str:
    """Where environments should run on this machine so that they yield the CPU to the control plane.

    On kernels that schedule by session (autogroup: /proc/sys/kernel/sched_autogroup_enabled), the CPU
    is shared between sessions first and a nice value counts only within its session. With
    CAP_SYS_ADMIN (root) each environment leads a session of its own and sets that session's autogroup
    nice (`OWN_SESSIONS`). Without it the kernel accepts one autogroup change per 100 ms for the whole
    machine (EAGAIN otherwise), so a burst of environments would keep nice 0 in sessions of their own,
    each weighing as much as the supervisor's (measured: dispatch lag p99 19-42 ms at 167 req/s on 2
    CPUs); they stay in the zygote's session instead (`ZYGOTE_SESSION`), which weighs as one session
    against the supervisor's, and their nice value counts against the zygote within it (lag p99 1.3 ms,
    inits slower). Without autogroup the nice value alone counts and sessions do not matter."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            autogroup = fh.read().strip() == "1"
    except OSError:
        autogroup = False
    return OWN_SESSIONS if not autogroup or _has_capability(_CAP_SYS_ADMIN) else ZYGOTE_SESSION


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def lower_priority(nice: int, *, session: bool = True) -> None:
    """Run this process (and what it starts) at scheduling priority `nice`: its own nice value, and, with
    `session` (it leads its session) on kernels that schedule by session, its session's autogroup nice
    (see `environment_sessions`). Lowering is always allowed; a kernel without autogroups has no file,
    and a change the kernel refuses (rate-limited without CAP_SYS_ADMIN) leaves the session at nice 0."""
    os.nice(nice)
    if not session:
        return
    try:
        with open("/proc/self/autogroup", "w") as fh:
            fh.write(str(nice))
    except OSError:
        pass
