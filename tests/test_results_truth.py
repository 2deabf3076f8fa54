"""Figures that mean what their names say, checked against runs whose answer is known: a lagging
emulator's real dispatched rate and its warning, refusals a pool absorbed behind a timeout, where the
errors land, the CloudWatch view, the baseline, and a chart whose colours cannot be confused."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import LAMBDAEMU, Scenario, assert_no_leftovers, cli_env, write_handler
from emulator import load
from emulator.config import RunConfig
from emulator.errors import ERROR_KINDS, STATUSES
from emulator.plots import OUTCOME_COLOURS, outcome_of
from emulator.results import IntervalPeak, Quantiles, percentile
from emulator.runner import run


class _StallingDisplay:
    """A display whose updates block the loop, as an overloaded machine would."""

    def __init__(self, stall_s: float, times: int) -> None:
        self.stall_s = stall_s
        self.times = times

    def start(self, config, run_dir):
        pass

    def phase(self, text):
        pass

    def update(self, supervisor, fleet):
        if self.times:
            self.times -= 1
            time.sleep(self.stall_s)

    def stop(self):
        pass


def test_a_lagging_run_reports_what_it_really_dispatched_and_says_why(tmp_path, postgres):
    handler = write_handler(tmp_path, """
        def handler(event, context):
            return None
    """)
    arrivals = [i / 100 for i in range(200)]  # 100 req/s for 2 s
    config = RunConfig(provider="external", db_url=postgres.url, out=str(tmp_path / "run"), handler=handler,
                       init_delay_s=0, duration_s=2, timeout_s=10, baseline="off")
    s = Scenario(run(config, arrivals=load.fixed(arrivals), display=_StallingDisplay(3.0, times=1), handle_signals=False))
    fidelity = s.summary["fidelity"]
    assert s.summary["statuses"] == {"ok": 200}
    # The loop stood still 1.5 s at every tick: the last arrivals went out well after their time.
    assert fidelity["dispatch_lag_ms"]["max"] > 1000
    span = max(float(r["start_s"]) for r in s.invocations) - s.run["load_start_s"]
    assert fidelity["dispatch_span_s"] >= span - 0.01 > 2.5
    assert s.summary["achieved_rps"] == round(200 / fidelity["dispatch_span_s"], 3) < 80
    assert any("fell behind its schedule" in w for w in s.summary["warnings"])
    # The sampler lives in its own process: the stalled loop did not stop it sampling.
    assert fidelity["samples_missed"] == 0 and fidelity["samples"] >= 3


def test_a_run_that_keeps_up_has_no_warning_and_a_baseline(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([*LAMBDAEMU, "run", "--rps", "20", "--duration", "3", "--work", "50ms", "--json",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=cli_env())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [] and "warning" not in result.stderr
    fidelity = summary["fidelity"]
    assert fidelity["dispatch_lag_ms"]["p99"] < 20
    baseline = fidelity["baseline"]["app"]
    assert baseline["init_ms"] > 0 and len(baseline["duration_ms"]) == 2
    assert 40 <= baseline["duration_ms"][1] < 200  # --work 50ms
    assert fidelity["duration_ratio_p50"] is not None
    # The baseline's environment and invocations are not part of the run's records.
    assert (out / "logs" / "baseline-app.log").exists()
    envs = [line for line in (out / "environments.csv").read_text().splitlines()[1:]]
    assert all(not line.startswith("-") for line in envs)
    assert summary["invocations"] == len((out / "invocations.csv").read_text().splitlines()) - 1


def test_a_timeout_behind_a_full_server_says_the_server_refused(tmp_path):
    # psycopg_pool opens its connections in the background and retries refusals itself: the handler
    # only ever sees a timeout. The refusals it absorbed are reported and become the timeout's cause.
    result = run(RunConfig(out=str(tmp_path / "run"), max_connections=8, handler="workloads.psycopg_pool_workload:handler",
                           pool_min=2, pool_max=2, rps=20, duration_s=3, work_s=0.5, timeout_s=2, init_delay_s=0,
                           sample_interval_s=0.25, seed=3), handle_signals=False)
    s = Scenario(result)
    assert_no_leftovers(s.run["run_id"])
    timeouts = [r for r in s.invocations if r["status"] == "timeout"]
    assert timeouts
    caused = [r for r in timeouts if r["cause"] == "too_many_connections"]
    assert caused and all(int(r["absorbed"]) > 0 for r in caused)
    assert s.summary["causes"]["timeout"]["too_many_connections"] == len(caused)
    assert s.summary["refused_absorbed_by_libraries"] >= sum(int(r["absorbed"]) for r in s.invocations)
    assert s.summary["refused_absorbed_by_libraries"] > 0
    # ok invocations keep no cause even if their pool retried in the background.
    assert all(r["cause"] == "" for r in s.invocations if r["status"] == "ok")


def test_where_the_errors_land_under_exhaustion(tmp_path):
    # More environments than connections: those that could not connect fail fast, go back to the idle
    # pool first (newest routing) and take the next invocations, while older ones sit frozen holding
    # every connection.
    result = run(RunConfig(out=str(tmp_path / "run"), max_connections=10, pool_max=1, rps=60, duration_s=4,
                           work_s=0.3, init_delay_s=0, sample_interval_s=0.2, seed=5), handle_signals=False)
    s = Scenario(result)
    landing = s.summary["where_errors_land"]
    per_env = sorted((int(r["invocations"]) for r in s.environments), reverse=True)
    top = per_env[:max(1, -(-len(per_env) // 10))]
    assert landing["busiest_10pct_share"] == round(sum(top) / sum(per_env), 3)
    assert landing["busiest_environment_invocations"] == per_env[0]
    assert landing["peak_unconnected_environments_while_frozen_hold"] > 0
    errors_by_env = {r["env_id"]: int(r["errors"]) for r in s.environments}
    failed = [r for r in s.invocations if r["status"] not in ("ok", "throttled")]
    assert sum(errors_by_env.values()) == len(failed)


def test_cloudwatch_view_is_the_minute_average_and_maximum_of_the_samples(tmp_path, scenario):
    s = scenario([0.1 * i for i in range(30)], work_s=0.2, sample_interval_s=0.1)
    periods = s.summary["cloudwatch_database_connections"]
    t0 = s.run["t0_unix"]
    by_minute: dict[int, list[int]] = {}
    for r in s.samples:
        by_minute.setdefault(int((t0 + float(r["t_s"])) // 60), []).append(int(r["connections"]))
    assert len(periods) == len(by_minute)
    for period, (minute, values) in zip(periods, sorted(by_minute.items())):
        assert period["maximum"] == max(values)
        assert period["average"] == round(sum(values) / len(values), 2)
        assert period["minute"] == time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(minute * 60))


def test_every_outcome_has_a_colour_of_its_own():
    outcomes = {"ok", "throttled", "interrupted", *ERROR_KINDS}
    assert outcomes <= set(OUTCOME_COLOURS)
    colours = [OUTCOME_COLOURS[o] for o in outcomes]
    assert len(set(colours)) == len(colours)
    assert set(STATUSES) - {"handler_error", "crash", "init_error", "out_of_memory"} <= outcomes
    assert outcome_of({"status": "timeout", "error_kind": "timeout"}) == "timeout"
    assert outcome_of({"status": "handler_error", "error_kind": "too_many_connections"}) == "too_many_connections"


def test_streaming_figures_agree_with_exact_ones():
    import random

    rng = random.Random(1)
    values = [rng.lognormvariate(5, 1) for _ in range(20000)]
    sketch = Quantiles()
    for v in values:
        sketch.add(v)
    for q in (50, 95, 99):
        exact = percentile(values, q)
        assert abs(sketch.percentile(q) - exact) <= 0.006 * exact
    assert sketch.summary()["max"] == round(max(values), 3)
    peak = IntervalPeak()
    intervals = [(rng.uniform(0, 50), rng.uniform(0.01, 2)) for _ in range(5000)]
    for start, length in intervals:
        peak.add(start, start + length)
    points = sorted([(s, 1) for s, _ in intervals] + [(s + d, -1) for s, d in intervals])
    current = best = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    assert abs(peak.peak() - best) <= 1


def test_an_option_given_where_a_value_belongs_is_refused(tmp_path):
    # `--out --json` used to take "--json" as the run directory: the table went to stdout and no JSON.
    result = subprocess.run([*LAMBDAEMU, "run", "--out", "--json"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=cli_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lambdaemu: error: --out: '--json' is an option, not a value; give --out a value (use a directory path)"]
    assert not (tmp_path / "--json").exists() and not Path(tmp_path / "results").exists()


def test_churn_counts_every_connection_a_handler_opened(tmp_path):
    # NullPool opens a new connection for every invocation and closes it at the end.
    result = run(RunConfig(out=str(tmp_path / "run"), handler="workloads.sqlalchemy_nullpool:handler", rps=20,
                           duration_s=3, arrivals="constant", work_s=0.05, init_delay_s=0, baseline="off",
                           sample_interval_s=0.25), handle_signals=False)
    s = Scenario(result)
    assert s.summary["statuses"] == {"ok": 60}
    assert s.summary["connections_opened"] == 60
    assert s.summary["peak_connections_opened_per_s"] > 10


def test_refused_attempts_are_not_connections(tmp_path):
    # 40 environments connecting at once to a server that lets the application role hold 7 (10 minus the
    # 3 superuser slots): the refused attempts are counted as refusals, never as connections.
    handler = write_handler(tmp_path, """
        import os, time
        import psycopg

        def handler(event, context):
            with psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=5) as conn:
                conn.execute("SELECT pg_sleep(0.5)")
    """)
    result = run(RunConfig(out=str(tmp_path / "run"), max_connections=10, handler=handler, rps=80, duration_s=2,
                           arrivals="constant", init_delay_s=0, baseline="off", sample_interval_s=0.1),
                 handle_signals=False)
    s = Scenario(result)
    assert s.summary["errors"]["too_many_connections"] > 20
    assert s.summary["peak_connections"] <= 7
    assert s.summary["refused_by_server"] == s.summary["errors"]["too_many_connections"]
    assert all(int(r["connections"]) <= 7 for r in s.samples if r["connections"])


def test_init_timeouts_are_counted_and_warned_about(tmp_path, postgres):
    handler = write_handler(tmp_path, """
        import time

        time.sleep(0.6)  # an init longer than the limit below

        def handler(event, context):
            return None
    """)
    config = RunConfig(provider="external", db_url=postgres.url, out=str(tmp_path / "run"), handler=handler,
                       init_delay_s=0, init_limit_s=0.3, duration_s=1, baseline="off")
    s = Scenario(run(config, arrivals=load.fixed([0.0, 0.1, 0.2]), handle_signals=False))
    assert s.summary["statuses"] == {"timeout": 3}
    assert s.summary["fidelity"]["init_timeouts"] == 3
    assert any(w.startswith("3 invocations failed because their environment's init passed --init-limit")
               for w in s.summary["warnings"]), s.summary["warnings"]
