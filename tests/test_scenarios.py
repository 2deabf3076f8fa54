"""Scenarios: several functions and services sharing one account and one database, each application
with its own database user. Real servers, real environments and service processes."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import LAMBDAEMU, ROOT, Scenario as Run, assert_no_leftovers, cli_env, write_handler
from emulator.results import read_csv
from emulator.runner import run
from emulator.scenario import load_scenario

SCENARIOS = ROOT / "scenarios"


def scenario_file(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def sleeping_handler(tmp_path: Path, seconds: float) -> str:
    """A handler that only sleeps `seconds`."""
    return write_handler(tmp_path, f"""
        import time

        def handler(event, context):
            time.sleep({seconds})
    """)


def run_scenario(tmp_path: Path, path: Path, **overrides) -> Run:
    scenario = load_scenario(path, {"out": str(tmp_path / "run"), **overrides})
    result = Run(run(scenario, handle_signals=False))
    assert_no_leftovers(result.run["run_id"])
    return result


SHARED = """
    [run]
    duration = "5s"
    baseline = "off"
    sample_interval = "250ms"

    [database]
    {database}

    [defaults]
    init_delay = "0s"
    work = "200ms"

    [[functions]]
    name = "api"
    handler = "workloads.{pool}:handler"
    pool_max = 2
    queries = 2
    parallel_queries = 2
    load = "poisson:20"

    [[functions]]
    name = "worker"
    handler = "workloads.{pool}:handler"
    pool_max = 1
    load = "poisson:15"

    [[services]]
    name = "backend"
    handler = "workloads.{pool}:handler"
    instances = 2
    concurrency = 4
    pool_max = 4
    load = "poisson:20"
