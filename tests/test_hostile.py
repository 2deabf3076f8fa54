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

from emulator.config import RunConfig
from emulator.errors import UsageError
from emulator.plots import chart
from emulator.processes import process_identity
from emulator.results import read_csv
from conftest import LAMBDAEMU, assert_no_leftovers, cli_env, kill_janitor, lambdaemu, wait_for_status

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
    # ... and in the baseline environment timed before the load, which is not one of the run's.
    environments |= {b["pid"] for b in json.loads((run_dir / "run.json").read_text())["baseline"].values()}
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
    (["--max-connections", str(10**7)], "--max-connections", "1 to 262143"),
    (["--max-connections", "1000000"], "--max-connections", "1 to 262143"),
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
    # Ctrl-C at its default in the CLI, as from a terminal, whatever this test run inherited: a suite
    # started in the background by a non-interactive shell has SIGINT ignored, and so would the CLI.
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--db-url", url, "--results-dir", str(tmp_path / "results")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# --- 3. output paths --------------------------------------------------------------------------------------


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys/devices")  # sysfs refuses new directories even to root
    tmp_path.chmod(0o555)
    return tmp_path


@pytest.mark.parametrize("option, make, says", [
    ("--out", lambda t: t / "afile", "is not a directory"),
    ("--out", lambda t: t / "afile" / "run", "cannot be created"),
    ("--results-dir", lambda t: t / "afile", "is not a directory"),
    ("--out", lambda t: Path("/proc/lambdaemu-test/run"), "cannot write"),
    ("--out", lambda t: Path("/proc/self"), "cannot write"),
    ("--out", lambda t: _read_only_dir(t) / "lambdaemu-test-run", "cannot write"),
    ("--out", lambda t: t / ("x" * 300), "cannot"),
], ids=["out-file", "out-under-file", "results-dir-file", "proc", "proc-self", "read-only", "name-too-long"])
def test_unwritable_output_is_one_line_exit_2(tmp_path, option, make, says):
    (tmp_path / "afile").write_text("not a directory\n")
    target = make(tmp_path)
    args = ["run", option, str(target), *UNREACHABLE_DB]
    if option == "--out":
        args += ["--results-dir", str(tmp_path / "results")]
    result = subprocess.run([*LAMBDAEMU, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=cli_env())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"lambdaemu: error: {option}: ") and str(target) in lines[0], lines[0]
    assert says in lines[0], lines[0]
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "not a directory\n"


