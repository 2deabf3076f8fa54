"""The control plane under hostile conditions, with real processes: lambdaemu killed with SIGKILL, signals
at any point of the shutdown, a stopped or killed zygote, environments that send junk or detach
daemons, exits racing their own reports, and overload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import LAMBDAEMU, Scenario, cli_env, lambdaemu_servers, wait_for_status, write_handler
from emulator import load
from emulator.cleanup import labelled_processes
from emulator.config import FunctionConfig, RunConfig
from emulator.events import Events
from emulator.loop import Loop
from emulator.processes import session_nice
from emulator.runner import _Signals, run
from emulator.supervisor import Supervisor
from emulator.zygote import SESSION_NICE_MAX, ZygoteClient


def by_seq(rows):
    return sorted(rows, key=lambda r: int(r["seq"]))


def start_cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "run"
    proc = subprocess.Popen([*LAMBDAEMU, "run", *args, "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    return proc, out


def run_id_of(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def workdirs(run_id: str) -> list[Path]:
    import tempfile

    return list(Path(tempfile.gettempdir()).glob(f"lambdaemu-{run_id}-*"))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"still not true after {timeout:g}s: {what}")


def test_kill_9_of_lambdaemu_leaves_nothing_of_the_run(tmp_path):
    proc, out = start_cli(tmp_path, "--rps", "20", "--duration", "60", "--work", "100ms")
    try:
        wait_for_status(out / "run.json", "running")
        time.sleep(1.5)
        run_id = run_id_of(out)
        assert labelled_processes(run_id) and lambdaemu_servers(out) and workdirs(run_id)
        proc.kill()  # SIGKILL: lambdaemu gets no chance to clean up itself
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # No `lambdaemu cleanup`: the run's children die with it, and its janitor does the rest.
    wait_until(lambda: not labelled_processes(run_id), 30, "environments and the zygote gone")
    wait_until(lambda: not lambdaemu_servers(out), 30, "database servers gone")
    wait_until(lambda: not workdirs(run_id), 30, "work directories removed")
    wait_until(lambda: json.loads((out / "run.json").read_text())["status"] == "killed", 30, "run.json says killed")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "killed" and summary["invocations"] > 10


def test_signals_found_in_the_wakeup_pipe_together_are_taken_lowest_number_first():
    # Ctrl-C's C-level handler can be interrupted by a SIGTERM sent microseconds later before it writes
    # its own byte: the pipe then says TERM, INT. Bytes read together are simultaneous: kernel order.
    signals = _Signals()
    signals.install()
    signals.phase = "loop"  # in set-up a signal unwinds the set-up instead
    try:
        os.write(signals._order_w, bytes([signal.SIGTERM, signal.SIGINT]))
        signals._handle(signal.SIGTERM, None)
        signals._handle(signal.SIGINT, None)  # its byte was taken by the first call: adds nothing
        os.write(signals._order_w, bytes([signal.SIGHUP]))
        signals._handle(signal.SIGHUP, None)  # later, alone: after the others whatever its number
        assert signals.received == [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        assert signals.fast
    finally:
        signals.restore()


@pytest.mark.parametrize("delay_s", [0.0, 0.1, 0.4, 1.0])
def test_a_second_signal_at_any_point_of_the_shutdown_leaves_nothing(tmp_path, delay_s):
    # Environments that ignore SIGTERM make the clean-up wait its grace period, so the second signal
    # lands inside it (or, at 0 s, before the loop has even seen the first).
    handler = write_handler(tmp_path, """
        import signal, time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        def handler(event, context):
            time.sleep(0.1)
    """)
    proc, out = start_cli(tmp_path, "--handler", handler, "--rps", "30", "--duration", "60")
    try:
        wait_for_status(out / "run.json", "running")
        time.sleep(1.5)
        run_id = run_id_of(out)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr  # the first signal says why the run ended
    assert "stopped fast" in stderr
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    assert not labelled_processes(run_id) and not lambdaemu_servers(out) and not workdirs(run_id)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGINT"
    assert json.loads((out / "summary.json").read_text())["invocations"] > 10


def test_sighup_stops_the_run_like_sigterm(tmp_path):
    proc, out = start_cli(tmp_path, "--rps", "20", "--duration", "60", "--work", "50ms")
    try:
        wait_for_status(out / "run.json", "running")
        time.sleep(1.0)
        run_id = run_id_of(out)
        proc.send_signal(signal.SIGHUP)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGHUP"
    assert not labelled_processes(run_id) and not lambdaemu_servers(out)


def test_ctrl_c_takes_effect_under_overload(tmp_path):
    handler = write_handler(tmp_path, """
        def handler(event, context):
            return None
    """)
    # Far more arrivals than the loop can take: most are throttled at a small concurrency limit, and
    # the loop never catches up with its schedule.
    proc, out = start_cli(tmp_path, "--handler", handler, "--rps", "20000", "--duration", "30s",
                          "--concurrency-limit", "50", "--init-delay", "0")
    try:
        wait_for_status(out / "run.json", "running")
        time.sleep(2.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    # A stop that waited for the backlog would take the rest of the 30 s schedule (and more).
    assert took < 20, f"stopping took {took:.1f}s"
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_an_environment_that_reports_oom_and_exits_is_never_a_crash(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import time

        def handler(event, context):
            hog = bytearray(160 * 1024 * 1024)  # past the 128 MB memory size
            for i in range(0, len(hog), 4096):
                hog[i] = 1
            time.sleep(0.5)
    """)
    # Every invocation ends its environment, and they all do so at about the same moment: the zygote's
    # exit reports come in bunches, read in one go, often before the environments' own "oom" reports.
    # Thirty environments touching 160 MB at once take two CPUs 2-5 s (they share one session with the
    # zygote, which forks their replacements meanwhile): the timeout is only there to end a lost one.
    s = scenario([0.001 * i for i in range(30)], handler=handler, memory_mb=128, timeout_s=15)
    assert s.statuses() == ["out_of_memory"] * 30
    assert {r["end_reason"] for r in s.environments} == {"out_of_memory"}


