"""Process helpers shared by the supervisor, the zygote and the database providers."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import time
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


#: The kernel's limit on autogroup changes by a process without CAP_SYS_ADMIN: one per this many seconds,
#: for the whole machine (EAGAIN in between).
_AUTOGROUP_RATE_LIMIT_S = 0.1


def lower_session_priority(nice: int, attempts: int = 5) -> None:
    """Give this process's session the scheduling priority `nice`, for every process in it (read back with
    `session_nice`).

    Linux kernels with autogroup (/proc/sys/kernel/sched_autogroup_enabled) share the CPU between
    sessions first, and a process's own nice value counts only against the others of its session. The
    zygote calls this for the session every environment runs in, so that all of them together weigh as
    one low-priority session against the supervisor's, the sampler's and the database server's, however
    many there are. (An environment leading a session of its own would weigh as much as the supervisor at
    any nice: measured on 2 CPUs at 500 req/s from no environment, dispatch lag p99 335 ms against 1.8
    ms.) Lowering is always allowed; without CAP_SYS_ADMIN the kernel accepts one change per 100 ms for
    the whole machine, so a refused write is tried again a few times."""
    for attempt in range(attempts):
        try:
            with open("/proc/self/autogroup", "w") as fh:
                fh.write(str(nice))
            return
        except FileNotFoundError:
            return  # a kernel without autogroup
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(_AUTOGROUP_RATE_LIMIT_S)


def session_nice(pid: int) -> int | None:
    """The autogroup nice of `pid`'s session ("/autogroup-42 nice 10"), or None where the kernel does not
    schedule by session."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            if fh.read().strip() != "1":
                return None
        with open(f"/proc/{pid}/autogroup") as fh:
            return int(fh.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
