"""Load profiles produce the arrivals they describe: counts per window within Poisson noise, replays
exactly, segments one after another, and bad profiles refused with the reason."""

from __future__ import annotations

import math
import subprocess

import pytest

from conftest import LAMBDAEMU, cli_env
from emulator.config import RunConfig
from emulator.errors import UsageError
from emulator.load import parse_profile, profile_from_table, read_replay


def counts(arrivals: list[float], edges: list[float]) -> list[int]:
    return [sum(1 for t in arrivals if lo <= t < hi) for lo, hi in zip(edges, edges[1:])]


def within_noise(count: int, expected: float) -> bool:
    """A Poisson count within four standard deviations of its mean."""
    return abs(count - expected) <= 4 * math.sqrt(max(expected, 1.0)) + 1


def test_constant_is_evenly_spaced():
    arrivals = list(parse_profile("constant:50/2s").arrivals(2, seed=1))
    assert len(arrivals) == 100
    gaps = {round(b - a, 6) for a, b in zip(arrivals, arrivals[1:])}
    assert gaps == {0.02}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_poisson_counts_per_window(seed):
    arrivals = list(parse_profile("poisson:200/10s").arrivals(10, seed))
    for count in counts(arrivals, [0, 2, 4, 6, 8, 10]):
        assert within_noise(count, 400)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert 0.8 < (sum(g * g for g in gaps) / len(gaps)) / (sum(gaps) / len(gaps)) ** 2 / 2 < 1.2  # exponential


def test_ramp_rises_linearly():
    arrivals = list(parse_profile("ramp:10..210/20s").arrivals(20, seed=4))
    for i, count in enumerate(counts(arrivals, [0, 5, 10, 15, 20])):
        mid = 2.5 + 5 * i
        assert within_noise(count, (10 + 200 * mid / 20) * 5)


def test_step_holds_each_rate_from_its_time():
    arrivals = list(parse_profile("step:0s=20,4s=200,6s=50/10s").arrivals(10, seed=5))
    c = counts(arrivals, [0, 4, 6, 10])
    assert within_noise(c[0], 80) and within_noise(c[1], 400) and within_noise(c[2], 200)


def test_spike_is_where_it_says():
    arrivals = list(parse_profile("spike:20,500@5s+2s/10s").arrivals(10, seed=6))
    before, spike, after = counts(arrivals, [0, 5, 7, 10])
    assert within_noise(before, 100) and within_noise(spike, 1000) and within_noise(after, 60)


def test_segments_follow_each_other_and_an_open_one_takes_the_rest():
    profile = parse_profile("constant:10/2s + constant:100 + constant:20/1s")
    assert profile.durations(10) == [2, 7, 1]
    arrivals = list(profile.arrivals(10, seed=1))
    assert counts(arrivals, [0, 2, 9, 10]) == [20, 700, 20]
    assert profile.total_s(10) == 10 and parse_profile("constant:5/3s + poisson:9/4s").total_s(60) == 7


def test_replay_is_exact_with_offsets_or_timestamps(tmp_path):
    offsets = tmp_path / "offsets.csv"
    offsets.write_text("# arrivals from the access log\noffset_s\n0.5\n0\n1.25\n\n3,GET /api\n")
    assert read_replay(offsets) == [0.0, 0.5, 1.25, 3.0]
    stamps = tmp_path / "stamps.txt"
    stamps.write_text("2026-11-20T10:00:00.000Z\n2026-11-20T10:00:00.250Z\n2026-11-20T10:00:02Z\n")
    profile = parse_profile(f"replay:{stamps}")
    assert list(profile.arrivals(profile.total_s(60), seed=1)) == [0.0, 0.25, 2.0]
    unix = tmp_path / "unix.txt"
    unix.write_text("1763632800.5\n1763632801\n")
    assert read_replay(unix) == [0.0, 0.5]
    combined = parse_profile(f"constant:2/1s + replay:{offsets}")
    assert list(combined.arrivals(combined.total_s(60), 1)) == [0.0, 0.5, 1.0, 1.5, 2.25, 4.0]


@pytest.mark.parametrize("text, message", [
    ("ramp:10..200", "give the time it takes"),
    ("ramp:10-200/60s", "FROM..TO"),
    ("spike:20@30s/60s", "BASE,PEAK@AT+LENGTH"),
    ("step:0s:10/60s", "TIME=RATE"),
    ("poisson:lots/10s", "not a number"),
    ("poisson:-3/10s", "not a rate"),
    ("constant:5/10parsecs", "not a duration"),
    ("sawtooth:5", "does not start with a profile"),
    ("replay:/no/such/trace.csv", "cannot be read"),
])
def test_bad_profiles_say_what_is_wrong(text, message):
    with pytest.raises(UsageError) as err:
        RunConfig(profile=text)
    assert "--profile" in str(err.value) and message in str(err.value)


def test_a_bad_replay_line_is_named_by_file_and_line(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("0.1\n0.2\nsoon\n")
    with pytest.raises(UsageError, match=rf"{trace}:3: 'soon'"):
        RunConfig(profile=f"replay:{trace}")


def test_profiles_from_scenario_tables():
    assert profile_from_table({"profile": "ramp", "from": 10, "to": 200, "over": "60s"}, where="f").rate_to == 200
    with pytest.raises(UsageError, match="'ovr' is not a key of a ramp profile .did you mean 'over'"):
        profile_from_table({"profile": "ramp", "from": 10, "to": 200, "ovr": "60s"}, where="functions.api.load")
    with pytest.raises(UsageError, match="has no unit"):
        profile_from_table({"profile": "ramp", "from": 10, "to": 200, "over": 60}, where="functions.api.load")


def test_the_cli_refuses_a_bad_profile_before_starting_anything(tmp_path):
    result = subprocess.run([*LAMBDAEMU, "run", "--profile", "ramp:10..200", "--results-dir", str(tmp_path / "r")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--profile" in result.stderr
    assert not (tmp_path / "r").exists()