def _zygote_of(run_id: str) -> psutil.Process:
    for proc in labelled_processes(run_id):
        if "zygote_main" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError("no zygote found")


def _run_in_thread(config: RunConfig, arrivals: list[float]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        box["result"] = run(config, arrivals=load.fixed(arrivals), handle_signals=False)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_a_zygote_that_stops_answering_fails_cold_starts_through_the_init_limit(tmp_path, postgres):
    handler = write_handler(tmp_path, """
        import time

        def handler(event, context):
            time.sleep(0.2)
    """)
    out = tmp_path / "run"
    config = RunConfig(provider="external", db_url=postgres.url, out=str(out), handler=handler, init_delay_s=0,
                       init_limit_s=1.0, duration_s=3, sample_interval_s=0.2)
    # 20 cold starts at once while the zygote is stopped: more than the spares it forked ahead and
    # handed to the supervisor (8 for this load), which start environments without asking it anything.
    thread, box = _run_in_thread(config, [0.0, 2.0] + [2.01 + 0.001 * i for i in range(20)])
    wait_for_status(out / "run.json", "running")
    zygote = _zygote_of(run_id_of(out))
    time.sleep(1.0)
    zygote.suspend()  # SIGSTOP: it can no longer answer spawn requests
    time.sleep(3.0)  # past the arrivals at 2.0x and their 1 s init limit
    zygote.resume()
    thread.join(60)
    s = Scenario(box["result"])
    rows = by_seq(s.invocations)
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "ok" and rows[1]["cold"] == "0"
    spares = s.run["zygote_reserve"]["forked"]
    burst = rows[2:]
    assert all(r["cold"] == "1" for r in burst)
    started = [r for r in burst if r["status"] == "ok"]
    assert len(started) == spares  # the spares the supervisor held, topped up before the zygote stopped
    late = [r for r in burst if r["status"] != "ok"]
    assert len(late) == 20 - spares > 0
    assert all(r["status"] == "timeout" and "init phase exceeded" in r["message"] for r in late)
    assert s.result.status == "complete"
    assert not labelled_processes(s.run["run_id"])


def test_a_zygote_that_dies_ends_the_run_with_a_clear_message(tmp_path, postgres):
    out = tmp_path / "run"
    config = RunConfig(provider="external", db_url=postgres.url, out=str(out), init_delay_s=0, work_s=0.05,
                       duration_s=10, sample_interval_s=0.2)
    thread, box = _run_in_thread(config, [0.1 * i for i in range(100)])
    wait_for_status(out / "run.json", "running")
    time.sleep(1.0)
    _zygote_of(run_id_of(out)).kill()
    thread.join(60)
    result = box["result"]
    assert result.status == "failed" and result.exit_code == 1
    assert "zygote exited" in result.error and "zygote.log" in result.error
    assert len(result.error.splitlines()) == 1
    assert not labelled_processes(run_id_of(out))


def test_junk_on_the_channel_costs_only_that_environment(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import json, os, socket, stat

        def _channel():
            for fd in range(3, 256):
                try:
                    if stat.S_ISSOCK(os.fstat(fd).st_mode):
                        sock = socket.socket(fileno=os.dup(fd))
                        if sock.type == socket.SOCK_SEQPACKET:
                            return sock
                        sock.detach()
                except OSError:
                    pass

        def handler(event, context):
            seq = event["seq"]
            if seq == 2:
                _channel().send(b"\\x00\\xffnot a message\\x80")
            elif seq == 4:
                _channel().send(b"x" * 70000)  # larger than any message may be
            elif seq == 6:
                _channel().send(json.dumps(["result", "not-this-request", "ok", "", "", "", 1.0]).encode())
            elif seq == 8:
                _channel().send(json.dumps(["result", context.aws_request_id, "ok", "", "", "", -5]).encode())
            elif seq == 10:
                raise type("E" * 100_000, (Exception,), {})("m" * 100_000)
    """)
    s = scenario([0.25 * i for i in range(12)], handler=handler)
    rows = by_seq(s.invocations)
    for seq in (2, 4, 6, 8):
        assert rows[seq - 1]["status"] == "crash", rows[seq - 1]
        assert rows[seq - 1]["error_kind"] == "runtime_error"
        assert "invalid message" in rows[seq - 1]["message"]
    assert rows[9]["status"] == "handler_error" and len(rows[9]["error_type"]) <= 200
    others = [r["status"] for r in rows if int(r["seq"]) not in (2, 4, 6, 8, 10)]
    assert others == ["ok"] * 7
    assert s.result.status == "complete"
    assert {r["end_reason"] for r in s.environments} >= {"runtime_error"}


def daemon_handler(tmp_path: Path, pids: Path, then: str) -> str:
    """A handler that starts a daemon (double fork, setsid: out of its environment's process group) which
    writes its pid to `pids` and sleeps, then runs `then` (Python code with `event`)."""
    return write_handler(tmp_path, f"""
        import os, time

        def handler(event, context):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    with open({str(pids)!r}, "a") as fh:
                        fh.write(f"{{os.getpid()}}\\n")
                    time.sleep(600)
                os._exit(0)
            {then}
    """)


def test_a_daemon_a_handler_detaches_ends_with_its_environment(tmp_path, scenario):
    pids = tmp_path / "daemons"
    # The first invocation runs past the timeout: that environment is reset.
    handler = daemon_handler(tmp_path, pids, 'time.sleep(0.2 + 5 * (event["seq"] == 1))')
    s = scenario([0.0, 2.0, 2.5], handler=handler, timeout_s=1.0)
    assert by_seq(s.invocations)[0]["status"] == "timeout"
    daemons = [int(p) for p in pids.read_text().split()]
    assert len(daemons) == 3
    _, alive = psutil.wait_procs([psutil.Process(p) for p in daemons if psutil.pid_exists(p)], timeout=5)
    assert not alive
    assert not labelled_processes(s.run["run_id"])


def test_a_daemon_is_killed_when_its_environment_is_reset_mid_run(tmp_path, postgres):
    pids = tmp_path / "daemons"
    handler = daemon_handler(tmp_path, pids, "time.sleep(5)  # past the timeout: the environment is reset")
    out = tmp_path / "run"
    config = RunConfig(provider="external", db_url=postgres.url, out=str(out), handler=handler, init_delay_s=0,
                       timeout_s=1.0, duration_s=5)
    thread, box = _run_in_thread(config, [0.0, 4.5])
    wait_until(lambda: pids.exists() and pids.read_text().strip(), 30, "the daemon started")
    daemon = int(pids.read_text().split()[0])
    # The environment times out at 1 s and is killed; its daemon goes with it, long before the run ends.
    wait_until(lambda: not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE,
               3.0, "the daemon of a reset environment ended")
    assert thread.is_alive()
    thread.join(60)
    assert box["result"].status == "complete"


def test_environments_run_at_the_lower_priority_in_the_zygotes_session(tmp_path):
    # Every environment: a process group of its own (what the supervisor freezes, thaws and ends, with
    # whatever the handler started), nice --env-nice, in the zygote's session, which weighs as one
    # session at --env-nice (at most SESSION_NICE_MAX) against the supervisor's on a kernel that
    # schedules by session.
    handler = write_handler(tmp_path, """
        import subprocess

        child = subprocess.Popen(["sleep", "60"])  # started in init: it must share the environment's fate

        def handler(event, context):
            return child.pid
    """)
    logs = tmp_path / "logs"
    logs.mkdir()
    config = RunConfig(handler=handler, init_delay_s=0, provisioned=2, env_nice=10)
    run_id = f"test-priority-{os.getpid()}"
    zygote = ZygoteClient(logs, run_id, nice=10)
    zygote.start()
    loop = Loop()
    supervisor = Supervisor([FunctionConfig.from_run_config(config, {})], concurrency_limit=10, zygote=zygote,
                            loop=loop, events=Events(), logs_dir=logs, run_id=run_id)
    try:
        supervisor.start()
        supervisor.provision()
        envs = supervisor.live_environments()
        assert len(envs) == 2 and all(env.state == "frozen" for env in envs)
        zygote_sid = os.getsid(zygote.proc.pid)
        for env in envs:
            proc = psutil.Process(env.pid)
            assert os.getpgid(env.pid) == env.pid  # the group the supervisor signals
            assert proc.nice() == 10
            (sleeper,) = proc.children()
            assert os.getpgid(sleeper.pid) == env.pid
            # SIGSTOP is sent to the group when the environment is frozen, and takes effect at once
            wait_until(lambda: proc.status() == sleeper.status() == psutil.STATUS_STOPPED, 5, "group stopped")
            assert os.getsid(env.pid) == zygote_sid != env.pid
            assert session_nice(env.pid) == zygote.session_nice
        assert psutil.Process(zygote.proc.pid).nice() == 0  # above its environments, to keep spares coming
        if session_nice(os.getpid()) is not None:  # a kernel that schedules by session
            assert zygote.session_nice == SESSION_NICE_MAX < 10
    finally:
        supervisor.shutdown()
        zygote.close()
        loop.close()
    wait_until(lambda: not labelled_processes(run_id), 10, "environments, spares and the zygote gone")
