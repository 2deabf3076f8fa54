"""Arrival schedules: open-loop load, fixed from the start of the load window.

A schedule is an iterator of arrival offsets in seconds from the start of the load window. Arrivals do
not wait for earlier invocations to finish (open loop, as real traffic does not), so when the emulator
or the database falls behind, the lag shows as the gap between scheduled and actual start.

Load profiles describe how the rate changes (`Profile`), one segment after another:

| profile | text form | arrivals |
|---|---|---|
| `constant` | `constant:167` or `constant:167/30s` | evenly spaced at a fixed rate |
| `poisson` | `poisson:167/30s` | exponential gaps at a fixed mean rate |
| `ramp` | `ramp:10..200/60s` | Poisson, the rate moving linearly from 10 to 200 req/s over 60 s |
| `step` | `step:0s=10,30s=100,45s=20/60s` | Poisson, each rate from its time on (offsets within the segment) |
| `spike` | `spike:20,400@30s+5s/60s` | Poisson at 20 req/s, 400 req/s from 30 s for 5 s |
| `replay` | `replay:trace.csv` | exactly the arrivals in the file: one offset in seconds, or one timestamp (ISO 8601 or Unix seconds), per line |

Segments join with ` + ` (`ramp:10..200/60s + constant:200/30s`); a segment without a duration takes
what is left of `--duration`. A time-varying Poisson rate is drawn by thinning (Lewis and Shedler): exact
for any rate function, with no discretisation.
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UsageError

PROFILES = ("constant", "poisson", "ramp", "step", "spike", "replay")
#: Most arrivals a replay file may hold (a bigger trace is split or sampled first).
REPLAY_LIMIT = 10_000_000


def poisson(rps: float, duration_s: float, rng: random.Random) -> Iterator[float]:
    """A Poisson process: exponential gaps with mean 1/rps, until `duration_s`."""
    t = rng.expovariate(rps)
    while t < duration_s:
        yield t
        t += rng.expovariate(rps)


def constant(rps: float, duration_s: float) -> Iterator[float]:
    """Evenly spaced arrivals, the first at 0."""
    i = 0
    while (t := i / rps) < duration_s:
        yield t
        i += 1


def fixed(times: Iterable[float]) -> Iterator[float]:
    """Arrivals at given offsets (sorted), e.g. a test's exact scenario or a replayed trace."""
    return iter(sorted(times))


def schedule(kind: str, rps: float, duration_s: float, seed: int, profile: str | None = None) -> Iterator[float]:
    """The schedule named by `--profile`, or else by `--arrivals` at `--rps`."""
    if profile:
        parsed = parse_profile(profile)
        return parsed.arrivals(parsed.total_s(duration_s), seed)
    if kind == "constant":
        return constant(rps, duration_s)
    return poisson(rps, duration_s, random.Random(seed))


# --- profiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One piece of a load profile. `duration_s` None: whatever is left of the run's duration."""

    profile: str
    duration_s: float | None = None
    rate: float = 0.0  # constant, poisson; the base rate of spike
    rate_to: float = 0.0  # ramp: the final rate (`rate` is the first)
    steps: tuple[tuple[float, float], ...] = ()  # step: (offset, rate), sorted
    peak: float = 0.0  # spike
    at_s: float = 0.0  # spike
    length_s: float = 0.0  # spike
    path: str = ""  # replay

    def rate_at(self, t: float) -> float:
        """The arrival rate `t` seconds into the segment."""
        if self.profile in ("constant", "poisson"):
            return self.rate
        if self.profile == "ramp":
            span = self.duration_s or 0.0
            return self.rate + (self.rate_to - self.rate) * (min(t, span) / span if span else 1.0)
        if self.profile == "step":
            current = 0.0
            for offset, rate in self.steps:
                if t >= offset:
                    current = rate
            return current
        if self.profile == "spike":
            return self.peak if self.at_s <= t < self.at_s + self.length_s else self.rate
        return 0.0

    def max_rate(self) -> float:
        """The highest rate the segment reaches (for thinning)."""
        return max([self.rate, self.rate_to, self.peak, *(r for _, r in self.steps)])

    def arrivals(self, duration_s: float, rng: random.Random) -> Iterator[float]:
        """Offsets of this segment's arrivals, from 0 to `duration_s`."""
        if self.profile == "constant":
            yield from constant(self.rate, duration_s) if self.rate > 0 else ()
        elif self.profile == "poisson":
            yield from poisson(self.rate, duration_s, rng) if self.rate > 0 else ()
        elif self.profile == "replay":
            for t in read_replay(Path(self.path)):
                if t >= duration_s:
                    break
                yield t
        else:
            top = self.max_rate()
            if top <= 0:
                return
            # Thinning: candidates at the top rate, each kept with probability rate(t) / top.
            t = rng.expovariate(top)
            while t < duration_s:
                if rng.random() * top < self.rate_at(t):
                    yield t
                t += rng.expovariate(top)

    def mean_rate(self, duration_s: float) -> float:
        """The average rate over `duration_s` (what a window of it should receive, per second)."""
        if self.profile in ("constant", "poisson"):
            return self.rate
        if self.profile == "ramp":
            return (self.rate + self.rate_to) / 2 if (self.duration_s or duration_s) <= duration_s else \
                (self.rate + self.rate_at(duration_s)) / 2
        if self.profile == "step":
            edges = [o for o, _ in self.steps] + [duration_s]
            total = sum(rate * max(0.0, min(edges[i + 1], duration_s) - min(offset, duration_s))
                        for i, (offset, rate) in enumerate(self.steps))
            return total / duration_s if duration_s else 0.0
        if self.profile == "spike":
            inside = max(0.0, min(self.at_s + self.length_s, duration_s) - min(self.at_s, duration_s))
            return (self.rate * (duration_s - inside) + self.peak * inside) / duration_s if duration_s else 0.0
        return 0.0


