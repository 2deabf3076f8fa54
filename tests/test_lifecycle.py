"""The Lambda model with real environment processes: freezing, one invocation at a time, cold starts
only when nothing is idle, idle reclaim, throttling."""

from __future__ import annotations


from conftest import admin_rows, write_handler


def test_frozen_environment_makes_no_progress(tmp_path, scenario):
    ticks = tmp_path / "ticks.log"
    handler = write_handler(tmp_path, f"""
        import threading, time

        def _tick():
            # A pool reaper stand-in: a background thread that should run whenever the process runs.
            while True:
                with open({str(ticks)!r}, "a") as fh:
                    fh.write(f"{{time.monotonic()}}\\n")
                time.sleep(0.01)

        threading.Thread(target=_tick, daemon=True).start()

        def handler(event, context):
            time.sleep(0.05)
    """)
    s = scenario([0.0, 2.0], handler=handler)
    assert s.statuses() == ["ok", "ok"]
    assert [r["env_id"] for r in s.invocations] == ["1", "1"]
    stamps = [float(x) for x in ticks.read_text().split()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # Between the two invocations the environment was frozen for ~1.9 s: the thread stood still.
    assert max(gaps) > 1.5, f"largest gap between ticks {max(gaps):.3f}s: the thread kept running"
    # And it does run while thawed (many ticks around the invocations).
    assert len(stamps) >= 5


def test_one_invocation_at_a_time_per_environment(tmp_path, scenario):
    trace = tmp_path / "trace.log"
    handler = write_handler(tmp_path, f"""
        import os, random, time

        def handler(event, context):
            start = time.monotonic()
            time.sleep(random.uniform(0.01, 0.08))
            with open({str(trace)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{start}} {{time.monotonic()}}\\n")
    """)
    arrivals = [i * 0.005 for i in range(200)]  # 200 req/s for 1 s, bursty against 10-80 ms handlers
    s = scenario(arrivals, handler=handler)
    assert s.statuses().count("ok") == 200
    spans: dict[str, list[tuple[float, float]]] = {}
    for line in trace.read_text().splitlines():
        pid, start, end = line.split()
        spans.setdefault(pid, []).append((float(start), float(end)))
    assert len(spans) > 1  # concurrency did happen, across several environments
    for pid, intervals in spans.items():
        intervals.sort()
        for (s1, e1), (s2, e2) in zip(intervals, intervals[1:]):
            assert s2 >= e1, f"environment {pid} ran two invocations at once"
    # The supervisor's own record agrees.
    by_env: dict[str, list[tuple[float, float]]] = {}
    for r in s.invocations:
        by_env.setdefault(r["env_id"], []).append((float(r["start_s"]), float(r["end_s"])))
    for intervals in by_env.values():
        intervals.sort()
        assert all(b[0] >= a[1] for a, b in zip(intervals, intervals[1:]))


def test_cold_start_only_when_no_environment_is_idle(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import time

        def handler(event, context):
            time.sleep(0.3)
    """)
    s = scenario([0.0, 1.0, 1.05, 1.1, 2.5], handler=handler)
    rows = sorted(s.invocations, key=lambda r: int(r["seq"]))
    assert [r["cold"] for r in rows] == ["1", "0", "1", "1", "0"]
    # 1.0: env 1 was idle, so it was reused; 1.05 and 1.1: everything busy, so two new ones.
    assert rows[1]["env_id"] == rows[0]["env_id"]
    assert len({rows[1]["env_id"], rows[2]["env_id"], rows[3]["env_id"]}) == 3
    # 2.5: three idle environments; routing "newest" picks the most recently created one.
    assert rows[4]["env_id"] == rows[3]["env_id"]
    assert s.summary["cold_starts"] == 3


def test_idle_environment_is_reclaimed_and_its_connection_leaves(tmp_path, scenario, postgres):
    s = scenario([0.0, 3.0], env_idle_ttl_s=1.0, work_s=0.0, sample_interval_s=0.1)
    envs = sorted(s.environments, key=lambda r: int(r["env_id"]))
    # The first environment sat idle past the TTL and was killed; the second invocation was cold.
    assert envs[0]["end_reason"] == "idle"
    assert envs[0]["exit"] == "SIGKILL"
    assert 1.0 <= float(envs[0]["ended_s"]) - float(envs[0]["created_s"]) < 2.5
    assert [r["cold"] for r in sorted(s.invocations, key=lambda r: int(r["seq"]))] == ["1", "1"]
    # The database saw the connection go: samples between reclaim and the next arrival show none held.
    reclaimed_at = float(envs[0]["ended_s"])
    next_start = min(float(r["start_s"]) for r in s.invocations if r["seq"] == "2")
    between = [int(r["connections"]) for r in s.samples
               if reclaimed_at + 0.3 < float(r["t_s"]) < next_start - 0.05 and r["connections"]]
    assert between and max(between) == 0
    before = [int(r["held_frozen"]) for r in s.samples if float(r["t_s"]) < reclaimed_at - 0.2 and r["held_frozen"]]
    assert max(before) == 1  # while it lived, the frozen environment held its pooled connection
    # And nothing of this run is connected now.
    assert admin_rows(postgres, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                "AND application_name LIKE 'lambdaemu-env-%'")[0][0] == 0


def test_throttling_at_the_concurrency_limit(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import time

        def handler(event, context):
            time.sleep(0.5)
    """)
    s = scenario([0.0, 0.01, 0.02, 0.03, 0.04, 1.0], handler=handler, concurrency_limit=2)
    statuses = s.statuses()
    assert statuses == ["ok", "ok", "throttled", "throttled", "throttled", "ok"]
    reasons = {r["throttle_reason"] for r in s.invocations if r["status"] == "throttled"}
    assert reasons == {"account_concurrency"}
    assert s.summary["throttles"] == {"total": 3, "account_concurrency": 3}
    assert s.summary["peak_environments"] == 2
