"""Thresholds: a run passes (exit 0) or fails (exit 99) on its numbers; malformed thresholds are usage
errors before anything starts; summary.json records each outcome."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import LAMBDAEMU, cli_env
from emulator.errors import UsageError
from emulator.config import RunConfig
from emulator.thresholds import evaluate, parse_threshold, value_of


def lambdaemu_run(tmp_path, *args):
    return subprocess.run([*LAMBDAEMU, "run", "--rps", "10", "--arrivals", "constant", "--duration", "2", "--work", "50ms",
                           "--baseline", "off",
                           "--out", str(tmp_path / "run"), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=cli_env())


def test_thresholds_that_hold_pass_and_are_recorded(tmp_path):
    result = lambdaemu_run(tmp_path, "--threshold", "peak_percent<80", "--threshold", "errors.too_many_connections==0",
                           "--threshold", "latency_ms.p99 < 5000", "--threshold", "functions.app.invocations>=15")
    assert result.returncode == 0, result.stderr
    assert "threshold failed" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    outcomes = {t["threshold"]: t for t in summary["thresholds"]}
    assert set(outcomes) == {"peak_percent<80", "errors.too_many_connections==0", "latency_ms.p99<5000",
                             "functions.app.invocations>=15"}
    assert all(t["passed"] for t in outcomes.values())
    assert outcomes["errors.too_many_connections==0"]["value"] == 0
    assert outcomes["peak_percent<80"]["value"] == pytest.approx(100 * summary["peak_connections"] / 100)


def test_a_failed_threshold_exits_99_with_one_line_each(tmp_path):
    result = lambdaemu_run(tmp_path, "--threshold", "peak_connections<1", "--threshold", "invocations>1000",
                           "--threshold", "errors.total==0")
    assert result.returncode == 99, result.stderr
    lines = [line for line in result.stderr.splitlines() if "threshold failed" in line]
    assert len(lines) == 2
    assert any(line.startswith("lambdaemu: threshold failed: peak_connections<1 (measured ") for line in lines)
    assert any("invocations>1000 (measured 20)" in line for line in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [t["passed"] for t in summary["thresholds"]] == [False, False, True]


@pytest.mark.parametrize("threshold, message", [
    ("peak_conections<250", "did you mean 'peak_connections'?"),
    ("errors.too_many_conections==0", "did you mean 'errors.too_many_connections'?"),
    ("functions.nobody.invocations>1", "not a summary field"),
    ("peak_connections=<250", "is not FIELD OP NUMBER"),
    ("peak_connections<lots", "is not FIELD OP NUMBER"),
    ("<250", "is not FIELD OP NUMBER"),
])
def test_a_malformed_threshold_is_a_usage_error_before_anything_starts(tmp_path, threshold, message):
    result = lambdaemu_run(tmp_path, "--threshold", threshold)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lambdaemu: error: --threshold:") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_values_counters_and_derived_figures():
    summary = {"peak_connections": 40, "max_connections": 50, "invocations": 100,
               "errors": {"total": 5, "timeout": 5}, "throttles": {"total": 20},
               "latency_ms": {"p99": 812.0}, "refused_by_server": None,
               "functions": {"api": {"errors": {"total": 0}}}}
    assert value_of(summary, "peak_percent") == 80
    assert value_of(summary, "error_percent") == pytest.approx(6.25)  # 5 of the 80 that ran
    assert value_of(summary, "errors.too_many_connections") == 0  # absent counter
    assert value_of(summary, "functions.api.errors.pool_timeout") == 0
    assert value_of(summary, "refused_by_server") is None
    outcomes = evaluate([parse_threshold("refused_by_server==0"), parse_threshold("latency_ms.p99<=812")], summary)
    assert outcomes == [{"threshold": "refused_by_server==0", "value": None, "passed": False},
                        {"threshold": "latency_ms.p99<=812", "value": 812.0, "passed": True}]


def test_thresholds_in_the_python_api_are_validated_too():
    with pytest.raises(UsageError, match="--threshold"):
        RunConfig(thresholds=("peak_connections << 3",))
    assert RunConfig(thresholds=["peak_connections < 3"]).thresholds == ("peak_connections<3",)
