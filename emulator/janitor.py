"""The janitor: a small process that cleans up after a run whose own process died without doing it.

A run's children die with it (PR_SET_PDEATHSIG), but a `kill -9` of lambdaemu still leaves work
directories, run.json saying `running`, processes a handler detached from its environment, and
containers. So every run starts a janitor first, in its own session (a Ctrl-C or a kill of the run's
process group does not reach it), holding the read end of a pipe whose write end only the run holds. A
run that ends normally writes `done` and closes the pipe: the janitor exits. If the pipe closes without
`done`, the run is gone however it died, and the janitor does what `lambdaemu cleanup` would do for that
run (`cleanup.cleanup_run`): it ends every process labelled with the run id, stops the servers of the
run's work directories and removes them, and marks run.json `killed` with its summary recomputed (the
same ideas as testcontainers' Ryuk, without a container).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from .processes import child_pythonpath, wait_or_kill


class Janitor:
    """The run's handle on its janitor process."""

    def __init__(self, run_id: str, run_dir: Path, log_path: Path) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._pipe: IO[bytes] | None = None

    def start(self) -> None:
        """Start the janitor; from now on, this process dying without `done()` triggers its clean-up."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from emulator.janitor import janitor_main; "
                 "janitor_main(sys.argv[1], sys.argv[2])", self.run_id, str(self.run_dir.resolve())],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": child_pythonpath()},
            )
        self._pipe = self.proc.stdin

    def done(self, timeout_s: float = 5.0) -> None:
        """The run cleaned up after itself: let the janitor go. Idempotent."""
        if self._pipe is not None:
            try:
                self._pipe.write(b"done\n")
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        if self.proc is not None:
            wait_or_kill(self.proc, timeout_s)
            self.proc = None


def janitor_main(run_id: str, run_dir: str) -> None:
    """Wait for the run's pipe to close; clean up unless the run said it was done."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    data = sys.stdin.buffer.read()  # returns at EOF: the run closed the pipe or died
    if data.strip().endswith(b"done"):
        return
    from .cleanup import cleanup_run

    for line in cleanup_run(run_id, Path(run_dir)):
        print(line, flush=True)