@dataclass(frozen=True)
class Profile:
    """A load profile: segments one after another."""

    segments: tuple[Segment, ...]
    text: str = ""

    def durations(self, total_s: float) -> list[float]:
        """Each segment's duration within a run of `total_s` (a segment without its own takes the rest)."""
        fixed_total = sum(s.duration_s for s in self.segments if s.duration_s is not None)
        open_segments = [s for s in self.segments if s.duration_s is None]
        rest = max(0.0, total_s - fixed_total)
        share = rest / len(open_segments) if open_segments else 0.0
        return [s.duration_s if s.duration_s is not None else share for s in self.segments]

    def total_s(self, default_s: float) -> float:
        """The profile's whole length: its segments' durations, or `default_s` when one is open."""
        if any(s.duration_s is None for s in self.segments):
            return max(default_s, sum(s.duration_s or 0.0 for s in self.segments))
        return sum(s.duration_s or 0.0 for s in self.segments)

    def arrivals(self, total_s: float, seed: int) -> Iterator[float]:
        """Every arrival of the profile, as offsets from the load start."""
        rng = random.Random(seed)
        start = 0.0
        for segment, length in zip(self.segments, self.durations(total_s)):
            for t in segment.arrivals(length, rng):
                yield start + t
            start += length


# --- the text form ------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def _duration(text: str, what: str) -> float:
    from .config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a duration (use 300ms, 5s, 10m or 2h)") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text.strip()!r} is not a duration")
    return value


def _rate(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a number of requests per second") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} {text.strip()!r} is not a rate of 0 or more requests per second")
    return value


