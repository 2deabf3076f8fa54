"""The docker launcher with a real Docker engine: each engine and PgBouncer as containers (start, real
queries, max_connections, users, refusals counted from the container's log), whole runs of the command
that leave no container, a kill -9 followed by `lambdaemu cleanup`, and the one-line error when no
engine answers. scripts/docker-setup (run by scripts/test) provides the engine and the stand-in images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import docker
import psycopg
import pymysql
import pytest

from conftest import cli_env, kill_janitor, new_run_id
from emulator.databases.docker import LABEL_OWNER_PID, LABEL_RUN_ID, LABEL_VERSION, DockerLauncher
from emulator.databases.mysql import MySQLServer
from emulator.databases.pgbouncer import PgBouncer
from emulator.databases.postgres import PostgresServer

#: The stand-in images scripts/docker-setup builds (the official images cannot be pulled here).
IMAGES = {"postgres": "lambdaemu-standin/postgres:2", "mysql": "lambdaemu-standin/mariadb:2",
          "pgbouncer": "lambdaemu-standin/pgbouncer:2"}
IMAGE_ARGS = ["--postgres-image", IMAGES["postgres"], "--mysql-image", IMAGES["mysql"],
              "--pgbouncer-image", IMAGES["pgbouncer"]]
LAMBDAEMU = [sys.executable, "-m", "emulator.cli"]
APPS = ("orders", "billing")


@pytest.fixture(scope="module")
def client():
    client = docker.from_env()
    for image in IMAGES.values():
        client.images.get(image)  # missing: run scripts/docker-setup (a failure, not a skip)
    return client


def run_containers(client, run_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}"})


@pytest.fixture(scope="module")
def pg_container(client):
    with PostgresServer(run_id=new_run_id(), max_connections=15, applications=APPS,
                        launcher=DockerLauncher("postgres", image=IMAGES["postgres"])) as db:
        yield db


def test_postgres_container_starts_with_the_settings_and_users(client, pg_container):
    db = pg_container
    assert db.provider == "docker" and db.max_connections == 15
    (container,) = run_containers(client, db.run_id)
    assert container.labels[LABEL_VERSION] and int(container.labels[LABEL_OWNER_PID]) == os.getpid()
    launcher = db.describe()["launcher"]
    assert launcher["image"] == IMAGES["postgres"]
    assert launcher["network"] == ("host" if not client.networks.list(names=["bridge"]) else
                                   "bridge (ports published on 127.0.0.1)")
    for app in APPS:
        with psycopg.connect(db.url_for(app), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user, current_setting('max_connections')").fetchone() == (app, "15")
    assert "password" not in json.dumps(db.describe()).lower()


def test_postgres_container_refusals_are_counted_from_its_log(pg_container):
    db = pg_container
    held, refused = [], 0
    with db.admin_connect() as admin:
        before = db.counters(admin)
        try:
            for _ in range(16):
                try:
                    held.append(psycopg.connect(db.url, connect_timeout=5))
                except psycopg.OperationalError:
                    refused += 1
            assert refused > 0
            deadline = time.monotonic() + 5
            while db.counters(admin).refused - before.refused != refused:
                assert time.monotonic() < deadline, (db.counters(admin), before, refused)
                time.sleep(0.1)
            assert db.counters(admin).sessions_opened - before.sessions_opened == len(held)
        finally:
            for conn in held:
                conn.close()


def test_mariadb_container_starts_with_the_settings_and_users(client):
    db = MySQLServer(run_id=new_run_id(), max_connections=12, applications=APPS,
                     launcher=DockerLauncher("mysql", image=IMAGES["mysql"]))
    with db:
        assert db.flavour == "MariaDB" and db.max_connections == 12
        for app in APPS:
            account = db.account(app)
            with pymysql.connect(host=db.host, port=db.port, user=account.user, password=account.password,
                                 database=db.dbname, connect_timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1), @@max_connections")
                assert cur.fetchone() == (app, 12)
        with db.admin_connect() as admin:  # on the extra port, as with the native launcher
            assert db.threads_connected(admin) == 0
        assert len(run_containers(client, db.run_id)) == 1
    assert run_containers(client, db.run_id) == []


def test_pgbouncer_container_in_front_of_a_postgres_container(client, pg_container):
    run_id = new_run_id()
    with PgBouncer(pg_container, run_id, max_connections_percent=40,
                   launcher=DockerLauncher("pgbouncer", image=IMAGES["pgbouncer"])) as bouncer:
        assert bouncer.settings.max_db_connections == 6  # 40 % of 15
        for app in APPS:
            with psycopg.connect(bouncer.url_for(app), connect_timeout=5, prepare_threshold=None) as conn:
                assert conn.execute("SELECT current_user, inet_server_port()").fetchone()[0] == app
        stats = bouncer.stats()
        assert stats.server_connections >= 1
        assert "1." in bouncer.version
        assert len(run_containers(client, run_id)) == 1
    assert run_containers(client, run_id) == []


def lambdaemu(*args: str, cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*LAMBDAEMU, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=cli_env(), **kwargs)


@pytest.mark.parametrize("engine_args", [["--engine", "postgres"], ["--engine", "mysql"],
                                         ["--engine", "postgres", "--proxy", "pgbouncer"]],
                         ids=["postgres", "mysql", "postgres+pgbouncer"])
def test_a_docker_run_completes_and_leaves_no_container(client, tmp_path, engine_args):
    out = tmp_path / "run"
    result = lambdaemu("run", "--provider", "docker", *IMAGE_ARGS, *engine_args, "--max-connections", "20",
                       "--rps", "10", "--duration", "2s", "--work", "50ms", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert run["status"] == "complete" and run["database"]["provider"] == "docker"
    assert summary["errors"]["total"] == 0 and summary["ok"] > 5 and summary["max_connections"] == 20
    assert run["database"]["launcher"]["network"] in ("host", "bridge (ports published on 127.0.0.1)")
    assert run_containers(client, run["run_id"]) == []


def start_run_under_load(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    """A long `lambdaemu run --provider docker`, returned once its load has started."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*LAMBDAEMU, "run", "--provider", "docker", *IMAGE_ARGS, *args,
                             "--rps", "5", "--duration", "5m", "--out", str(out)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        if run.get("status") == "running":
            return proc, run
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach its load: {run}")
        time.sleep(0.5)


