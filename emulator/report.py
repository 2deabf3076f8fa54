"""report.html: one self-contained page for a run or a sweep, recomputed from the files.

The summary is recomputed from the CSV files (streaming, `results.summarize`) and the charts are drawn
again (`plots`), so a report says what the files say, even for a run that was killed before it wrote its
own summary. Everything is in the one file: charts as base64 PNG, the style inline, no script, no font,
nothing fetched; a Content-Security-Policy says so to the browser (`default-src 'none'`), so a page that
tried to load anything would show it as an error rather than quietly reach the network. The run's own
files are left as they are; only report.html is written.

A run's page: its configuration, the summary figures, warnings and fidelity, thresholds when the run had
some, connections over time by state, environments, invocations by outcome and the dispatch lag
(`plots.chart`), connections by application (`plots.applications_chart`), latency and errors
(`plots.latency_chart`),
per-function and per-application figures, the first message of each error kind, and summary.json itself.
A sweep's page: the comparison table (with the spread over repeats), sweep.png, and every run's page.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import UsageError

#: What the page may load: nothing but its own inline style and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 1em; margin: 0.5em 0; }
.bad { color: #b00020; font-weight: bold; } .ok { color: #1b7f2a; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.status { display: inline-block; padding: 1px 8px; border-radius: 3px; background: #eee; }
"""


def write_report(directory: Path, out: Path | None = None) -> Path:
    """Write the report of `directory` (a run's or a sweep's) to `out` (default: directory/report.html)
    and return its path. Raises UsageError for a directory that is neither."""
    if (directory / "sweep.json").is_file():
        title, body = _sweep_page(directory)
    elif (directory / "run.json").is_file():
        info = json.loads((directory / "run.json").read_text())
        title, body = f"lambdaemu run {info.get('run_id', directory.name)}", _run_section(directory, level=2)
    else:
        raise UsageError(f"{directory}: neither a run directory (run.json) nor a sweep directory (sweep.json); "
                         "give the directory a run or a sweep wrote")
    out = out or directory / "report.html"
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out: cannot write {out}; give a file in an existing directory")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n"
            "</body></html>\n")
    out.write_text(page, encoding="utf-8")
    return out


# --- a run -------------------------------------------------------------------------------------------------


def _run_section(run_dir: Path, level: int) -> str:
    from .plots import applications_chart, chart, latency_chart
    from .results import summarize

    info = json.loads((run_dir / "run.json").read_text())
    summary = summarize(run_dir)  # thresholds included: they are evaluated from the recomputed figures
    thresholds = summary.get("thresholds")
    h = f"h{level}"
    parts = [f"<p><span class=\"status\">{_e(summary.get('status'))}</span> {_e(run_dir)}"
             f"{' — started ' + _e(info['started_at']) if info.get('started_at') else ''}"
             f"{' — ' + _e(info['error']) if info.get('error') else ''}</p>"]
    for warning in summary.get("warnings") or ():
        parts.append(f"<div class=\"warn\">⚠ {_e(warning)}</div>")
    parts.append(f"<{h}>Summary</{h}>" + _summary_table(summary))
    if thresholds:
        parts.append(f"<{h}>Thresholds</{h}>" + _thresholds_table(thresholds))
    parts.append(f"<{h}>Connections, environments, invocations</{h}>"
                 + _image(lambda path: chart(run_dir, path), "connections over time by state, environments, "
                          "invocations by outcome, dispatch lag"))
    parts.append(f"<{h}>Connections by application</{h}>"
                 + _image(lambda path: applications_chart(run_dir, path), "connections over time by application"))
    parts.append(f"<{h}>Latency and errors</{h}>"
                 + _image(lambda path: latency_chart(run_dir, path), "latency histogram and latency over time"))
    errors = {k: v for k, v in (summary.get("errors") or {}).items() if k != "total"}
    if errors:
        first = summary.get("first_error") or {}
        parts.append(_table(("error kind", "invocations", "first message"),
                            [(k, v, first.get(k, "")) for k, v in errors.items()]))
    parts.append(f"<{h}>Fidelity</{h}>" + _fidelity_table(summary.get("fidelity") or {}))
    functions = summary.get("functions") or {}
    if functions:
        parts.append(f"<{h}>By function</{h}>" + _table(
            ("function", "invocations", "ok", "cold starts", "errors", "throttles", "peak environments",
             "latency p99 ms"),
            [(name, f.get("invocations"), f.get("ok"), f.get("cold_starts"), (f.get("errors") or {}).get("total"),
              (f.get("throttles") or {}).get("total"), f.get("peak_environments"),
              (f.get("latency_ms") or {}).get("p99")) for name, f in functions.items()]))
    applications = summary.get("applications") or {}
    if applications:
        parts.append(f"<{h}>By application (database user)</{h}>" + _table(
            ("application", "peak connections", "peak held by frozen", "peak held by vanished"),
            [(name, a.get("peak_connections"), a.get("peak_held_by_frozen"), a.get("peak_held_by_vanished"))
             for name, a in applications.items()]))
    parts.append(f"<{h}>Configuration</{h}>" + _config_table(info))
    parts.append("<details><summary>summary.json (recomputed from the files)</summary><pre>"
                 + _e(json.dumps(summary, indent=2)) + "</pre></details>")
    return "\n".join(parts)


