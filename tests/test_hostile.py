"""Hostile but fair input, with the real `lambdaemu` command: handlers that misbehave before they are
run, absurd values, output paths that cannot be written, runs killed outright, and noise on the terminal.

The promise under test is the README's: bad input is one line naming the option, the bad value and
the fix, exit status 2, with nothing started and nothing written; a run killed outright is found and
marked by `lambdaemu cleanup`; nothing but lambdaemu's own lines reaches the terminal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import psutil
import pytest

from conftest import assert_no_leftovers, cli_env
from emulator.config import RunConfig
from emulator.errors import UsageError
from emulator.plots import chart
from emulator.results import read_csv
from test_cli import LAMBDAEMU, _wait_for_status, lambdaemu

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE_DB = ["--provider", "external", "--db-url", "postgresql://u:p@127.0.0.1:1/db"]


def refused(tmp_path: Path, *args: str, flag: str) -> str:
    """Run `lambdaemu run ARGS` in `tmp_path`; assert the usage-error promise and return the line."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    result = lambdaemu("run", *args, "--results-dir", str(tmp_path / "results"), cwd=tmp_path, timeout=90,
                       tmpdir=scratch)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"lambdaemu: error: {flag}"), lines[0]
    assert not (tmp_path / "results").exists() and not list(scratch.iterdir())
    return lines[0]


def end_to_end(tmp_path: Path, postgres, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A short real run of the command against the session's PostgreSQL."""
    return lambdaemu("run", "--provider", "external", "--db-url", postgres.url, "--duration", "1", "--rps", "3",
                     "--arrivals", "constant", "--init-delay", "0", "--sample-interval", "200ms", *args, cwd=tmp_path,
                     timeout=timeout)


# --- 1. handlers are checked without running them ------------------------------------------------------


def _package(tmp_path: Path, init: str, module: str = "def handler(event, context):\n    return 1\n") -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    (package / "mod.py").write_text(module)
    return package


MARK_INIT = "import os\nopen(os.path.join(os.path.dirname(__file__), 'ran-' + str(os.getpid())), 'w').close()\n"


@pytest.mark.parametrize("init", [
    MARK_INIT + "import sys\nsys.exit(0)\n",
    MARK_INIT + "raise RuntimeError('init fails')\n",
    MARK_INIT,
], ids=["init-exits", "init-raises", "init-quiet"])
def test_package_init_is_not_run_by_validation(tmp_path, init):
    package = _package(tmp_path, init)
    line = refused(tmp_path, "--handler", "pkg.mod:missing", flag="--handler")
    assert "has no function 'missing'" in line
    assert not list(package.glob("ran-*")), "the package's __init__ ran in the CLI"


def test_validation_runs_no_user_code_before_other_checks_fail(tmp_path):
    package = _package(tmp_path, MARK_INIT)
    (tmp_path / "plain.py").write_text(MARK_INIT + "x = 1\n")
    refused(tmp_path, "--handler", "pkg.mod:handler", *UNREACHABLE_DB, flag="--db-url")
    refused(tmp_path, "--handler", "plain.sub:handler", flag="--handler")  # a module, not a package
    assert not list(package.glob("ran-*")) and not list(tmp_path.glob("ran-*"))


def test_package_that_exits_in_init_runs_and_fails_in_its_environments(tmp_path, postgres):
    package = _package(tmp_path, MARK_INIT + "import sys\nsys.exit(0)\n")
    result = end_to_end(tmp_path, postgres, "--handler", "pkg.mod:handler", "--out", str(tmp_path / "run"))
    run_dir = tmp_path / "run"
    assert (run_dir / "run.json").exists(), result.stderr[-2000:]
    statuses = {row["status"] for row in read_csv(run_dir / "invocations.csv")}
    assert statuses == {"init_error"}, statuses
    ran = {int(p.name.removeprefix("ran-")) for p in package.glob("ran-*")}
    environments = {int(row["pid"]) for row in read_csv(run_dir / "environments.csv")}
    assert ran and ran <= environments, (ran, environments)  # init ran in environments, never in the CLI
    assert "Traceback" not in result.stderr


def test_handler_with_a_latin1_coding_line_runs(tmp_path, postgres):
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nGREETING = '\xe9t\xe9'\n"
                                        b"def handler(event, context):\n    return GREETING\n")
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbfdef other(event, context):\n    return 1\n")
    assert "has no function 'handler'" in refused(tmp_path, "--handler", "bom:handler", flag="--handler")
    assert "has no function 'nope'" in refused(tmp_path, "--handler", "latin.py:nope", flag="--handler")
    result = end_to_end(tmp_path, postgres, "--handler", "latin.py:handler", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {row["status"] for row in read_csv(tmp_path / "run" / "invocations.csv")} == {"ok"}


def _symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "loop.py").symlink_to("loop.py")


def _fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "loop.py")


def _directory(tmp_path: Path) -> None:
    (tmp_path / "loop.py").mkdir()


