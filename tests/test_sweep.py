"""`lambdaemu sweep`, `compare` and `report` as a user runs them: real commands, real servers, real runs;
the report opened in a real headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import LAMBDAEMU, ROOT, cli_env, lambdaemu, wait_for_status

#: A point runs for about two seconds: enough for a few environments and samples.
QUICK = ["--rps", "10", "--duration", "2s", "--work", "100ms", "--baseline", "off", "--sample-interval", "200ms",
         "--init-delay", "0"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def sweep_servers(out: Path) -> list[int]:
    """Database servers of the sweep in `out` still running (their work directories carry its id)."""
    marker = "lambdaemu-" + json.loads((out / "sweep.json").read_text())["sweep_id"]
    return [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def database_port(run_dir: Path) -> int:
    return json.loads((run_dir / "run.json").read_text())["database"]["port"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Four points over two axes, one of which (max_connections) changes what the server is."""
    cwd = tmp_path_factory.mktemp("sweep")
    out = cwd / "sweep"
    result = lambdaemu("sweep", "--pool-max", "1,2", "--max-connections", "20,30", *QUICK, "--seed", "7",
                       "--threshold", "errors.too_many_connections==0", "--out", str(out), cwd=cwd, timeout=240)
    return out, result


def test_sweep_runs_every_point_and_compares_them(finished_sweep):
    out, result = finished_sweep
    assert result.returncode == 0, result.stderr
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "complete" and state["missing"] == []
    points = [r["point"] for r in state["runs"]]
    assert points == ["pool_max=1,max_connections=20", "pool_max=1,max_connections=30",
                      "pool_max=2,max_connections=20", "pool_max=2,max_connections=30"]
    rows = read_rows(out / "sweep.csv")
    assert [r["point"] for r in rows] == points
    for row in rows:
        assert row["status"] == "complete" and row["seed"] == "7"
        assert int(row["peak_connections"]) > 0 and row["max_connections"] == row["point"].split("=")[-1]
        for column in ("peak_percent", "errors", "throttles", "cold_starts", "latency_p50_ms", "latency_p99_ms",
                       "dispatch_lag_p99_ms", "peak_environments", "ideal_peak_environments", "warnings"):
            assert row[column] != "", column
        assert row["thresholds_failed"] == "0"
        summary = json.loads((out / row["run_dir"] / "summary.json").read_text())
        assert float(row["peak_percent"]) == round(100 * summary["peak_connections"] / summary["max_connections"], 1)
    # The same table in the terminal, and the chart with a panel per point.
    assert "pool_max=2,max_connections=30" in result.stdout and "peak conn" in result.stdout
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not sweep_servers(out), "a sweep left a database server running"


def test_sweep_shares_a_server_only_where_it_is_the_same_server(finished_sweep):
    out, _ = finished_sweep
    ports = {d.name: database_port(d) for d in out.iterdir() if d.is_dir()}
    assert ports["pool_max=1,max_connections=20"] == ports["pool_max=2,max_connections=20"]
    assert ports["pool_max=1,max_connections=30"] == ports["pool_max=2,max_connections=30"]
    assert ports["pool_max=1,max_connections=20"] != ports["pool_max=1,max_connections=30"]
    # Fresh state: every point's first sample, taken before its load, sees no connection of an earlier point.
    for directory in out.iterdir():
        if directory.is_dir():
            first = read_rows(directory / "samples.csv")[0]
            assert first["connections"] == "0", directory.name