def _summary_table(summary: Mapping[str, Any]) -> str:
    from .compare import figures

    row = figures(summary)
    latency = summary.get("latency_ms") or {}
    peak_class = "bad" if (row.get("peak_percent") or 0) >= 90 else ""
    rows = [
        ("target → achieved rps", f"{summary.get('target_rps')} → {summary.get('achieved_rps')}"),
        ("invocations (ok)", f"{summary.get('invocations')} ({summary.get('ok')})"),
        ("peak connections / max_connections", (f"{row['peak_connections']} / {row['max_connections']} "
                                                f"({row['peak_percent']} %)", peak_class)),
        ("peak held by frozen / vanished environments",
         f"{summary.get('peak_held_by_frozen')} / {summary.get('peak_held_by_vanished')}"),
        ("connections opened (peak per s)",
         f"{summary.get('connections_opened')} ({summary.get('peak_connections_opened_per_s')})"),
        ("refused by the server / absorbed by libraries",
         f"{summary.get('refused_by_server')} / {summary.get('refused_absorbed_by_libraries')}"),
        ("errors", (", ".join(f"{k} {v}" for k, v in (summary.get("errors") or {}).items()) or "none",
                    "bad" if row["errors"] else "ok")),
        ("throttles", ", ".join(f"{k} {v}" for k, v in (summary.get("throttles") or {}).items()) or "none"),
        ("cold starts", summary.get("cold_starts")),
        ("peak environments (ideal)", f"{summary.get('peak_environments')} ({row['ideal_peak_environments']})"),
        ("latency ms p50 / p95 / p99 / max",
         f"{latency.get('p50')} / {latency.get('p95')} / {latency.get('p99')} / {latency.get('max')}"),
    ]
    if "peak_proxy_clients" in summary:
        rows.append(("proxy clients / servers / waiting (peak)",
                     f"{summary['peak_proxy_clients']} / {summary['peak_proxy_servers']} / "
                     f"{summary.get('peak_proxy_waiting')}"))
        rows.append(("proxy cap (peak over it)",
                     f"{summary.get('proxy_max_db_connections')} ({summary.get('peak_over_proxy_cap')})"))
    return _table(("figure", "value"), rows)


def _thresholds_table(thresholds: Sequence[Mapping[str, Any]]) -> str:
    return _table(("threshold", "measured", "outcome"),
                  [(t.get("threshold"), t.get("value"), ("pass", "ok") if t.get("passed") else ("FAIL", "bad"))
                   for t in thresholds])


def _fidelity_table(fidelity: Mapping[str, Any]) -> str:
    lag = fidelity.get("dispatch_lag_ms") or {}
    rows = [
        ("dispatch lag ms p50 / p99 / max", f"{lag.get('p50')} / {lag.get('p99')} / {lag.get('max')}"),
        ("dispatched rps over span s", f"{fidelity.get('dispatched_rps')} over {fidelity.get('dispatch_span_s')}"),
        ("ideal peak environments", fidelity.get("ideal_peak_environments")),
        ("samples (missed, longest gap s)",
         f"{fidelity.get('samples')} ({fidelity.get('samples_missed')}, {fidelity.get('longest_sample_gap_s')})"),
        ("init ratio to baseline p50 / p99", f"{fidelity.get('init_ratio_p50')} / {fidelity.get('init_ratio_p99')}"),
        ("duration ratio to baseline p50 / p99",
         f"{fidelity.get('duration_ratio_p50')} / {fidelity.get('duration_ratio_p99')}"),
    ]
    return _table(("figure", "value"), rows)


