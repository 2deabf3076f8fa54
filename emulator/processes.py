"""Process helpers shared by the supervisor, the zygote and the database providers."""

from __future__ import annotations

import ctypes
import functools
import signal
from typing import Callable

# Loaded at import, not in a child: after a uid change (servers started as an unprivileged user) the
# child may no longer be able to read the Python installation, and forks of the zygote inherit it.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies, so nothing a run started
    outlives lambdaemu even when it is killed with SIGKILL. The kernel clears this on credential
    changes, so a child that changes user must call it after the change (subprocess runs preexec_fn
    after applying user=)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that arms `set_parent_death_signal(sig)` in the child."""
    return functools.partial(set_parent_death_signal, sig)


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
