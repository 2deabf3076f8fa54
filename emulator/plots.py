"""chart.png: the picture a team would put in a post-mortem, drawn only from the run directory.

Top: database connections over time, stacked by state (active, idle in transaction, idle, other),
against the max_connections line, with the share held by frozen and vanished environments outlined
(and the proxy's client and server connections when a proxy is on). Middle: environments by state.
Bottom: invocations per second by outcome (ok, errors by kind, throttled).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .results import read_csv

STATE_COLOURS = {"active": "#d62728", "idle_in_transaction": "#ff7f0e", "idle": "#1f77b4", "other": "#7f7f7f"}


def _series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else 0.0 for r in rows]


def _legend(ax: Any, **options: Any) -> None:
    # A run that ended before anything was drawn (failed or stopped while starting) has no labelled
    # artist; matplotlib would warn on the user's terminal about an empty legend.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def chart(run_dir: Path, path: Path | None = None) -> Path:
    """Draw chart.png for `run_dir` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads((run_dir / "run.json").read_text())
    samples = read_csv(run_dir / "samples.csv")
    invocations = read_csv(run_dir / "invocations.csv")
    config = run.get("config", {})
    max_conn = run.get("database", {}).get("max_connections")

    fig, (ax_conn, ax_env, ax_inv) = plt.subplots(
        3, 1, figsize=(11, 9), sharex=True, gridspec_kw={"height_ratios": [3, 1.6, 1.6]})
    t = _series(samples, "t_s")
    title = (f"lambdaemu {run.get('run_id', '')}: {config.get('rps', '?')} req/s, pool max "
             f"{config.get('pool_max', '?')}, {config.get('handler', '')} [{run.get('status', '?')}]")
    fig.suptitle(title, fontsize=11)

    if samples:
        states = list(STATE_COLOURS)
        ax_conn.stackplot(t, *[_series(samples, s) for s in states], labels=[s.replace("_", " ") for s in states],
                          colors=[STATE_COLOURS[s] for s in states], alpha=0.75, step="post")
        frozen = [a + b for a, b in zip(_series(samples, "held_frozen"), _series(samples, "held_vanished"))]
        if any(frozen):
            ax_conn.step(t, frozen, where="post", color="black", linestyle="--", linewidth=1.2,
                         label="held by frozen + vanished envs")
        if any(r.get("proxy_clients") for r in samples):
            ax_conn.step(t, _series(samples, "proxy_clients"), where="post", color="#9467bd", linewidth=1.5,
                         label="proxy client connections")
            ax_conn.step(t, _series(samples, "proxy_servers"), where="post", color="#2ca02c", linewidth=1.5,
                         label="proxy server connections")
    if max_conn:
        ax_conn.axhline(max_conn, color="red", linewidth=2, label=f"max_connections = {max_conn}")
    ax_conn.set_ylabel("database connections")
    _legend(ax_conn, loc="upper left", fontsize=8, ncol=2)
    ax_conn.grid(alpha=0.3)

    if samples:
        for key, colour in (("envs_busy", "#d62728"), ("envs_frozen", "#1f77b4"),
                            ("envs_initialising", "#ff7f0e"), ("envs_vanished", "#7f7f7f")):
            values = _series(samples, key)
            if any(values):
                ax_env.step(t, values, where="post", color=colour, label=key.replace("envs_", ""))
    ax_env.set_ylabel("environments")
    _legend(ax_env, loc="upper left", fontsize=8, ncol=4)
    ax_env.grid(alpha=0.3)

    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    for row in invocations:
        outcome = "ok" if row["status"] == "ok" else (
            "throttled" if row["status"] == "throttled" else row["error_kind"] or row["status"])
        per_second[outcome][int(float(row["scheduled_s"]))] += 1
    if per_second:
        seconds = range(min(min(c) for c in per_second.values()), max(max(c) for c in per_second.values()) + 1)
        xs = list(seconds)
        bottom = [0] * len(xs)
        palette = plt.get_cmap("tab10")
        for i, (outcome, counts) in enumerate(sorted(per_second.items(), key=lambda kv: kv[0] != "ok")):
            ys = [counts.get(x, 0) for x in xs]
            colour = "#2ca02c" if outcome == "ok" else palette(i % 10)
            ax_inv.bar(xs, ys, bottom=bottom, width=1.0, align="edge", color=colour, label=outcome, alpha=0.8)
            bottom = [b + y for b, y in zip(bottom, ys)]
    ax_inv.set_ylabel("invocations / s")
    ax_inv.set_xlabel("seconds since run start")
    _legend(ax_inv, loc="upper left", fontsize=8, ncol=4)
    ax_inv.grid(alpha=0.3)

    fig.tight_layout()
    out = path or run_dir / "chart.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