def parse_segment(text: str, *, base_dir: Path | None = None) -> Segment:
    """One segment in the text form (see the module docstring); ValueError says what is wrong."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in PROFILES:
        raise ValueError(f"{text.strip()!r} does not start with a profile ({', '.join(PROFILES)}) and a colon")
    if kind == "replay":
        path = Path(rest.strip())
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        times = read_replay(path)  # every line checked now, before anything starts
        # The trace's own length (just past its last arrival), so every arrival in it is replayed.
        return Segment("replay", path=str(path), duration_s=times[-1] + 0.001)
    body, slash, length = rest.rpartition("/") if "/" in rest else (rest, "", "")
    duration = _duration(length, "duration") if slash else None
    body = body.strip()
    if kind in ("constant", "poisson"):
        return Segment(kind, duration, rate=_rate(body, "rate"))
    if kind == "ramp":
        low, dots, high = body.partition("..")
        if not dots:
            raise ValueError(f"ramp {body!r}: use FROM..TO/DURATION, e.g. ramp:10..200/60s")
        if duration is None:
            raise ValueError("ramp: give the time it takes, e.g. ramp:10..200/60s")
        return Segment("ramp", duration, rate=_rate(low, "ramp start"), rate_to=_rate(high, "ramp end"))
    if kind == "step":
        steps = []
        for item in body.split(","):
            when, eq, rate = item.partition("=")
            if not eq:
                raise ValueError(f"step {item.strip()!r}: use TIME=RATE pairs, e.g. step:0s=10,30s=100/60s")
            steps.append((_duration(when, "step time"), _rate(rate, "step rate")))
        steps.sort()
        return Segment("step", duration, steps=tuple(steps))
    match = re.fullmatch(rf"\s*{_NUMBER}\s*,\s*{_NUMBER}\s*@\s*([^+]+?)\s*\+\s*(.+?)\s*", body)
    if not match:
        raise ValueError(f"spike {body!r}: use BASE,PEAK@AT+LENGTH, e.g. spike:20,400@30s+5s/60s")
    return Segment("spike", duration, rate=_rate(match.group(1), "spike base"), peak=_rate(match.group(2), "spike peak"),
                   at_s=_duration(match.group(3), "spike start"), length_s=_duration(match.group(4), "spike length"))


def parse_profile(text: str, *, base_dir: Path | None = None) -> Profile:
    """A profile in the text form: segments joined with `+` (with spaces around it)."""
    parts = [p for p in re.split(r"\s\+\s", text.strip()) if p.strip()]
    if not parts:
        raise ValueError("an empty profile")
    return Profile(tuple(parse_segment(p, base_dir=base_dir) for p in parts), text=text.strip())


def profile_from_table(table: dict, *, where: str, base_dir: Path | None = None) -> Segment:
    """One segment from a scenario file's table, e.g. {profile = "ramp", from = 10, to = 200, over = "60s"}."""
    table = dict(table)
    kind = str(table.pop("profile", "")).lower()
    keys = {"constant": {"rps", "for"}, "poisson": {"rps", "for"}, "ramp": {"from", "to", "over"},
            "step": {"steps", "for"}, "spike": {"base", "peak", "at", "length", "for"}, "replay": {"file"}}
    if kind not in keys:
        raise UsageError(f"{where}.profile: {kind!r} is not a load profile; use one of {', '.join(PROFILES)}")
    unknown = set(table) - keys[kind]
    if unknown:
        from difflib import get_close_matches

        key = sorted(unknown)[0]
        near = get_close_matches(key, sorted(keys[kind]), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UsageError(f"{where}: {key!r} is not a key of a {kind} profile{hint}; its keys are "
                         f"{', '.join(sorted(keys[kind]))}")

    def dur(key: str) -> str:
        value = table[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise UsageError(f"{where}.{key}: {value!r} has no unit; write it as a duration, e.g. \"{value}s\"")
        return str(value)

    try:
        length = f"/{dur('for')}" if "for" in table else ""
        if kind in ("constant", "poisson"):
            return parse_segment(f"{kind}:{table['rps']}{length}")
        if kind == "ramp":
            return parse_segment(f"ramp:{table['from']}..{table['to']}/{dur('over')}")
        if kind == "step":
            pairs = ",".join(f"{when}={rate}" for when, rate in table["steps"])
            return parse_segment(f"step:{pairs}{length}")
        if kind == "spike":
            return parse_segment(f"spike:{table['base']},{table['peak']}@{dur('at')}+{dur('length')}{length}")
        return parse_segment(f"replay:{table['file']}", base_dir=base_dir)
    except KeyError as exc:
        raise UsageError(f"{where}: a {kind} profile needs {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def read_replay(path: Path) -> list[float]:
    """The arrivals of a replay file as sorted offsets from the first: one per line, either seconds
    (an offset) or a timestamp (ISO 8601, or Unix seconds above 1e9); blank lines and lines starting with
    # are skipped; a CSV line uses its first column. Raises ValueError naming the file and the line."""
    try:
        fh = open(path, newline="")
    except OSError as exc:
        raise ValueError(f"replay file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    values: list[float] = []
    header_allowed = True
    with fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            cell = row[0].strip()
            try:
                value = float(cell)
                if not math.isfinite(value) or value < 0:
                    raise ValueError
            except ValueError:
                try:
                    value = datetime.fromisoformat(cell.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    if header_allowed:
                        header_allowed = False
                        continue  # a header line (the first line that is not a comment)
                    raise ValueError(f"{path}:{number}: {cell[:40]!r} is neither an offset in seconds nor a "
                                     "timestamp (ISO 8601 or Unix seconds)") from None
            header_allowed = False
            values.append(value)
            if len(values) > REPLAY_LIMIT:
                raise ValueError(f"{path}: more than {REPLAY_LIMIT} arrivals; split or sample the trace")
    if not values:
        raise ValueError(f"replay file {str(path)!r} has no arrivals")
    values.sort()
    first = values[0] if values[0] > 1e9 else 0.0  # timestamps: offsets from the first arrival
    return [v - first for v in values]
