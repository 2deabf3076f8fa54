"""Handlers in other languages through a whole run: Node.js and `provided` environments get the same
lifecycle, statuses, samples and summary as Python ones. Real node processes, real PostgreSQL."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, assert_no_leftovers, lambdaemu

NODE_WORKLOADS = ROOT / "workloads" / "node"


def js_handler(tmp_path: Path, code: str, name: str = "handler.js") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return f"{path}:handler"


def by_seq(s):
    return sorted(s.invocations, key=lambda r: int(r["seq"]))


def test_node_statuses_are_those_of_python(tmp_path, scenario):
    handler = js_handler(tmp_path, """
        exports.handler = async (event) => {
          if (event.seq === 2) throw new TypeError("bad input");
          if (event.seq === 3) await new Promise((resolve) => setTimeout(resolve, 5000));
          if (event.seq === 4) process.exit(3);
          return { ok: true };
        };
    """)
    s = scenario([0.0, 1.0, 2.0, 4.0, 5.0], handler=handler, timeout_s=1.0)
    rows = by_seq(s)
    assert [r["status"] for r in rows] == ["ok", "handler_error", "timeout", "crash", "ok"]
    assert rows[1]["error_type"] == "TypeError" and "bad input" in rows[1]["message"]
    assert rows[1]["env_id"] == rows[0]["env_id"]  # a handler error keeps the environment
    assert rows[4]["cold"] == "1"  # after the crash, a new environment
    ends = {r["env_id"]: r for r in s.environments}
    assert ends[rows[2]["env_id"]]["end_reason"] == "timeout" and ends[rows[3]["env_id"]]["end_reason"] == "crash"



def test_the_baseline_times_a_node_environment_and_leaves_the_run_working(tmp_path, scenario):
    # A Runtime API environment is idle only once it asks for its next invocation, a moment after its
    # response: the baseline's second invocation has to wait for that, and the run's own environments
    # must start as usual after it.
    handler = js_handler(tmp_path, """
        exports.handler = async () => ({ ok: true });
    """)
    s = scenario([0.0, 0.5, 1.0], handler=handler, baseline="on")
    baseline = s.run["baseline"]["app"]
    assert "error" not in baseline and len(baseline["duration_ms"]) == 2 and baseline["init_ms"] > 0, baseline
    assert [r["status"] for r in by_seq(s)] == ["ok", "ok", "ok"]
    assert by_seq(s)[0]["cold"] == "1"  # the baseline's environment is not the run's

def test_a_node_init_error_fails_its_cold_starts(tmp_path, scenario):
    handler = js_handler(tmp_path, """
        throw new Error("no configuration");
        exports.handler = async () => ({});
    """)
    s = scenario([0.0, 0.5], handler=handler)
    assert s.statuses() == ["init_error", "init_error"]
    assert "no configuration" in by_seq(s)[0]["message"]
    assert s.result.status == "complete"


def test_a_node_environment_is_frozen_between_invocations(tmp_path, scenario):
    ticks = tmp_path / "ticks"
    handler = js_handler(tmp_path, f"""
        const fs = require("fs");
        setInterval(() => fs.appendFileSync({json.dumps(str(ticks))}, `${{Date.now()}}\\n`), 10);
        exports.handler = async () => {{ await new Promise((r) => setTimeout(r, 50)); return 1; }};
    """)
    s = scenario([0.0, 2.0], handler=handler)
    assert s.statuses() == ["ok", "ok"] and by_seq(s)[1]["cold"] == "0"
    stamps = [int(x) for x in ticks.read_text().split()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) > 1500, f"largest gap {max(gaps)} ms: the timer kept running while frozen"


@pytest.mark.parametrize("pool_max, expected", [(None, 5), ("1", 1)])
def test_sequelize_connections_per_environment(scenario, pool_max, expected):
    # Five queries at once: sequelize's default pool (max 5) opens five connections, max 1 just one.
    env = (("POOL_MAX", pool_max),) if pool_max else ()
    settings = {"pool_max": int(pool_max)} if pool_max else {}
    s = scenario([0.0, 1.5], handler=f"{NODE_WORKLOADS / 'sequelize_pool.js'}:handler", work_s=0.5, queries=5,
                 parallel_queries=5, sample_interval_s=0.1, env_vars=env, **settings)
    assert s.statuses() == ["ok", "ok"]
    assert max(int(r["held_frozen"]) + int(r["held_busy"]) for r in s.samples if r["held_busy"]) == expected
    assert len(s.environments) == 1


def test_provided_runtime_with_a_python_bootstrap(tmp_path, scenario):
    s = scenario([0.0, 0.3, 0.6], handler=f"{ROOT / 'workloads' / 'provided' / 'bootstrap'}:echo", runtime="provided")
    assert s.statuses() == ["ok", "ok", "ok"]
    assert len(s.environments) == 1


def test_a_node_environment_past_its_memory_size_is_out_of_memory(tmp_path, scenario):
    handler = js_handler(tmp_path, """
        exports.handler = async () => {
          const hog = Buffer.alloc(400 * 1024 * 1024, 1);
          await new Promise((r) => setTimeout(r, 1500));
          return hog.length;
        };
    """)
    s = scenario([0.0], handler=handler, memory_mb=256, timeout_s=5)
    assert s.statuses() == ["out_of_memory"]
    assert s.environments[0]["end_reason"] == "out_of_memory"


def test_node_through_the_cli(tmp_path):
    out = tmp_path / "run"
    result = lambdaemu("run", "--handler", f"{NODE_WORKLOADS / 'pg_pool.mjs'}:handler", "--rps", "10", "--duration",
                       "2", "--arrivals", "constant", "--work", "50ms", "--baseline", "off", "--json", "--out",
                       str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["statuses"] == {"ok": 20} and summary["peak_connections"] >= 1
    assert_no_leftovers(json.loads((out / "run.json").read_text())["run_id"])


def test_a_node_handler_that_does_not_exist_is_a_usage_error(tmp_path):
    result = lambdaemu("run", "--handler", "missing/app.js:handler", "--results-dir", str(tmp_path / "r"),
                       cwd=tmp_path)
    assert result.returncode == 2 and "--handler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
