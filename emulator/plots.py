"""chart.png: the picture a team would put in a post-mortem, drawn only from the run directory.

1. Database connections over time: established sessions stacked by state (active, idle in transaction,
   idle), connection attempts still authenticating or being refused on top (hatched: not sessions),
   against the max_connections line; the share held by frozen and vanished environments outlined; the
   proxy's client and server connections when a proxy is on; and CloudWatch's view of the same series
   (DatabaseConnections, 1-minute Average and Maximum), the figures a team reads on its dashboard.
2. Environments by state.
3. Invocations per second by outcome, placed by actual start: every outcome has a colour no other one
   shares (ok green, throttled grey, timeouts blue, errors in warm colours).
4. Dispatch lag (actual start − scheduled), the emulator's own delay, on its own axis.

Invocations are read once, row by row, into per-second counters.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from .results import iter_csv, read_csv

STATE_COLOURS = {"active": "#d62728", "idle_in_transaction": "#ff7f0e", "idle": "#1f77b4"}

#: One colour per outcome (a status, or the error kind of a failed invocation); no two share one.
OUTCOME_COLOURS = {
    "ok": "#2ca02c",
    "throttled": "#7f7f7f",
    "timeout": "#1f3fb4",
    "interrupted": "#17becf",
    "too_many_connections": "#d62728",
    "pool_timeout": "#ff7f0e",
    "proxy_wait_timeout": "#e377c2",
    "connection_refused": "#8c564b",
    "connection_lost": "#ff9896",
    "authentication_failed": "#c49c94",
    "database_error": "#f7b6d2",
    "crash": "#843c39",
    "runtime_error": "#ad494a",
    "init_error": "#e7ba52",
    "out_of_memory": "#d6616b",
    "handler_error": "#fd8d3c",
}
_SPARE_COLOURS = ("#bcbd22", "#9edae5", "#637939", "#7b4173")


def outcome_of(row: dict[str, str]) -> str:
    """The outcome an invocation is counted under in the chart."""
    if row["status"] in ("ok", "throttled", "interrupted"):
        return row["status"]
    return row.get("error_kind") or row["status"]


def _series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else 0.0 for r in rows]


def chart(run_dir: Path, path: Path | None = None) -> Path:
    """Draw chart.png for `run_dir` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    run = json.loads((run_dir / "run.json").read_text())
    samples = read_csv(run_dir / "samples.csv")  # one row per sample: small
    config = run.get("config", {})
    max_conn = run.get("database", {}).get("max_connections")

    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    lag_max: dict[int, float] = {}
    for row in iter_csv(run_dir / "invocations.csv"):
        second = int(float(row["start_s"] or row["scheduled_s"]))
        per_second[outcome_of(row)][second] += 1
        if row.get("lag_ms") not in (None, ""):
            lag_max[second] = max(lag_max.get(second, 0.0), float(row["lag_ms"]))

    by_application = _by_application(run_dir / "connections.csv")
    panels = 5 if len(by_application) > 1 else 4
    ratios = [3, 2.4, 1.5, 1.6, 1.1] if panels == 5 else [3, 1.5, 1.6, 1.1]
    fig, axes = plt.subplots(panels, 1, figsize=(11, 11 + 2.5 * (panels - 4)), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    ax_conn, ax_env, ax_inv, ax_lag = axes[0], axes[-3], axes[-2], axes[-1]
    if panels == 5:
        _application_panel(axes[1], by_application, max_conn)
    title = (f"lambdaemu {run.get('run_id', '')}: {config.get('rps', '?')} req/s, pool max "
             f"{config.get('pool_max', '?')}, {config.get('handler', '')} [{run.get('status', '?')}]")
    fig.suptitle(title, fontsize=11)
    t = _series(samples, "t_s")

    if samples:
        states = list(STATE_COLOURS)
        layers = [_series(samples, s) for s in states] + [_series(samples, "connecting")]
        labels = [s.replace("_", " ") for s in states] + ["connecting / being refused (not sessions)"]
        colours = [STATE_COLOURS[s] for s in states] + ["#bbbbbb"]
        stacks = ax_conn.stackplot(t, *layers, labels=labels, colors=colours, alpha=0.75, step="post")
        stacks[-1].set_hatch("///")
        frozen = [a + b for a, b in zip(_series(samples, "held_frozen"), _series(samples, "held_vanished"))]
        if any(frozen):
            ax_conn.step(t, frozen, where="post", color="black", linestyle="--", linewidth=1.2,
                         label="held by frozen + vanished envs")
        if any(r.get("proxy_clients") for r in samples):
            ax_conn.step(t, _series(samples, "proxy_clients"), where="post", color="#9467bd", linewidth=1.5,
                         label="proxy client connections")
            ax_conn.step(t, _series(samples, "proxy_servers"), where="post", color="#2ca02c", linewidth=1.5,
                         label="proxy server connections")
        _cloudwatch(ax_conn, run, samples)
    if max_conn:
        ax_conn.axhline(max_conn, color="red", linewidth=2, label=f"max_connections = {max_conn}")
    ax_conn.set_ylabel("database connections")
    _legend(ax_conn, ncol=2)
    ax_conn.grid(alpha=0.3)

    if samples:
        for key, colour in (("envs_busy", "#d62728"), ("envs_frozen", "#1f77b4"),
                            ("envs_initialising", "#ff7f0e"), ("envs_vanished", "#7f7f7f")):
            values = _series(samples, key)
            if any(values):
                ax_env.step(t, values, where="post", color=colour, label=key.replace("envs_", ""))
    ax_env.set_ylabel("environments")
    _legend(ax_env, ncol=4)
    ax_env.grid(alpha=0.3)

    if per_second:
        xs = list(range(min(min(c) for c in per_second.values()), max(max(c) for c in per_second.values()) + 1))
        bottom = [0] * len(xs)
        spare = iter(_SPARE_COLOURS)
        order = sorted(per_second, key=lambda o: (o != "ok", o == "throttled", o))
        for outcome in order:
            counts = per_second[outcome]
            ys = [counts.get(x, 0) for x in xs]
            colour = OUTCOME_COLOURS.get(outcome) or next(spare, "#000000")
            ax_inv.bar(xs, ys, bottom=bottom, width=1.0, align="edge", color=colour, label=outcome, alpha=0.85)
            bottom = [b + y for b, y in zip(bottom, ys)]
    ax_inv.set_ylabel("invocations / s\n(by actual start)")
    _legend(ax_inv, ncol=4)
    ax_inv.grid(alpha=0.3)

    if lag_max:
        seconds = sorted(lag_max)
        ax_lag.step(seconds, [max(lag_max[s], 0.001) for s in seconds], where="post", color="#444444",
                    label="max dispatch lag in each second")
        ax_lag.set_yscale("log")
        ax_lag.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax_lag.axhline(20, color="#d62728", linestyle=":", linewidth=1, label="20 ms: the emulator fell behind")
    ax_lag.set_ylabel("lag (ms)")
    ax_lag.set_xlabel("seconds since run start")
    _legend(ax_lag, ncol=2)
    ax_lag.grid(alpha=0.3)

    fig.tight_layout()
    out = path or run_dir / "chart.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _by_application(path: Path) -> dict[str, dict[float, float]]:
    """Established connections per application (database user) at each sample time, from connections.csv."""
    series: dict[str, dict[float, float]] = defaultdict(dict)
    times: set[float] = set()
    for row in iter_csv(path):
        t = float(row["t_s"])
        times.add(t)
        if row["state"] != "connecting":
            by_t = series[row["application"] or "?"]
            by_t[t] = by_t.get(t, 0.0) + int(row["count"])
    return {app: {t: values.get(t, 0.0) for t in sorted(times)} for app, values in sorted(series.items())}


def _application_panel(ax: object, by_application: dict[str, dict[float, float]], max_conn: object) -> None:
    """The picture a team draws in its post-mortem: who holds the connections, against the limit."""
    times = sorted(next(iter(by_application.values())))
    ax.stackplot(times, *[[series[t] for t in times] for series in by_application.values()],
                 labels=list(by_application), alpha=0.8, step="post")
    if max_conn:
        ax.axhline(max_conn, color="red", linewidth=2, label=f"max_connections = {max_conn}")
    ax.set_ylabel("connections\nby application")
    _legend(ax, ncol=4)
    ax.grid(alpha=0.3)


def _cloudwatch(ax: object, run: dict, samples: list[dict[str, str]]) -> None:
    """Overlay CloudWatch's DatabaseConnections view: 1-minute Average and Maximum, on wall-clock minutes."""
    t0_unix = run.get("t0_unix")
    if t0_unix is None or not samples:
        return
    minutes: dict[int, list[float]] = {}
    for r in samples:
        if r.get("connections") in (None, ""):
            continue
        minute = int((t0_unix + float(r["t_s"])) // 60)
        minutes.setdefault(minute, []).append(float(r["connections"]))
    if len(minutes) < 2:
        return  # one period says nothing a line can show
    edges, averages, maxima = [], [], []
    for minute, values in sorted(minutes.items()):
        edges.append(minute * 60 - t0_unix)
        averages.append(sum(values) / len(values))
        maxima.append(max(values))
    ax.step(edges, averages, where="post", color="#ff00ff", linewidth=1.4, label="CloudWatch 1-min Average")
    ax.step(edges, maxima, where="post", color="#ff00ff", linewidth=1.0, linestyle=":",
            label="CloudWatch 1-min Maximum")


def _legend(ax: object, ncol: int) -> None:
    # An axis with nothing labelled gets no legend (matplotlib would warn on stderr).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8, ncol=ncol)
