"""The rest of the Lambda lifecycle, one flag at a time, each shown in the run's own files."""

from __future__ import annotations

import pytest

from conftest import write_handler

SLEEP_BY_SEQ = """
    import time

    SLEEPS = {sleeps!r}

    def handler(event, context):
        time.sleep(SLEEPS.get(event["seq"], {default}))
"""


def sleeper(tmp_path, seconds: float = 0.2, **by_seq: float) -> str:
    sleeps = {int(k.strip("s")): v for k, v in by_seq.items()}
    return write_handler(tmp_path, SLEEP_BY_SEQ.format(sleeps=sleeps, default=seconds))


def by_seq(rows):
    return sorted(rows, key=lambda r: int(r["seq"]))


def env_rows(s):
    return {int(r["env_id"]): r for r in s.environments}


def test_timeout_fails_the_invocation_and_resets_the_environment(tmp_path, scenario):
    s = scenario([0.0, 1.5], handler=sleeper(tmp_path, 0.1, s1=5.0), timeout_s=0.5)
    first, second = by_seq(s.invocations)
    assert first["status"] == "timeout" and first["error_kind"] == "timeout"
    assert 450 <= float(first["end_s"]) * 1000 - float(first["start_s"]) * 1000 - float(first["init_ms"]) < 900
    envs = env_rows(s)
    assert envs[1]["end_reason"] == "timeout" and envs[1]["exit"] == "SIGKILL"
    # The next invocation could not reuse the reset environment: a cold start in a new one.
    assert second["status"] == "ok" and second["cold"] == "1" and second["env_id"] == "2"
    assert s.summary["statuses"] == {"ok": 1, "timeout": 1}
    assert s.summary["errors"]["timeout"] == 1