def _huge(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text("X = 1\n" * 400_000 + "def handler(event, context):\n    return X\n")


def _binary(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_bytes(bytes(range(256)) * 8)


def _unreadable(tmp_path: Path) -> None:
    # Reading a process's memory at offset 0 fails with EIO, for root too (chmod cannot stop root).
    (tmp_path / "loop.py").symlink_to("/proc/self/mem")


@pytest.mark.parametrize("make, spec, says", [
    (_symlink_loop, "loop.py:handler", "symbolic links"),
    (_symlink_loop, "loop:handler", "symbolic links"),
    (_fifo, "loop.py:handler", "special file"),
    (_fifo, "loop:handler", "special file"),
    (_directory, "loop.py:handler", "is a directory"),
    (_directory, "loop:handler", "is a directory"),
    (_huge, "loop.py:handler", "larger than 1 MiB"),
    (_huge, "loop:handler", "larger than 1 MiB"),
    (_binary, "loop.py:handler", "loop.py"),
    (_unreadable, "loop.py:handler", "cannot read"),
    (_unreadable, "loop:handler", "cannot read"),
], ids=["loop-file", "loop-module", "fifo-file", "fifo-module", "dir-file", "dir-module", "huge-file",
        "huge-module", "binary", "unreadable-file", "unreadable-module"])
def test_odd_handler_files_are_one_line_exit_2(tmp_path, make, spec, says):
    make(tmp_path)
    # Unreachable database: if validation wrongly accepted the handler, the run still starts nothing.
    line = refused(tmp_path, "--handler", spec, *UNREACHABLE_DB, flag="--handler")
    assert says in line, line


def test_namespace_package_has_no_function(tmp_path):
    (tmp_path / "space" / "inner").mkdir(parents=True)
    (tmp_path / "space" / "inner" / "app.py").write_text("def handler(event, context):\n    return 1\n")
    assert "namespace package" in refused(tmp_path, "--handler", "space:handler", *UNREACHABLE_DB, flag="--handler")
    refused(tmp_path, "--handler", "space.inner.app:handler", *UNREACHABLE_DB, flag="--db-url")


def test_handler_found_on_pythonpath_as_environments_would(tmp_path):
    lib = tmp_path / "lib"
    (lib / "deep").mkdir(parents=True)
    (lib / "deep" / "__init__.py").write_text("")
    (lib / "deep" / "app.py").write_text("def handler(event, context):\n    return 1\n")
    env = {**cli_env(), "PYTHONPATH": str(lib)}
    result = subprocess.run([*LAMBDAEMU, "run", "--handler", "deep.app:nope", "--results-dir", "r"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "has no function 'nope'" in result.stderr, result.stderr


# --- 2. absurd values ------------------------------------------------------------------------------------

HUGE = "1" + "0" * 400


@pytest.mark.parametrize("args, flag, says", [
    (["--rps", HUGE], "--rps", "is not valid"),
    (["--duration", HUGE], "--duration", "is not valid"),
    (["--work", HUGE + "ms"], "--work", "is not valid"),
    (["--scale-rate", f"10/{HUGE}s"], "--scale-rate", "is not valid"),
    (["--scale-rate", "1000000000000/10s"], "--scale-rate", "1 to 100000"),
    (["--pool-max", str(10**30)], "--pool-max", "1 to 10000"),
    (["--concurrency-limit", str(10**9)], "--concurrency-limit", "1 to 100000"),
    (["--memory", str(10**12)], "--memory", "16 to 10240"),
    (["--timeout", "100h"], "--timeout", "up to 15m"),
    (["--env-idle-ttl", "100000h"], "--env-idle-ttl", "up to 168h"),
    (["--max-connections", str(10**7)], "--max-connections", "3 to 262143"),
    (["--seed", str(10**40)], "--seed", "out of range"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_absurd_values_are_refused_with_the_range(tmp_path, args, flag, says):
    line = refused(tmp_path, *args, *UNREACHABLE_DB, flag=flag)
    assert says in line and len(line) < 300, line


def test_env_messages_show_the_bad_item_and_the_limit(tmp_path):
    line = refused(tmp_path, "--env", "GOOD=1", "--env", "NOEQUALS", flag="--env")
    assert "'NOEQUALS'" in line and "(" not in line.split("--env:")[1].split("is not")[0], line
    line = refused(tmp_path, "--env", "BIG=" + "x" * 5000, *UNREACHABLE_DB, flag="--env")
    assert "4096 bytes" in line


@pytest.mark.parametrize("settings", [
    {"rps": float("inf")}, {"duration_s": float("inf")}, {"timeout_s": 1e300}, {"pool_max": 10**30},
    {"scale_rate": (10**12, 10.0)}, {"scale_rate": (10, float("inf"))}, {"init_limit_s": 1e9},
])
def test_python_api_refuses_the_same_values(settings):
    with pytest.raises(UsageError, match="out of range|is not valid"):
        RunConfig(**settings)


def _silent_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(60)
    return server


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_ctrl_c_while_validating_is_130_not_aborted(tmp_path, scheme):
    server = _silent_server()
    url = f"{scheme}://u:p@127.0.0.1:{server.getsockname()[1]}/db"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--db-url", url, "--results-dir", str(tmp_path / "results")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        client, _ = server.accept()  # lambdaemu is now waiting on the server: validation is under way
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    assert proc.returncode == 130, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "results").exists()
    client.close()


def test_readme_states_each_range_and_why():
    readme = (ROOT / "README.md").read_text()
    assert "| `--pool-max` | 1 to 10000 |" in readme
    assert "| `--timeout` | above 0, up to 15m | Lambda's longest function timeout" in readme