def _config_table(info: Mapping[str, Any]) -> str:
    config = info.get("config") or {}
    database = info.get("database") or {}
    rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in config.items()]
    rows += [("database." + k, json.dumps(v) if isinstance(v, (dict, list)) else v)
             for k, v in database.items() if k in ("engine", "provider", "version", "max_connections", "users")]
    rows += [("seed", info.get("seed")), ("host", json.dumps(info.get("host"))),
             ("versions", json.dumps(info.get("versions")))]
    scenario = info.get("scenario")
    text = _table(("setting", "value"), rows)
    if scenario:
        text += ("<details><summary>scenario " + _e(scenario.get("source")) + "</summary><pre>"
                 + _e(json.dumps(scenario, indent=2)) + "</pre></details>")
    return text


# --- a sweep -----------------------------------------------------------------------------------------------


def _sweep_page(sweep_dir: Path) -> tuple[str, str]:
    from .compare import figures, read_summary
    from .plots import sweep_chart
    from .results import summarize
    from .sweeps import point_rows

    data = json.loads((sweep_dir / "sweep.json").read_text())
    axes = list(data.get("axes") or ())
    rows, panels, sections = [], {}, []
    for entry in data.get("runs") or ():
        run_dir = sweep_dir / entry["dir"]
        title = entry["point"] + (f" (repeat {entry['repeat']})" if entry["repeat"] > 1 else "")
        if not (run_dir / "run.json").exists():
            sections.append(f"<details><summary>{_e(title)}: {_e(entry['status'])}</summary><p>not run</p></details>")
            continue
        summary = summarize(run_dir) if entry["status"] != "complete" else read_summary(run_dir)
        rows.append({"point": entry["point"], **entry["values"], "repeat": entry["repeat"], "seed": entry["seed"],
                     **figures(summary)})
        if entry["status"] == "complete":
            panels.setdefault(entry["point"], []).append(run_dir)
        sections.append(f"<details><summary>{_e(title)}: {_e(entry['status'])}</summary>"
                        f"{_run_section(run_dir, level=4)}</details>")
    missing = [r["dir"] for r in data.get("runs") or () if r["status"] != "complete"]
    parts = [f"<p><span class=\"status\">{_e(data.get('status'))}</span> {_e(sweep_dir)} — "
             f"{len(data.get('runs') or ())} runs over {', '.join(map(_e, axes)) or 'no axis'}"
             f"{', repeat ' + str(data['spec'].get('repeat')) if (data.get('spec') or {}).get('repeat', 1) > 1 else ''}"
             "</p>"]
    if missing:
        parts.append(f"<div class=\"warn\">Missing runs (not complete): {_e('; '.join(missing))}. Continue with "
                     f"<code>lambdaemu sweep --resume {_e(sweep_dir)}</code>.</div>")
    if rows:
        parts.append("<h2>Comparison</h2>" + _rows_table(point_rows(rows, axes), ["point", "runs"]))
        if any(r["repeat"] > 1 for r in rows):
            parts.append("<p>Numbers are the median over the repeats, with the min–max range.</p>")
    if panels:
        parts.append("<h2>Connections over time, by point</h2>"
                     + _image(lambda path: sweep_chart(list(panels.items()), path), "a panel per point"))
    parts.append("<h2>Runs</h2>" + "\n".join(sections))
    spec = data.get("spec") or {}
    parts.append("<details><summary>sweep specification</summary><pre>" + _e(json.dumps(spec, indent=2))
                 + "</pre></details>")
    return f"lambdaemu sweep {data.get('sweep_id', sweep_dir.name)}", "\n".join(parts)


def _rows_table(rows: Sequence[Mapping[str, Any]], leading: Sequence[str]) -> str:
    from .compare import HEADERS, columns, show

    names = columns(rows, leading)
    return _table([HEADERS.get(n, n) for n in names], [[show(r.get(n)) for n in names] for r in rows])


# --- HTML pieces --------------------------------------------------------------------------------------------


def _image(draw: Callable[[Path], Any], alt: str) -> str:
    """A chart drawn to a temporary PNG and embedded as data; a chart that cannot be drawn says why."""
    with tempfile.TemporaryDirectory(prefix="lambdaemu-report-") as tmp:
        path = Path(tmp) / "chart.png"
        try:
            draw(path)
        except Exception as exc:  # noqa: BLE001 - one chart must not cost the report
            return f"<p class=\"bad\">chart not drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            css = ""
            if isinstance(cell, tuple):
                cell, css = cell
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            classes = " ".join(c for c in (css, "n" if numeric else "") if c)
            cells.append(f"<td{f' class={chr(34)}{classes}{chr(34)}' if classes else ''}>"
                         f"{_e('—' if cell is None else cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _e(value: Any) -> str:
    return html.escape(str(value))