def test_init_longer_than_the_limit_fails_like_a_timeout(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import time
        time.sleep(3)  # a slow init phase (e.g. loading a model, or a slow connection)

        def handler(event, context):
            pass
    """)
    s = scenario([0.0], handler=handler, init_limit_s=1.0)
    (inv,) = s.invocations
    assert inv["status"] == "timeout" and "init phase" in inv["message"]
    assert s.environments[0]["end_reason"] == "init_timeout"


def test_reserved_concurrency_throttles_with_its_own_reason(tmp_path, scenario):
    s = scenario([0.0, 0.01, 0.02, 1.0], handler=sleeper(tmp_path, 0.3), reserved_concurrency=1)
    assert [r["status"] for r in by_seq(s.invocations)] == ["ok", "throttled", "throttled", "ok"]
    assert {r["throttle_reason"] for r in s.invocations if r["status"] == "throttled"} == {"reserved_concurrency"}
    assert s.summary["throttles"] == {"total": 2, "reserved_concurrency": 2}
    assert s.summary["peak_environments"] == 1


def test_scale_rate_limits_new_environments(tmp_path, scenario):
    # 2 environments per 4 s, refilled continuously: a burst of 5 gets 2 environments, and a token
    # comes back after 2 s.
    s = scenario([0.0, 0.01, 0.02, 0.03, 0.04, 2.5, 2.51], handler=sleeper(tmp_path, 3.0),
                 scale_rate="2/4s", timeout_s=5)
    rows = by_seq(s.invocations)
    assert [r["status"] for r in rows[:5]] == ["ok", "ok", "throttled", "throttled", "throttled"]
    assert {r["throttle_reason"] for r in rows if r["status"] == "throttled"} == {"scale_rate"}
    # At 2.5 s one token has been refilled (2 per 4 s): one more environment, then throttled again.
    assert [r["status"] for r in rows[5:]] == ["ok", "throttled"]
    assert s.summary["throttles"]["scale_rate"] == 4


def test_provisioned_environments_start_before_load_and_are_never_idle_reclaimed(tmp_path, scenario):
    s = scenario([0.0, 0.5, 2.5, 2.51, 2.52], handler=sleeper(tmp_path, 0.1), provisioned=2,
                 env_idle_ttl_s=1.0)
    load_start = s.run["load_start_s"]
    provisioned = [r for r in s.environments if r["provisioned"] == "1"]
    assert len(provisioned) == 2
    assert all(float(r["ready_s"]) <= load_start for r in provisioned)
    rows = by_seq(s.invocations)
    # Served warm by provisioned environments, still there after 2 s idle (TTL 1 s)...
    assert [r["cold"] for r in rows[:4]] == ["0", "0", "0", "0"]
    assert all(r["end_reason"] == "run_end" for r in provisioned)
    # ...and a third concurrent invocation spills over to an on-demand environment.
    assert rows[4]["cold"] == "1"
    assert s.summary["cold_starts"] == 1


@pytest.mark.parametrize("routing, expected_env", [("newest", 4), ("oldest", 1), ("mru", 3), ("lru", 2)])
def test_routing_strategies(tmp_path, scenario, routing, expected_env):
    # Four environments created in order 1..4 finish in the order 2, 1, 4, 3.
    handler = sleeper(tmp_path, 0.05, s1=0.2, s2=0.1, s3=0.4, s4=0.3)
    s = scenario([0.0, 0.01, 0.02, 0.03, 1.0], handler=handler, routing=routing)
    rows = by_seq(s.invocations)
    assert [r["env_id"] for r in rows[:4]] == ["1", "2", "3", "4"]
    assert rows[4]["cold"] == "0" and int(rows[4]["env_id"]) == expected_env


def test_random_routing_spreads_over_idle_environments(tmp_path, scenario):
    arrivals = [0.0, 0.01, 0.02, 0.03] + [0.5 + 0.05 * i for i in range(30)]
    s = scenario(arrivals, handler=sleeper(tmp_path, 0.01, s1=0.2, s2=0.2, s3=0.2, s4=0.2), routing="random",
                 seed=7)
    later = {r["env_id"] for r in by_seq(s.invocations)[4:]}
    assert len(later) >= 3 and later <= {"1", "2", "3", "4"}


def test_max_lifetime_recycles_after_the_current_invocation(tmp_path, scenario):
    s = scenario([0.0, 0.5, 2.0], handler=sleeper(tmp_path, 0.1, s2=1.0), env_max_lifetime_s=1.0)
    rows = by_seq(s.invocations)
    # The lifetime ran out during the second invocation: it finished normally, then the environment
    # was recycled, so the third invocation is a cold start in a new environment.
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert rows[1]["env_id"] == "1" and rows[2]["env_id"] == "2" and rows[2]["cold"] == "1"
    env1 = env_rows(s)[1]
    assert env1["end_reason"] == "max_lifetime"
    assert float(env1["ended_s"]) >= float(rows[1]["end_s"])


def test_vanish_keeps_connections_open_until_the_server_times_them_out(tmp_path, scenario):
    s = scenario([0.0, 5.0], provider="embedded", work_s=0.0, reclaim="vanish", env_idle_ttl_s=1.0,
                 db_idle_timeout_s=2.5, sample_interval_s=0.1)
    env1 = env_rows(s)[1]
    assert env1["vanished"] == "1" and env1["end_reason"] == "idle"
    vanished_at = float(env1["ended_s"])
    load_start = s.run["load_start_s"]
    held = [(float(r["t_s"]), int(r["held_vanished"] or 0), int(r["envs_vanished"] or 0)) for r in s.samples]
    # Right after the reclaim the vanished environment still holds its connection...
    assert any(vanished_at < t < vanished_at + 1.0 and h == 1 for t, h, _ in held)
    # ...until idle_session_timeout (2.5 s after its last query) closes it; then the frozen process
    # holds nothing any more and is reaped (a long run must not keep every vanished process).
    assert any(load_start + 3.2 < t < load_start + 4.8 and h == 0 for t, h, v in held)
    assert env1["exit"] == "SIGKILL" and float(env1["exited_s"]) < load_start + 4.8
    assert any(load_start + 4.0 < t < load_start + 5.0 and v == 0 for t, h, v in held)
    assert s.summary["peak_held_by_vanished"] == 1
    assert [r["cold"] for r in by_seq(s.invocations)] == ["1", "1"]


def test_vanish_without_server_timeout_holds_until_the_run_ends(tmp_path, scenario):
    s = scenario([0.0, 3.0], work_s=0.0, reclaim="vanish", env_idle_ttl_s=1.0, sample_interval_s=0.1)
    t_second = float(by_seq(s.invocations)[1]["start_s"])
    late = [int(r["held_vanished"]) for r in s.samples if r["held_vanished"] and t_second - 0.5 < float(r["t_s"])]
    assert late and min(late) == 1
    assert env_rows(s)[1]["exit"]  # the vanished process was still ended at the end of the run


def test_init_delay_adds_to_every_cold_start(tmp_path, scenario):
    s = scenario([0.0, 0.01, 1.0], handler=sleeper(tmp_path, 0.2), init_delay_s=0.4)
    cold = [float(r["init_ms"]) for r in s.invocations if r["cold"] == "1"]
    assert len(cold) == 2 and min(cold) >= 400
    assert s.summary["init_ms"]["p50"] >= 400


def test_handler_exception_keeps_the_environment_warm(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        def handler(event, context):
            if event["seq"] == 1:
                raise ValueError("bad input")
    """)
    s = scenario([0.0, 0.5], handler=handler)
    first, second = by_seq(s.invocations)
    assert first["status"] == "handler_error" and first["error_type"] == "ValueError"
    assert "bad input" in first["message"]
    assert second["status"] == "ok" and second["cold"] == "0" and second["env_id"] == "1"
    assert s.summary["errors"] == {"total": 1, "handler_error": 1}
    assert "ValueError: bad input" in (s.dir / "logs" / "env-00001.log").read_text()


