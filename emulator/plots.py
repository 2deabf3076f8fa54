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
from typing import Any

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


# --- comparing runs ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib's pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax: Any, xlabel: str, ylabel: str, ncol: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, ncol=ncol)


def _save(fig: Any, out: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def connections_over_time(run_dir: Path) -> tuple[list[float], list[float], int | None]:
    """A run's established connections at each sample, with time in seconds since its load started (so
    runs line up), and its max_connections; read row by row from samples.csv."""
    run = json.loads((run_dir / "run.json").read_text())
    start = run.get("load_start_s") or 0.0
    times, counts = [], []
    for row in iter_csv(run_dir / "samples.csv"):
        if row.get("connections") not in (None, ""):
            times.append(float(row["t_s"]) - start)
            counts.append(float(row["connections"]))
    return times, counts, (run.get("database") or {}).get("max_connections")


def sweep_chart(panels: list[tuple[str, list[Path]]], out: Path) -> Path:
    """sweep.png: one panel per combination (its title, the run directories of its repeats), all on the
    same axes: connections over time against max_connections."""
    plt = _pyplot()

    columns = min(3, max(1, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.0 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    top = 1.0
    for ax, (title, run_dirs) in zip(axes.flat, panels):
        limits = set()
        for i, run_dir in enumerate(run_dirs):
            times, counts, limit = connections_over_time(run_dir)
            top = max(top, limit or 0, *counts)
            ax.step(times, counts, where="post", color="#1f77b4", alpha=1.0 if i == 0 else 0.5, linewidth=1.2,
                    label="connections" if i == 0 else None)
            if limit:
                limits.add(limit)
        for limit in sorted(limits):
            ax.axhline(limit, color="red", linewidth=1.5, label=f"max_connections = {limit}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax, ncol=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    # Room above the highest line for the legend; every panel shows its time axis (the grid may be ragged).
    axes.flat[0].set_ylim(0, top * 1.35)
    for ax in list(axes.flat)[:len(panels)]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("seconds since load start", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("connections")
    return _save(fig, out, dpi=90)


def overlay_chart(run_dirs: list[Path], labels: list[str], out: Path) -> Path:
    """compare.png: every run's connections over time on one axis, with each distinct max_connections."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(11, 5))
    limits: dict[int, list[str]] = {}
    for run_dir, label in zip(run_dirs, labels):
        times, counts, limit = connections_over_time(run_dir)
        ax.step(times, counts, where="post", linewidth=1.5, label=label)
        if limit:
            limits.setdefault(limit, []).append(label)
    for limit in sorted(limits):
        ax.axhline(limit, color="red", linewidth=1.5, linestyle="-" if len(limits) == 1 else "--",
                   label=f"max_connections = {limit}" + ("" if len(limits) == 1 else f" ({', '.join(limits[limit])})"))
    _label(ax, "seconds since load start", "database connections", ncol=2)
    return _save(fig, out, dpi=100)


#: Latency histogram bins: 40 per decade from 0.1 ms to 1000 s, fixed so that a long run costs no memory.
_LATENCY_BINS = [10 ** (-1 + i / 40) for i in range(7 * 40 + 1)]


def latency_chart(run_dir: Path, out: Path) -> Path:
    """Latency and errors: a histogram of invocation latency (end − scheduled) for successes and failures,
    and each second's mean and maximum latency with its failures, read row by row from invocations.csv."""
    import bisect

    plt = _pyplot()

    histogram: dict[str, Counter[int]] = {"ok": Counter(), "failed": Counter()}
    total: Counter[int] = Counter()
    count: Counter[int] = Counter()
    worst: dict[int, float] = {}
    failed: Counter[int] = Counter()
    for row in iter_csv(run_dir / "invocations.csv"):
        if row["status"] == "throttled" or row.get("latency_ms") in (None, ""):
            continue
        latency = float(row["latency_ms"])
        outcome = "ok" if row["status"] == "ok" else "failed"
        # Bin i holds (_LATENCY_BINS[i - 1], _LATENCY_BINS[i]]; the ends take what lies beyond them.
        histogram[outcome][min(max(bisect.bisect_left(_LATENCY_BINS, latency), 1), len(_LATENCY_BINS) - 1)] += 1
        second = int(float(row["start_s"] or row["scheduled_s"]))
        total[second] += latency
        count[second] += 1
        worst[second] = max(worst.get(second, 0.0), latency)
        failed[second] += outcome == "failed"
    fig, (ax_hist, ax_time) = plt.subplots(2, 1, figsize=(11, 6.5))
    for outcome, colour in (("ok", "#2ca02c"), ("failed", "#d62728")):
        if histogram[outcome]:
            bins = sorted(histogram[outcome])
            ax_hist.bar([_LATENCY_BINS[b - 1] for b in bins], [histogram[outcome][b] for b in bins],
                        width=[_LATENCY_BINS[b] - _LATENCY_BINS[b - 1] for b in bins], align="edge", color=colour,
                        alpha=0.7, label=outcome)
    ax_hist.set_xscale("log")
    _label(ax_hist, "latency ms (end − scheduled)", "invocations", ncol=2)
    if count:
        seconds = sorted(count)
        ax_time.step(seconds, [total[s] / count[s] for s in seconds], where="post", color="#1f77b4",
                     label="mean latency in each second")
        ax_time.step(seconds, [worst[s] for s in seconds], where="post", color="#444444", linestyle=":",
                     label="max latency in each second")
        ax_time.set_yscale("log")
        if any(failed.values()):
            ax_fail = ax_time.twinx()
            ax_fail.bar(seconds, [failed[s] for s in seconds], width=1.0, align="edge", color="#d62728", alpha=0.3,
                        label="failed invocations / s")
            ax_fail.set_ylabel("failed / s")
            _legend(ax_fail, ncol=1)
    _label(ax_time, "seconds since run start (by actual start)", "latency ms", ncol=2)
    return _save(fig, out, dpi=90)


def applications_chart(run_dir: Path, out: Path) -> Path:
    """Connections over time stacked by application (database user) against max_connections, from
    connections.csv: the post-mortem picture of who holds the connections, for one application or many."""
    plt = _pyplot()
    run = json.loads((run_dir / "run.json").read_text())
    by_application = _by_application(run_dir / "connections.csv")
    fig, ax = plt.subplots(figsize=(11, 3.6))
    if by_application:
        _application_panel(ax, by_application, (run.get("database") or {}).get("max_connections"))
    ax.set_xlabel("seconds since run start")
    return _save(fig, out, dpi=90)