def test_compare_and_report_of_the_sweep_runs(finished_sweep, tmp_path):
    out, _ = finished_sweep
    runs = [out / "pool_max=1,max_connections=20", out / "pool_max=2,max_connections=30"]
    result = lambdaemu("compare", *map(str, runs), "--csv", str(tmp_path / "compare.csv"),
                       "--out", str(tmp_path / "compare.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "compare.csv")
    # The settings that differ lead the rows; the figures are those of sweep.csv.
    assert [(r["run"], r["pool_max"], r["max_connections"]) for r in rows] == [
        (runs[0].name, "1", "20"), (runs[1].name, "2", "30")]
    sweep_rows = {r["point"]: r for r in read_rows(out / "sweep.csv")}
    for row, run_dir in zip(rows, runs):
        assert row["peak_connections"] == sweep_rows[run_dir.name]["peak_connections"]
    assert (tmp_path / "compare.png").stat().st_size > 10_000

    for directory in (runs[0], out):
        result = lambdaemu("report", str(directory), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        page = directory / "report.html"
        text = page.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:|//)|url\(|@import""", text), "the report loads something"
        assert "Content-Security-Policy" in text
        check = open_in_browser(page, tmp_path)
        assert check["errors"] == [] and check["images"] >= 3 and check["loaded"] == check["images"], check
    assert "pool_max=2,max_connections=30" in (out / "report.html").read_text()
    assert screenshot_is_not_blank(runs[0] / "report.html", tmp_path)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Debian's chromium, headless, with nothing that reaches out of the machine."""
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: scripts/install-system-deps installs it (apt-get install chromium)"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


#: Added to a copy of the report: records every error, CSP violation and console error, then writes what
#: it found, with how many images loaded, into the page for --dump-dom.
CHECK_SCRIPT = """<script>
window.__seen = [];
window.addEventListener('error', e => __seen.push('error: ' + (e.message || (e.target && e.target.src))), true);
document.addEventListener('securitypolicyviolation', e => __seen.push('blocked: ' + e.blockedURI));
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = (...args) => { __seen.push(level + ': ' + args.join(' ')); original.apply(console, args); };
}
window.addEventListener('load', () => {
  const images = [...document.images];
  const out = document.createElement('pre');
  out.id = 'lambdaemu-check';
  out.textContent = JSON.stringify({images: images.length, errors: __seen,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length, text: document.body.innerText.length});
  document.body.appendChild(out);
});
</script>"""


def open_in_browser(page: Path, tmp_path: Path) -> dict:
    """Load the page in Chromium and return what CHECK_SCRIPT found."""
    text = page.read_text()
    # The page allows no script at all; the copy allows this one inline script, and nothing else.
    text = text.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'", 1)
    copy = tmp_path / f"checked-{page.parent.name}.html"
    copy.write_text(text.replace("</head>", CHECK_SCRIPT + "</head>", 1))
    result = chromium("--dump-dom", "--virtual-time-budget=10000", copy.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="lambdaemu-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the page did not finish loading: {result.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["text"] > 500, check
    return check


def screenshot_is_not_blank(page: Path, tmp_path: Path) -> bool:
    """A screenshot of the page as it is: a real PNG with a good share of pixels that are not background."""
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    chromium("--window-size=1280,2400", f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "profile")
    pixels = imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1280
    inked = (pixels[:, :, :3].mean(axis=2) < 0.9).mean()
    return inked > 0.05


@pytest.mark.parametrize("args, expected", [
    (["--pool-max", "1,x"], "--pool-max: 'x' is not valid"),
    (["--pool-max", "1,,5"], "--pool-max: an empty value"),
    (["--pool-idle", "100ms,5x"], "--pool-idle: '5x' is not valid"),
    (["--out", "a,b"], "--out cannot take a list"),
    (["--db-url", "postgresql://a@h/d,postgresql://b@h/d"], "--db-url cannot take a list"),
    (["--pool-max", "1,1"], "pool_max: a value appears twice"),
    (["--pool-min", "3", "--pool-max", "1,5"], "point pool_max=1: --pool-min 3 exceeds --pool-max 1"),
    (["--set", "functions.api.pool_max=1,5"], "need --scenario FILE"),
    (["--set", "functions.api.pool_max=1"], "give --scenario FILE"),
    (["--scenario", str(ROOT / "scenarios/pool-max-5.toml"), "--set", "functions.nope.pool_max=1,5"],
     "no function named 'nope'"),
    (["--scenario", str(ROOT / "scenarios/pool-max-5.toml"), "--set", "functions.api.pool_max=1,many"],
     "functions.api.pool_max"),
    (["--repeat", "0"], "--repeat"),
    (["--handler", "no_such_module_here:handler,workloads.sqlalchemy_pool:handler"], "--handler"),
])
def test_bad_lists_are_one_line_and_start_nothing(tmp_path, args, expected):
    result = lambdaemu("sweep", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "results").exists()


def start_sweep(cwd: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([*LAMBDAEMU, "sweep", "--pool-max", "1,2,3", *QUICK, "--duration", "3s", "--out", str(out)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_sweep_keeps_its_points_and_resumes(tmp_path, how):
    out = tmp_path / "sweep"
    proc = start_sweep(tmp_path, out)
    try:
        wait_for_status(out / "pool_max=2" / "run.json", "running", timeout=120)
        time.sleep(1)
        proc.send_signal(getattr(signal, how))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((out / "sweep.json").read_text())
    statuses = {r["point"]: r["status"] for r in state["runs"]}
    if how != "SIGKILL":
        assert proc.returncode == 128 + getattr(signal, how), stderr
        assert statuses == {"pool_max=1": "complete", "pool_max=2": "interrupted", "pool_max=3": "pending"}
        assert state["status"] == "interrupted" and state["missing"] == ["pool_max=2", "pool_max=3"]
        assert "missing 2 of 3 runs: pool_max=2; pool_max=3" in stderr and f"--resume {out}" in stderr
    else:
        # Killed outright: sweep.json still says the point was running; its run's janitor marks the run
        # killed, and its servers died with lambdaemu.
        assert statuses == {"pool_max=1": "complete", "pool_max=2": "running", "pool_max=3": "pending"}
        wait_for_status(out / "pool_max=2" / "run.json", "killed", timeout=30)
    deadline = time.monotonic() + 30
    while sweep_servers(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sweep_servers(out)
    first_run = (out / "pool_max=1" / "run.json").read_text()

    result = lambdaemu("sweep", "--resume", str(out), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "complete" and {r["status"] for r in state["runs"]} == {"complete"}
    assert (out / "pool_max=1" / "run.json").read_text() == first_run, "a finished point was run again"
    assert [r["point"] for r in read_rows(out / "sweep.csv")] == ["pool_max=1", "pool_max=2", "pool_max=3"]
    assert json.loads((out / "pool_max=2" / "run.json").read_text())["status"] == "complete"
    assert not sweep_servers(out)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


def test_the_browser_check_sees_a_page_that_reaches_out(tmp_path):
    # The same check on a page that tries to load an image from elsewhere and has a script error.
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src "
                    "'none'; img-src data:; style-src 'unsafe-inline'\"></head><body>" + "text " * 200 +
                    "<img src=\"http://127.0.0.1:9/chart.png\"><script>undefined_function()</script></body></html>")
    check = open_in_browser(page, tmp_path)
    assert check["images"] == 1 and check["loaded"] == 0
    assert any("blocked: http://127.0.0.1:9/chart.png" in e for e in check["errors"]), check
    assert any("undefined_function" in e for e in check["errors"]), check


def test_points_behind_the_proxy_share_it_and_start_without_its_clients(tmp_path):
    out = tmp_path / "sweep"
    result = lambdaemu("sweep", "--proxy", "pgbouncer", "--pool-max", "1,2", *QUICK, "--out", str(out), cwd=tmp_path,
                       tmpdir=Path("/tmp"), timeout=240)
    assert result.returncode == 0, result.stderr
    firsts = {}
    for directory in (out / "pool_max=1", out / "pool_max=2"):
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["errors"]["total"] == 0 and summary["peak_proxy_clients"] > 1
        firsts[directory.name] = read_rows(directory / "samples.csv")[0]
    assert database_port(out / "pool_max=1") == database_port(out / "pool_max=2")
    # The second point starts with none of the first point's clients (PgBouncer dropped them, and its
    # server connections) and takes clients again (no error above). Like a proxy just started, whose
    # readiness check used its pool, it may be refilling min_pool_size: a server connection or two.
    for first in firsts.values():
        assert first["proxy_clients"] == "0" and int(first["connections"]) <= 2, first
    assert not sweep_servers(out)


def test_a_narrow_terminal_gets_a_column_per_point():
    from rich.console import Console

    from emulator.compare import spread, table

    rows = [{"point": f"pool_max={n}", "repeat": r, "status": "complete", "peak_connections": n * 10 + r,
             "max_connections": 100, "peak_percent": float(n * 10 + r), "errors": 0, "errors.pool_timeout": r}
            for n in (1, 5) for r in (1, 2)]
    grouped = spread(rows, ["point"])
    assert grouped[1]["peak_connections"] == (51.5, 51, 52) and grouped[1]["runs"] == 2
    console = Console(width=60, record=True)
    console.print(table(grouped, ["point", "runs"], "narrow", width=60))
    text = console.export_text()
    assert "pool_max=5" in text.splitlines()[2] and "51.5 (51–52)" in text
    console = Console(width=250, record=True)
    console.print(table(grouped, ["point", "runs"], "wide", width=250))
    header = console.export_text().splitlines()[2]
    assert "point" in header and "peak conn" in header and "errors.pool_timeout" in header