def test_process_dying_mid_invocation_is_a_crash(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import os

        def handler(event, context):
            if event["seq"] == 1:
                os._exit(3)
    """)
    s = scenario([0.0, 0.5], handler=handler)
    first, second = by_seq(s.invocations)
    assert first["status"] == "crash"
    assert env_rows(s)[1]["end_reason"] == "crash" and env_rows(s)[1]["exit"] == "exit 3"
    assert second["status"] == "ok" and second["cold"] == "1" and second["env_id"] == "2"
    assert s.summary["statuses"] == {"crash": 1, "ok": 1}


def test_init_failure_discards_the_environment(tmp_path, scenario):
    flag = tmp_path / "fail-once"
    flag.write_text("x")
    handler = write_handler(tmp_path, f"""
        import os
        if os.path.exists({str(flag)!r}):
            os.remove({str(flag)!r})
            raise RuntimeError("could not reach the config service")

        def handler(event, context):
            pass
    """)
    s = scenario([0.0, 0.5], handler=handler)
    first, second = by_seq(s.invocations)
    assert first["status"] == "init_error" and first["error_type"] == "RuntimeError"
    assert env_rows(s)[1]["end_reason"] == "init_error"
    assert second["status"] == "ok" and second["cold"] == "1"


def test_handler_that_cannot_be_imported_ends_the_run_early(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import no_such_dependency_anywhere

        def handler(event, context):
            pass
    """)
    s = scenario([0.1 * i for i in range(50)], handler=handler)
    assert s.result.status == "failed"
    assert "cannot be loaded" in s.result.error and "no_such_dependency_anywhere" in s.result.error
    assert s.run["status"] == "failed"
    assert len(s.environments) <= 2  # it stopped instead of spawning for every arrival


def test_memory_limit_ends_the_environment(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import time

        def handler(event, context):
            if event["seq"] == 1:
                hog = bytearray(400 * 1024 * 1024)
                time.sleep(1)
    """)
    s = scenario([0.0, 2.0], handler=handler, memory_mb=256)
    first, second = by_seq(s.invocations)
    assert first["status"] == "out_of_memory"
    assert env_rows(s)[1]["end_reason"] == "out_of_memory"
    assert second["status"] == "ok" and second["cold"] == "1"
    assert s.summary["statuses"]["out_of_memory"] == 1


class _StallingDisplay:
    """A display whose updates block the supervisor's loop, as a slow terminal or disk would."""

    def start(self, config, run_dir):
        pass

    def phase(self, text):
        pass

    def update(self, supervisor, fleet):
        import time

        time.sleep(1.2)

    def stop(self):
        pass


def test_a_late_loop_does_not_turn_finished_invocations_into_timeouts(tmp_path, postgres):
    from conftest import Scenario
    from emulator import load
    from emulator.config import RunConfig
    from emulator.runner import run

    config = RunConfig(provider="external", db_url=postgres.url, out=str(tmp_path / "run"), timeout_s=1.0,
                       init_delay_s=0, handler=sleeper(tmp_path, 0.2), duration_s=3)
    s = Scenario(run(config, arrivals=load.fixed([0.1 * i for i in range(30)]), display=_StallingDisplay(),
                     handle_signals=False))
    # The loop stalled for 1.2 s at a time, past the 1 s timeout of invocations that took 0.2 s: their
    # replies were waiting in the sockets, so none of them is a timeout.
    assert s.summary["statuses"] == {"ok": 30}
    assert max(float(r["latency_ms"]) for r in s.invocations) > 1000  # the stall did delay them
