"""Each engine driven into connection exhaustion, PgBouncer holding the line as RDS Proxy would, and
driver errors classified into the same kinds across engines. Real servers, real environments."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Scenario, assert_no_leftovers, write_handler
from emulator.config import RunConfig
from emulator.runner import run


def full_run(tmp_path: Path, **settings) -> Scenario:
    """A whole run that starts (and stops) its own servers, as `lambdaemu run` does."""
    settings.setdefault("init_delay_s", 0)
    settings.setdefault("sample_interval_s", 0.25)
    result = run(RunConfig(out=str(tmp_path / "run"), seed=1, **settings), handle_signals=False)
    scenario = Scenario(result)
    assert_no_leftovers(scenario.run["run_id"])
    return scenario


@pytest.mark.parametrize("engine, message", [
    ("postgres", "remaining connection slots are reserved"),
    ("mysql", "Too many connections"),
])
def test_each_engine_runs_out_of_connections(tmp_path, engine, message):
    # ~40 concurrent environments, each holding a pooled connection, against 10 allowed.
    s = full_run(tmp_path, engine=engine, max_connections=10, rps=50, duration_s=3, work_s=0.8, timeout_s=5)
    assert s.result.status == "complete"
    assert s.summary["max_connections"] == 10
    assert s.summary["errors"].get("too_many_connections", 0) > 10
    assert message.lower() in s.summary["first_error"]["too_many_connections"].lower()
    assert s.summary["ok"] > 0
    # Established sessions never exceed the limit. MariaDB shows a refused client for a moment in the
    # processlist (command "Connect", counted as "other") before sending it error 1040.
    established = [int(r["active"]) + int(r["idle"]) + int(r["idle_in_transaction"]) for r in s.samples
                   if r["connections"]]
    assert 6 <= max(established) <= 10
    assert s.summary["peak_connections"] <= 11
    if engine == "mysql":  # the server's own count agrees (the sampler's extra_port session is not in it)
        reported = [int(r["threads_connected"]) for r in s.samples if r["threads_connected"]]
        assert reported and 7 <= max(reported) <= 11
    kinds = {r["error_kind"] for r in s.invocations if r["status"] == "handler_error"}
    assert kinds == {"too_many_connections"}


def test_pgbouncer_max_connections_percent_50_caps_server_connections(tmp_path):
    # 10 server connections serve 100 req/s of 100 ms queries; at 70 req/s Poisson bursts still create
    # more than 10 environments, each keeping its client connection while frozen.
    s = full_run(tmp_path, proxy="pgbouncer", max_connections=20, proxy_max_connections_percent=50,
                 rps=70, duration_s=4, work_s=0.1, sample_interval_s=0.1, timeout_s=10)
    assert s.result.status == "complete"
    assert s.summary["errors"]["total"] == 0, s.summary["first_error"]
    servers = [int(r["proxy_servers"]) for r in s.samples if r["proxy_servers"]]
    clients = [int(r["proxy_clients"]) for r in s.samples if r["proxy_clients"]]
    database = [int(r["connections"]) for r in s.samples if r["connections"]]
    assert max(servers) <= 10 and max(database) <= 10  # at most half of max_connections, on both sides
    assert max(clients) > 10  # while more environments than that are connected through it
    assert s.summary["peak_proxy_clients"] > 10 >= s.summary["peak_proxy_servers"]
    # The environments' client connections are attributed to them.
    assert max(int(r["held_frozen"] or 0) + int(r["held_busy"] or 0) for r in s.samples) > 10
    assert s.run["database"]["proxy"]["settings"]["max_db_connections"]["value"] == 10


def test_pgbouncer_borrow_timeout_is_a_proxy_wait_timeout(tmp_path):
    s = full_run(tmp_path, proxy="pgbouncer", max_connections=10, proxy_max_connections_percent=20,
                 proxy_borrow_timeout_s=1.0, rps=20, duration_s=3, work_s=1.5, timeout_s=6)
    assert s.summary["errors"].get("proxy_wait_timeout", 0) > 0, s.summary
    assert "query_wait_timeout" in s.summary["first_error"]["proxy_wait_timeout"]


def test_pool_timeout_and_connection_refused_are_classified(tmp_path, scenario):
    handler = write_handler(tmp_path, """
        import os
        import psycopg
        from sqlalchemy import create_engine, text

        engine = create_engine(os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://"),
                               pool_size=1, max_overflow=0, pool_timeout=0.2)

        def handler(event, context):
            if event["seq"] == 1:
                with engine.connect() as first, engine.connect() as second:  # needs 2 from a pool of 1
                    pass
            else:
                psycopg.connect(host="127.0.0.1", port=1, user="x", connect_timeout=2)
    """)
    s = scenario([0.0, 0.5], handler=handler)
    first, second = sorted(s.invocations, key=lambda r: int(r["seq"]))
    assert first["error_kind"] == "pool_timeout" and first["error_type"] == "TimeoutError"
    assert second["error_kind"] == "connection_refused"
    assert s.summary["errors"] == {"total": 2, "connection_refused": 1, "pool_timeout": 1}


def test_native_postgres_provider_runs_the_machines_server(tmp_path):
    s = full_run(tmp_path, provider="native", rps=10, duration_s=2, work_s=0.05)
    assert s.result.status == "complete" and s.summary["errors"]["total"] == 0
    database = s.run["database"]
    assert database["provider"] == "native" and database["engine"] == "postgres"
    assert "postgres" in database["version"].lower() and database["max_connections"] == 100
    assert s.summary["peak_connections"] > 0