def test_out_holding_an_earlier_run_needs_force(tmp_path, postgres):
    out = tmp_path / "run"
    first = end_to_end(tmp_path, postgres, "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    first_id = json.loads((out / "run.json").read_text())["run_id"]
    (out / "logs" / "env-99999.log").write_text("from the first run\n")
    (out / "notes.txt").write_text("the user's own file\n")

    again = end_to_end(tmp_path, postgres, "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"already holds run {first_id}" in again.stderr and "--force" in again.stderr
    assert json.loads((out / "run.json").read_text())["run_id"] == first_id

    forced = end_to_end(tmp_path, postgres, "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["run_id"] != first_id and run["status"] == "complete"
    assert not (out / "logs" / "env-99999.log").exists()  # nothing of the first run is mixed in
    assert (out / "notes.txt").read_text() == "the user's own file\n"  # what lambdaemu did not write stays


@pytest.mark.parametrize("content", [b'{"not": "a run"}', b"\x00junk", b"[1, 2]"])
def test_force_never_empties_a_directory_lambdaemu_did_not_write(tmp_path, content):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "run.json").write_bytes(content)
    (out / "samples.csv").write_text("their data\n")
    line = refused(tmp_path, "--out", str(out), "--force", flag="--out")
    assert "not a lambdaemu run directory" in line
    assert (out / "samples.csv").read_text() == "their data\n" and (out / "run.json").read_bytes() == content


# --- 4. runs killed outright ------------------------------------------------------------------------------


def _fake_run(results: Path, name: str, status: str, owner: dict | None) -> Path:
    run_dir = results / name
    (run_dir / "logs").mkdir(parents=True)
    info = {"run_id": name, "status": status, "config": {"duration_s": 10}}
    if owner is not None:
        info["owner"] = owner
    (run_dir / "run.json").write_text(json.dumps(info))
    return run_dir


def test_cleanup_marks_a_run_killed_with_sigkill(tmp_path, postgres):
    results = tmp_path / "results"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--provider", "external", "--db-url", postgres.url, "--rps", "20",
                             "--duration", "60", "--work", "50ms", "--init-delay", "0", "--sample-interval",
                             "200ms", "--results-dir", str(results)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**cli_env(), "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while not list(results.glob("*/run.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        run_dir = next(results.glob("*"))
        owner = json.loads((run_dir / "run.json").read_text())["owner"]  # there from the first write
        assert owner == process_identity(proc.pid)
        wait_for_status(run_dir / "run.json", "running")
        time.sleep(2.5)
        # While it runs, nobody may take its directory, not even with --force; cleanup leaves it alone.
        taken = lambdaemu("run", "--out", str(run_dir), "--force", *UNREACHABLE_DB, cwd=tmp_path)
        assert taken.returncode == 2 and "still going" in taken.stderr, taken.stderr
        alive = lambdaemu("cleanup", "--results-dir", str(results), cwd=tmp_path, tmpdir=tmp_path)
        assert "marked" not in alive.stdout
        tree = psutil.Process(proc.pid).children(recursive=True)
        # The run's janitor would mark it killed at once; here it goes down with the run (a machine that
        # crashed), so only `lambdaemu cleanup` is left to notice.
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        kill_janitor(run_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()  # never read: the run was killed before it could say anything
    psutil.wait_procs(tree, timeout=10)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "running" and not (run_dir / "summary.json").exists()
    with open(run_dir / "invocations.csv", "a") as fh:
        fh.write("999999,half-written-row")  # what a kill in the middle of a write leaves

    result = lambdaemu("cleanup", "--results-dir", str(results), cwd=tmp_path, tmpdir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"marked {run_dir} killed" in result.stdout
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "killed" and run["killed_noticed_at"] and str(proc.pid) in run["error"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_csv(run_dir / "invocations.csv")
    assert summary["status"] == "killed" and summary["invocations"] == len(rows) > 10
    assert "999999" not in [row["seq"] for row in rows]
    assert 1.0 < run["load_window_s"] < 60 and summary["achieved_rps"] > 5
    assert (run_dir / "chart.png").stat().st_size > 0
    assert_no_leftovers(run["run_id"])
    again = lambdaemu("cleanup", "--results-dir", str(results), cwd=tmp_path, tmpdir=tmp_path)
    assert again.stdout.strip() == "nothing to clean up"


def test_cleanup_tells_live_owners_reused_pids_and_unknown_owners_apart(tmp_path):
    results = tmp_path / "results"
    me = process_identity()
    live = _fake_run(results, "live", "running", me)
    reused = _fake_run(results, "reused", "running", {"pid": me["pid"], "started": me["started"] - 3600})
    unknown = _fake_run(results, "unknown", "running", None)
    done = _fake_run(results, "done", "complete", {"pid": 1, "started": 0})
    result = lambdaemu("cleanup", "--results-dir", str(results), cwd=tmp_path, tmpdir=tmp_path)
    assert result.returncode == 0, result.stderr
    status = {d.name: json.loads((d / "run.json").read_text())["status"] for d in (live, reused, unknown, done)}
    assert status == {"live": "running", "reused": "killed", "unknown": "running", "done": "complete"}
    assert (reused / "summary.json").exists() and (reused / "chart.png").exists()


# --- 5. noise ------------------------------------------------------------------------------------------


def _only_lambdaemu_lines(stderr: str) -> None:
    for marker in ("Warning", "Traceback", 'File "', "warn("):
        assert marker not in stderr, stderr


def test_run_stopped_while_starting_prints_no_warning(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--duration", "60", "--out", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        wait_for_status(out / "run.json", "starting")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    _only_lambdaemu_lines(stderr)
    assert (out / "chart.png").exists()


def test_failed_run_prints_only_lambdaemu_lines(tmp_path, postgres):
    (tmp_path / "broken.py").write_text("import no_such_dependency_anywhere\n\n"
                                        "def handler(event, context):\n    return 1\n")
    result = end_to_end(tmp_path, postgres, "--handler", "broken.py:handler", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    _only_lambdaemu_lines(result.stderr)
    assert "no_such_dependency_anywhere" in result.stdout  # the reason is still said, with the summary


def test_chart_of_a_run_that_recorded_nothing_warns_nothing(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "x", "status": "failed"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chart(tmp_path)
    assert (tmp_path / "chart.png").stat().st_size > 0
