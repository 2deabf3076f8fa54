"""Thresholds: pass/fail criteria over summary.json, as k6 and locust users write them.

`--threshold 'peak_connections<250'` (repeatable) compares one summary field with a number. A run whose
thresholds fail exits 99 (k6's code for crossed thresholds) with one line per failed threshold; the
summary records every threshold with its measured value and outcome.

A field is a dotted path into summary.json (`latency_ms.p99`, `errors.too_many_connections`,
`functions.api.throttles.total`), or one of the derived figures below. Counters that are absent mean 0
(`errors.too_many_connections` of a run without that error). A field that cannot exist (a typo, an
unknown error kind or function) is a usage error before anything starts; a field that exists but was
not measured in this run (`refused_by_server` on a server that cannot tell) fails its threshold and says so.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Callable, Iterable

from .errors import ERROR_KINDS, STATUSES

#: Exit status of a run whose thresholds failed.
THRESHOLD_EXIT = 99

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}

#: Figures computed from the summary rather than stored in it.
DERIVED: dict[str, Callable[[dict], float | None]] = {
    # Peak connections as a percentage of max_connections (what "stay under 80 %" budgets are written in).
    "peak_percent": lambda s: (100.0 * s["peak_connections"] / s["max_connections"]
                               if s.get("max_connections") else None),
    # Failed invocations (throttles excluded) as a percentage of invocations that ran.
    "error_percent": lambda s: (100.0 * s["errors"]["total"] / (s["invocations"] - s["throttles"]["total"])
                                if s.get("invocations", 0) - s.get("throttles", {}).get("total", 0) > 0 else None),
    "throttle_percent": lambda s: (100.0 * s["throttles"]["total"] / s["invocations"]
                                   if s.get("invocations") else None),
}

_NUMBERS = ("target_rps", "achieved_rps", "arrival_rps", "duration_s", "invocations", "ok", "cold_starts",
            "peak_connections", "max_connections", "peak_connecting", "connections_opened",
            "peak_connections_opened_per_s", "refused_by_server", "refused_absorbed_by_libraries",
            "peak_held_by_frozen", "peak_held_by_vanished", "peak_environments", "environments",
            "peak_proxy_clients", "peak_proxy_servers", "peak_proxy_waiting", "proxy_max_db_connections",
            "peak_over_proxy_cap")
_PERCENTILES = ("p50", "p95", "p99", "max")
_DISTRIBUTIONS = ("latency_ms", "duration_ms", "dispatch_lag_ms", "init_ms")
_THROTTLE_REASONS = ("account_concurrency", "reserved_concurrency", "scale_rate")
_COUNTERS = {"errors": ("total", *ERROR_KINDS), "throttles": ("total", *_THROTTLE_REASONS),
             "statuses": (*STATUSES, "interrupted")}
_FIDELITY = ("dispatched_rps", "dispatch_span_s", "ideal_peak_environments", "samples", "samples_missed",
             "longest_sample_gap_s", "init_ratio_p50", "init_ratio_p99", "duration_ratio_p50", "duration_ratio_p99",
             "init_timeouts")
_LANDING = ("busiest_10pct_share", "busiest_environment_invocations", "peak_unconnected_environments_while_frozen_hold")
_FUNCTION_FIGURES = ("invocations", "ok", "achieved_rps", "arrival_rps", "dispatched_rps", "cold_starts",
                     "init_timeouts", "peak_environments", "environments", "absorbed_errors", "target_rps")
_APPLICATION_FIGURES = ("peak_connections", "peak_held_by_frozen", "peak_held_by_vanished")

_EXPRESSION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Threshold:
    """One criterion: `field op limit`."""

    expression: str
    field: str
    op: str
    limit: float

    def passes(self, value: float) -> bool:
        """Whether `value` meets the criterion."""
        return OPERATORS[self.op](value, self.limit)


def fields(applications: Iterable[str] = ()) -> list[str]:
    """Every field a threshold may name (for suggestions and the README)."""
    names = list(_NUMBERS) + list(DERIVED)
    names += [f"{d}.{p}" for d in _DISTRIBUTIONS for p in _PERCENTILES]
    names += [f"{c}.{k}" for c, keys in _COUNTERS.items() for k in keys]
    names += [f"fidelity.{f}" for f in _FIDELITY] + [f"fidelity.dispatch_lag_ms.{p}" for p in _PERCENTILES]
    names += [f"where_errors_land.{f}" for f in _LANDING]
    for app in applications:
        names += [f"functions.{app}.{f}" for f in _FUNCTION_FIGURES]
        names += [f"functions.{app}.{d}.{p}" for d in _DISTRIBUTIONS for p in _PERCENTILES]
        names += [f"functions.{app}.{c}.{k}" for c, keys in _COUNTERS.items() for k in keys]
        names += [f"applications.{app}.{f}" for f in _APPLICATION_FIGURES]
    return names


def parse_threshold(text: str, applications: Iterable[str] | None = None) -> Threshold:
    """Parse `field<op>number`; ValueError says what is wrong and how to write it. With `applications`
    (the run's function and service names), the field must be one a summary can have."""
    match = _EXPRESSION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not FIELD OP NUMBER (OP one of {', '.join(sorted(OPERATORS))}), "
                         "e.g. 'peak_connections<250' or 'latency_ms.p99<1000'")
    field, op, number = match.groups()
    limit = float(number)
    if not math.isfinite(limit):
        raise ValueError(f"{text!r}: {number} is not a finite number")
    if applications is not None:
        known = fields(applications)
        if field not in known:
            near = get_close_matches(field, known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "see the README's summary.json fields"
            raise ValueError(f"{text!r}: {field!r} is not a summary field; {hint}")
    return Threshold(expression=f"{field}{op}{number}", field=field, op=op, limit=limit)


def value_of(summary: dict[str, Any], field: str) -> float | None:
    """The measured value of `field` in `summary` (0 for an absent counter), or None when not measured."""
    if field in DERIVED:
        return DERIVED[field](summary)
    node: Any = summary
    parts = field.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        # An absent key of a counter table (errors, throttles, statuses) is a count of zero.
        parent = parts[i - 1] if i else ""
        if isinstance(node, dict) and parent in _COUNTERS and i == len(parts) - 1:
            return 0.0
        return None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def evaluate(thresholds: Iterable[Threshold], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each threshold with its measured value and whether it passed (a value not measured fails)."""
    outcomes = []
    for threshold in thresholds:
        value = value_of(summary, threshold.field)
        outcomes.append({"threshold": threshold.expression, "value": None if value is None else round(value, 3),
                         "passed": value is not None and threshold.passes(value)})
    return outcomes


def failure_line(outcome: dict[str, Any]) -> str:
    """One line for a failed threshold: its expression and what was measured."""
    value = outcome["value"]
    measured = "not measured in this run" if value is None else f"measured {value:g}"
    return f"threshold failed: {outcome['threshold']} ({measured})"
