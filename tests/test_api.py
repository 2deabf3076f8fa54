"""The Python API users import (`from emulator import ...`) and the pytest plugin, each with real runs."""

from __future__ import annotations

import json
import textwrap

import psutil

from conftest import ROOT
from emulator import Scenario, load_scenario, open_run, run, sweep

pytest_plugins = ["pytester"]

QUICK = {"rps": 10, "duration": "1500ms", "work": "50ms", "baseline": "off", "sample_interval": "200ms",
         "init_delay": 0}


def test_run_returns_its_figures_rows_and_dataframes(postgres, tmp_path):
    result = run(provider="external", db_url=postgres.url, out=str(tmp_path / "run"), **QUICK)
    assert result.status == "complete" and result.exit_code == 0
    invocations = list(result.invocations())
    assert len(invocations) == result.summary["invocations"] > 5
    assert {row["status"] for row in invocations} == {"ok"}
    assert result.fidelity["ideal_peak_environments"] >= 1 and result.fidelity["samples"] > 3
    assert result.thresholds == [] and isinstance(result.warnings, list)
    assert result.config["rps"] == 10.0 and result.config["work_s"] == 0.05

    frame = result.invocations_df()
    assert len(frame) == len(invocations) and frame["latency_ms"].dtype.kind == "f"
    assert (frame["status"] == "ok").all()
    samples = result.samples_df()
    assert samples["connections"].max() == result.summary["peak_connections"]
    assert len(result.environments_df()) == result.summary["environments"]

    again = open_run(tmp_path / "run")
    assert again.summary == result.summary and again.status == "complete"


def test_sweep_over_a_scenario_key_with_repeats(tmp_path):
    scenario = ROOT / "scenarios/pool-max-5.toml"
    assert isinstance(load_scenario(scenario), Scenario)
    swept = sweep(scenario, {"functions.api.pool_max": [1, 2]}, repeat=2, seed=11,
                  settings={"duration": "1500ms", "baseline": "off", "sample_interval": "200ms",
                            "threshold": ["peak_connections<1", "errors.total==0"]},
                  edits={"functions.api.load": "poisson:8"}, out=tmp_path / "sweep")
    # Every run completed, and every run failed its connection threshold: 99, as `lambdaemu run` exits.
    assert swept.status == "complete" and swept.exit_code == 99 and swept.missing == ()
    assert {r["exit_code"] for r in swept.runs} == {99}
    assert [r["thresholds_failed"] for r in swept.rows] == [1, 1, 1, 1]
    assert [(r["point"], r["repeat"], r["seed"]) for r in swept.runs] == [
        ("functions.api.pool_max=1", 1, 11), ("functions.api.pool_max=1", 2, 12),
        ("functions.api.pool_max=2", 1, 11), ("functions.api.pool_max=2", 2, 12)]
    ports = set()
    for entry in swept.runs:
        info = json.loads((swept.sweep_dir / entry["dir"] / "run.json").read_text())
        function = info["scenario"]["functions"][0]
        assert function["pool_max"] == int(entry["values"]["functions.api.pool_max"])
        assert function["profile"] == "poisson:8" and info["seed"] == entry["seed"]
        ports.add(info["database"]["port"])
    assert len(ports) == 1, "points on the same server share it"
    # A repeat's seed draws the same arrivals at every point.
    arrivals = [len((swept.sweep_dir / r["dir"] / "invocations.csv").read_text().splitlines()) for r in swept.runs]
    assert arrivals[0] == arrivals[2] and arrivals[1] == arrivals[3]
    from emulator.sweeps import point_rows

    spread = point_rows(swept.rows, swept.axes)
    assert [(p["point"], p["runs"]) for p in spread] == [("functions.api.pool_max=1", 2), ("functions.api.pool_max=2", 2)]
    low, high = spread[0]["peak_connections"][1:]
    assert low <= spread[0]["peak_connections"][0] <= high
    assert (swept.sweep_dir / "sweep.csv").exists() and (swept.sweep_dir / "sweep.png").exists()


def test_the_pytest_plugin_runs_a_handler_of_the_users_repository(pytester):
    pytester.makefile(".py", **{"handlers/app": textwrap.dedent("""
        import os

        import psycopg

        connection = None  # one per environment, kept while it is frozen: the common Lambda pattern

        def handler(event, context):
            global connection
            if connection is None:
                connection = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
            connection.execute("SELECT pg_sleep(0.05)")
            return {"ok": True}
        """)})
    pytester.makeini("""
        [pytest]
        lambdaemu_max_connections = 30
        lambdaemu_provider = embedded
        """)
    pytester.makepyfile(test_budget="""
        def test_app_stays_under_its_connection_budget(lambdaemu_run, lambdaemu_database):
            result = lambdaemu_run("handlers/app.py:handler", rps=10, duration="2s", baseline="off",
                                   sample_interval="200ms")
            assert result.status == "complete"
            assert result.summary["errors"]["total"] == 0
            assert result.summary["max_connections"] == 25
            assert 1 <= result.summary["peak_connections"] <= 10

        def test_a_budget_it_cannot_meet_fails(lambdaemu_run):
            result = lambdaemu_run("handlers/app.py:handler", rps=10, duration="2s", baseline="off",
                                   sample_interval="200ms")
            assert result.summary["invocations"] > 5
            assert result.summary["peak_connections"] <= 0, "over budget"
        """)
    # The command line wins over the ini file, as pytest-postgresql's options do.
    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--lambdaemu-max-connections", "25",
                                            timeout=240)
    outcome.assert_outcomes(passed=1, failed=1)
    outcome.stdout.fnmatch_lines(["*over budget*"])
    marker = str(pytester.path)
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
