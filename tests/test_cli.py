"""The `lambdaemu` command as a user runs it: as a subprocess, with real databases and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import click
import psutil
import pytest

from conftest import LAMBDAEMU, assert_no_leftovers, cli_env, lambdaemu, lambdaemu_servers, wait_for_status
from emulator.cli import main

def test_every_command_and_option_has_help():
    for name, command in main.commands.items():
        assert command.help, f"command {name} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


def test_run_json_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = lambdaemu("run", "--rps", "15", "--duration", "3", "--work", "100ms", "--json", "--out", str(out),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("target_rps", "achieved_rps", "invocations", "cold_starts", "throttles", "errors",
                "peak_connections", "max_connections", "peak_environments", "latency_ms"):
        assert key in summary
    assert summary["max_connections"] == 100
    assert summary["invocations"] > 20 and summary["errors"]["total"] == 0
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99"}
    for name in ("run.json", "samples.csv", "invocations.csv", "environments.csv", "summary.json", "chart.png"):
        assert (out / name).stat().st_size > 0, name
    assert any((out / "logs").glob("env-*.log"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["database"]["provider"] == "embedded"
    # No credential is written to results.
    password_like = [line for line in (out / "run.json").read_text().splitlines() if "password" in line.lower()]
    assert not password_like
    assert not lambdaemu_servers(out)
    assert_no_leftovers(run["run_id"])


@pytest.mark.parametrize("args, flag", [
    (["--rps", "0"], "--rps"),
    (["--rps", "-5"], "--rps"),
    (["--rps", "lots"], "--rps"),
    (["--duration", "0"], "--duration"),
    (["--duration", "5x"], "--duration"),
    (["--duration", "-1s"], "--duration"),
    (["--provider", "cloud"], "--provider"),
    (["--handler", "no_such_module_here:handler"], "--handler"),
    (["--handler", "workloads.sqlalchemy_pool:no_such_function"], "--handler"),
    (["--handler", "missing_file.py:handler"], "--handler"),
    (["--handler", "no-colon"], "--handler"),
    (["--provider", "external", "--db-url", "postgresql://u:secretpw@127.0.0.1:1/db"], "--db-url"),
    (["--provider", "external"], "--db-url"),
    (["--db-url", "postgresql://u:p@127.0.0.1:1/db"], "--db-url"),
    (["--env", "NOEQUALS"], "--env"),
    (["--scale-rate", "1000"], "--scale-rate"),
])
def test_bad_input_is_one_line_exit_2_nothing_started(tmp_path, args, flag):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = lambdaemu("run", *args, "--results-dir", str(tmp_path / "results"), cwd=tmp_path, timeout=60,
                       tmpdir=scratch)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert "secretpw" not in result.stderr
    # Nothing started, nothing written: no run directory, no server work directory.
    assert not (tmp_path / "results").exists()
    assert not list(scratch.iterdir())


def test_handler_with_syntax_error_is_a_usage_error(tmp_path):
    (tmp_path / "broken.py").write_text("def handler(event, context)\n    return 1\n")
    result = lambdaemu("run", "--handler", "broken.py:handler", "--results-dir", "r", cwd=tmp_path)
    assert result.returncode == 2
    assert "--handler" in result.stderr and "syntax error" in result.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_everything_and_marks_the_run(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--rps", "30", "--duration", "60", "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        wait_for_status(out / "run.json", "running")
        time.sleep(2.0)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any("zygote_main" in " ".join(p.cmdline()) for p in tree)
        assert len(tree) >= 5  # zygote, environments, database server processes
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, proc.stderr.read()
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and run["signal"] == signal.Signals(sig).name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["invocations"] > 10
    assert (out / "chart.png").exists()
    assert not lambdaemu_servers(out)


def test_signal_during_database_start_cleans_up(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--duration", "60", "--out", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    wait_for_status(out / "run.json", "starting")
    time.sleep(0.3)
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode == 130
    tree += [p for p in tree if p.is_running()]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not lambdaemu_servers(out)