def test_sigterm_removes_the_containers(client, tmp_path):
    proc, run = start_run_under_load(tmp_path, "--engine", "mysql")
    try:
        assert len(run_containers(client, run["run_id"])) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_containers(client, run["run_id"]) == []


def test_kill_9_leaves_no_container(client, tmp_path):
    proc, run = start_run_under_load(tmp_path)
    try:
        assert len(run_containers(client, run["run_id"])) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # No `lambdaemu cleanup`: the run's janitor sees it die and removes what it started.
    deadline = time.monotonic() + 60
    while run_containers(client, run["run_id"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_containers(client, run["run_id"]) == []
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "killed"


def test_kill_9_of_the_run_and_its_janitor_then_cleanup_leaves_no_container(client, tmp_path):
    proc, run = start_run_under_load(tmp_path, "--proxy", "pgbouncer")
    try:
        containers = run_containers(client, run["run_id"])
        assert len(containers) == 2
        # A machine that went down with the run: its janitor is gone too, so only cleanup is left.
        kill_janitor(run["run_id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(run_containers(client, run["run_id"])) == 2  # nothing on this machine removes them by itself
    result = lambdaemu("cleanup", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sum(f"(run {run['run_id']})" in line for line in result.stdout.splitlines()) == 2
    assert run_containers(client, run["run_id"]) == []


def test_no_docker_engine_is_a_one_line_usage_error(tmp_path):
    result = subprocess.run([*LAMBDAEMU, "run", "--provider", "docker", "--duration", "1s"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path,
                            env={**cli_env(), "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert result.returncode == 2
    assert result.stderr.startswith(f"lambdaemu: error: --provider docker: no Docker engine answers at "
                                    f"unix://{tmp_path}/no-docker.sock (")
    assert result.stderr.rstrip().endswith("start Docker, or use --provider embedded|native")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def bridge(client):
    """A bridge network of our own: the path containers take where the engine has a default bridge (hosted
    CI runners, Docker Desktop), with ports published on 127.0.0.1, which this machine's engine lacks."""
    network = client.networks.create(f"lambdaemu-test-{new_run_id()}", driver="bridge")
    yield network.name
    network.remove()


def test_bridge_network_path_publishes_on_loopback_and_chains_pgbouncer(client, bridge):
    run_id = new_run_id()
    backend = PostgresServer(run_id=run_id, max_connections=10, applications=APPS,
                             launcher=DockerLauncher("postgres", image=IMAGES["postgres"], network=bridge))
    with backend, PgBouncer(backend, run_id, launcher=DockerLauncher("pgbouncer", image=IMAGES["pgbouncer"],
                                                                        network=bridge)) as bouncer:
        assert backend.describe()["launcher"]["network"] == f"{bridge} (ports published on 127.0.0.1)"
        for container in run_containers(client, run_id):
            published = [b for bindings in container.attrs["NetworkSettings"]["Ports"].values() for b in bindings or []]
            assert published and all(b["HostIp"] == "127.0.0.1" for b in published)
        for app in APPS:
            with psycopg.connect(bouncer.url_for(app), connect_timeout=5, prepare_threshold=None) as conn:
                assert conn.execute("SELECT current_user").fetchone()[0] == app
    mysql = MySQLServer(run_id=run_id, max_connections=10, applications=APPS,
                        launcher=DockerLauncher("mysql", image=IMAGES["mysql"], network=bridge))
    with mysql, mysql.admin_connect() as admin:
        account = mysql.account("billing")
        with pymysql.connect(host=mysql.host, port=mysql.port, user=account.user, password=account.password,
                             database=mysql.dbname, connect_timeout=5):
            assert [r.user for r in mysql.connections(admin)] == ["billing"]
    assert run_containers(client, run_id) == []