"""


@pytest.mark.parametrize("engine, database, pool", [
    ("postgres", "max_connections = 80", "sqlalchemy_pool"),
    ("mysql", 'engine = "mysql"\nmax_connections = 80', "sqlalchemy_pymysql"),
])
def test_each_application_has_its_own_user_and_every_connection_is_attributed_to_it(tmp_path, engine, database, pool):
    s = run_scenario(tmp_path, scenario_file(tmp_path, SHARED.format(database=database, pool=pool)))
    assert s.result.status == "complete", s.result.error
    users = s.run["database"]["users"]
    assert set(users) == {"api", "worker", "backend"} and len(set(users.values())) == 3
    rows = read_csv(s.dir / "connections.csv")
    # (An attempt still authenticating has no user yet.)
    assert {r["application"] for r in rows if r["state"] != "connecting"} == {"api", "worker", "backend"}
    # Two independent ties agree at every sample: the database user of each connection, and the
    # environment (or service instance) that holds it, found by application name or client port.
    by_user: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        if r["state"] != "connecting":
            by_user[r["t_s"]][r["application"]] += int(r["count"])
            assert r["owner_state"] != "unknown", r
            if r["application"] == "backend":
                assert r["owner_state"] == "serving"
            else:
                assert r["owner_state"] in ("busy", "frozen", "initialising")
    held = {(r["t_s"], r["function"]): int(r["held"]) for r in read_csv(s.dir / "functions.csv")}
    compared = 0
    for t, users_at_t in by_user.items():
        for app in ("api", "worker", "backend"):
            if (t, app) in held:
                assert held[(t, app)] == users_at_t.get(app, 0), (t, app)
                compared += 1
    assert compared >= 10
    summary = s.summary
    assert summary["applications"]["api"]["peak_connections"] > summary["applications"]["worker"]["peak_connections"]
    assert set(summary["functions"]) == {"api", "worker", "backend"}
    assert all(f["statuses"] == {"ok": f["invocations"]} for f in summary["functions"].values())


def test_a_full_account_throttles_the_unreserved_function_while_the_reserved_one_keeps_its_share(tmp_path):
    sleeper = sleeping_handler(tmp_path, 1.0)
    path = scenario_file(tmp_path, f"""
        [run]
        duration = "3s"
        baseline = "off"

        [account]
        concurrency_limit = 110

        [defaults]
        handler = "{sleeper}"
        init_delay = "0s"

        [[functions]]
        name = "reserved"
        handler = "{sleeper}"
        reserved_concurrency = 10
        load = "constant:6"

        [[functions]]
        name = "crowd"
        handler = "{sleeper}"
        load = "constant:150"
    """)
    s = run_scenario(tmp_path, path)
    functions = s.summary["functions"]
    # 150 req/s of 1 s invocations need ~150 environments; the unreserved share is 110 - 10 = 100.
    assert functions["crowd"]["throttles"].get("account_concurrency", 0) > 50
    assert functions["crowd"]["peak_environments"] <= 100
    # The reserved function never met the full account: its 6 concurrent invocations all ran.
    assert functions["reserved"]["throttles"]["total"] == 0
    assert functions["reserved"]["statuses"] == {"ok": functions["reserved"]["invocations"]}
    reasons = {r["function"]: r["throttle_reason"] for r in s.invocations if r["status"] == "throttled"}
    assert set(reasons) == {"crowd"}


def test_service_instances_are_never_frozen_nor_reclaimed(tmp_path):
    ticks = tmp_path / "ticks"
    ticks.mkdir()
    handler = write_handler(tmp_path, f"""
        import os, threading, time

        def _tick():  # a pool reaper stand-in: it must keep running between requests
            while True:
                with open(os.path.join({str(ticks)!r}, str(os.getpid())), "a") as fh:
                    fh.write(f"{{time.monotonic()}}\\n")
                time.sleep(0.05)

        threading.Thread(target=_tick, daemon=True).start()

        def handler(event, context):
            time.sleep(0.05)
    """)
    # The same code and the same load as a function and as a service; a 1 s idle TTL for functions.
    path = scenario_file(tmp_path, f"""
        [run]
        duration = "4s"
        baseline = "off"

        [defaults]
        init_delay = "0s"
        env_idle_ttl = "1s"
        load = {{ profile = "step", steps = [["0s", 20], ["0.5s", 0], ["3.5s", 20]], for = "4s" }}

        [[functions]]
        name = "lambda"
        handler = "{handler}"

        [[services]]
        name = "app"
        handler = "{handler}"
        instances = 2
        concurrency = 3
    """)
    s = run_scenario(tmp_path, path)
    envs = {r["pid"]: r for r in s.environments}
    service = [r for r in envs.values() if r["function"] == "app"]
    assert len(service) == 2 and {r["end_reason"] for r in service} == {"run_end"}
    # The function's environments were reclaimed in the quiet seconds; the service's instances were not.
    assert "idle" in {r["end_reason"] for r in envs.values() if r["function"] == "lambda"}
    assert s.summary["statuses"] == {"ok": s.summary["invocations"]} and s.summary["functions"]["app"]["invocations"] > 10
    for file in ticks.iterdir():
        if envs[file.name]["function"] != "app":
            continue
        stamps = [float(x) for x in file.read_text().split()]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        # Three quiet seconds with no request: the thread kept ticking (a frozen process would not).
        assert max(gaps) < 0.5 and stamps[-1] - stamps[0] > 3.5
    assert {r["service_instances"] for r in s.samples if float(r["t_s"]) > 1} == {"2"}



def test_a_saturated_service_queues_without_counting_as_the_emulator_falling_behind(tmp_path):
    handler = sleeping_handler(tmp_path, 0.2)
    # One instance serving one request at a time, 0.2 s each, asked for 10 a second: requests queue for
    # seconds in the service, as they would in front of a real server that size. The function beside it
    # is dispatched on time, and only it says whether the emulator kept its schedule.
    path = scenario_file(tmp_path, f"""
        [run]
        duration = "3s"
        baseline = "off"

        [defaults]
        init_delay = "0s"
        timeout = "10s"
        handler = "{handler}"

        [[functions]]
        name = "lambda"
        load = "constant:10"

        [[services]]
        name = "app"
        instances = 1
        concurrency = 1
        load = "constant:10"
    """)
    s = run_scenario(tmp_path, path)
    lag = {name: max(float(r["lag_ms"]) for r in s.invocations if r["function"] == name) for name in ("lambda", "app")}
    assert lag["app"] > 1000 and lag["lambda"] < 200, lag
    assert s.summary["dispatch_lag_ms"]["max"] > 1000  # every record's lag, the service's queue included
    assert s.summary["fidelity"]["dispatch_lag_ms"]["max"] < 200
    assert not any("fell behind" in w for w in s.summary["warnings"]), s.summary["warnings"]

def test_a_replay_arrives_exactly_as_recorded(tmp_path):
    trace = tmp_path / "trace.csv"
    offsets = [0.0, 0.05, 0.05, 0.4, 1.25, 1.3, 2.0]
    trace.write_text("offset_s\n" + "\n".join(f"{t}" for t in offsets) + "\n")
    handler = write_handler(tmp_path, """
        def handler(event, context):
            return None
    """)
    path = scenario_file(tmp_path, f"""
        [run]
        baseline = "off"

        [[functions]]
        name = "replayed"
        handler = "{handler}"
        load = {{ profile = "replay", file = "trace.csv" }}
    """)
    s = run_scenario(tmp_path, path)
    scheduled = sorted(float(r["scheduled_s"]) - s.run["load_start_s"] for r in s.invocations)
    assert [round(t, 3) for t in scheduled] == offsets


def test_the_shared_database_story_step_by_step(tmp_path):
    steps = sorted((SCENARIOS / "shared-database").glob("*.toml"))
    assert [p.name[0] for p in steps] == ["1", "2", "3", "4", "5"]
    results = []
    for i, path in enumerate(steps):
        # The files' own 20 s: step 1's leak (a pool per invocation in `reports`) needs it to reach the
        # limit every time (12 s runs peaked at 75 to 96 of 100).
        scenario = load_scenario(path, {"out": str(tmp_path / f"step{i + 1}"), "seed": 1})
        results.append(Run(run(scenario, handle_signals=False)))
        assert_no_leftovers(results[-1].run["run_id"])
        assert results[-1].result.status == "complete"
    first, proxy, _, _, capped = (r.summary for r in results)
    limit = first["max_connections"]
    # Step 1: the database runs out, and the per-user view says who holds the connections.
    applications = first["applications"]
    assert max(applications, key=lambda a: applications[a]["peak_connections"]) == "orders"
    assert first["errors"].get("too_many_connections", 0) > 0
    # Step 2: the proxy ends the refusals (its clients share fewer server connections), but at
    # MaxConnectionsPercent 100 it may open as many server connections as the database allows: the
    # database sees well above what a 40 % proxy lets through (69 to 74 of 100 measured). Nearly every
    # invocation succeeds: a proxy that falls behind its logins (it once derived a SCRAM key per client
    # login) shows up here as timeouts.
    assert proxy["proxy_max_db_connections"] == limit and capped["proxy_max_db_connections"] == 0.4 * limit
    assert proxy["errors"].get("too_many_connections", 0) == 0
    assert proxy["ok"] >= 0.95 * proxy["invocations"], proxy["errors"]
    assert proxy["peak_proxy_servers"] < proxy["peak_proxy_clients"]
    assert proxy["peak_connections"] > 0.6 * limit
    # Step 5: at 40 %, the database never sees more than 40 connections, with the same load.
    assert capped["peak_connections"] <= 0.4 * limit < proxy["peak_connections"]
    assert capped["errors"].get("too_many_connections", 0) == 0


def test_every_example_scenario_is_valid():
    files = sorted(SCENARIOS.rglob("*.toml"))
    assert len(files) >= 10
    for path in files:
        scenario = load_scenario(path)
        assert scenario.description.strip(), path
        assert scenario.applications


@pytest.mark.parametrize("name", ["pool-max-5", "pool-max-1", "pool-in-handler", "spike"])
def test_single_function_examples_run(tmp_path, name):
    s = run_scenario(tmp_path, SCENARIOS / f"{name}.toml", duration_s="4s", baseline="off")
    assert s.result.status == "complete" and s.summary["invocations"] > 10


BASE = """
[[functions]]
name = "api"
handler = "workloads.sqlalchemy_pool:handler"
"""


@pytest.mark.parametrize("text, message", [
    (BASE + "pool_mx = 5\n", "functions.api: unknown key 'pool_mx'; did you mean 'pool_max'?"),
    ("[databse]\nmax_connections = 50\n" + BASE, "top level: unknown key 'databse'; did you mean 'database'?"),
    (BASE + 'pool_max = "five"\n', "functions.api.pool_max: 'five' is text; write a number"),
    (BASE + "timeout = 3\n", "functions.api.timeout: 3 has no unit; write it as a duration, e.g. \"3s\""),
    (BASE + BASE, "functions.api: the name 'api' is already taken by functions.api"),
    ('[[functions]]\nname = "api"\n', "functions.api: needs a handler"),
    ('[[functions]]\nname = "Orders-API"\nhandler = "workloads.sqlalchemy_pool:handler"\n',
     "functions[0].name: 'Orders-API' cannot be a database user name"),
    (BASE + 'load = { profile = "replay", file = "missing.csv" }\n', "cannot be read"),
    (BASE + 'load = { profile = "replay", file = "bad.csv" }\n', "bad.csv:3: 'later'"),
    (BASE + 'load = "ramp:1..5"\n', "functions.api.load: ramp: give the time it takes"),
    ("[account]\nconcurrency_limit = 300\n" + BASE + "reserved_concurrency = 150\n"
     '[[functions]]\nname = "b"\nhandler = "workloads.sqlalchemy_pool:handler"\nreserved_concurrency = 100\n',
     "api 150, b 100; sum 250"),
    ('[[services]]\nname = "web"\nhandler = "workloads.sqlalchemy_pool:handler"\ninstances = 0\n',
     "services.web.instances: 0 is not valid"),
    ("this is not = toml = at all\n", "not valid TOML"),
])
def test_bad_scenarios_are_one_line_exit_2_nothing_started(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text("0.1\n0.2\nlater\n")
    path = scenario_file(tmp_path, text)
    result = subprocess.run([*LAMBDAEMU, "run", "--scenario", str(path), "--results-dir", str(tmp_path / "results")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "results").exists()


def test_command_line_options_override_the_file(tmp_path):
    path = scenario_file(tmp_path, """
        [run]
        duration = "60s"

        [database]
        max_connections = 50

        [[functions]]
        name = "api"
        handler = "workloads.sqlalchemy_pool:handler"
        pool_max = 5

        [[services]]
        name = "web"
        handler = "workloads.sqlalchemy_pool:handler"
        pool_max = 5
    """)
    scenario = load_scenario(path, {"duration_s": "2s", "pool_max": "1", "max_connections": "30"})
    assert scenario.run.duration_s == 2 and scenario.run.max_connections == 30
    assert scenario.functions[0].pool_max == 1 and scenario.services[0].config.pool_max == 1
    assert scenario.functions[0].duration_s == 2


def test_the_cli_runs_a_scenario(tmp_path):
    path = scenario_file(tmp_path, """
        [run]
        duration = "2s"
        baseline = "off"

        [[functions]]
        name = "api"
        handler = "workloads.sqlalchemy_pool:handler"
        work = "50ms"
        load = "constant:10"
    """)
    out = tmp_path / "run"
    result = subprocess.run([*LAMBDAEMU, "run", "--scenario", str(path), "--out", str(out), "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["functions"]["api"]["invocations"] == 20
    assert json.loads((out / "run.json").read_text())["scenario"]["source"] == str(path)
