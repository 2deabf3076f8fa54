"""compose/ and the GitHub workflow: generated from (or checked against) what the code and the README say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from emulator.config import SETTINGS_BY_NAME
from emulator.databases.compose import compose_files
from emulator.databases.docker import DEFAULT_IMAGES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_compose_files_are_what_the_launchers_definitions_render():
    # Fails when compose/ and the Docker launcher drift apart: run scripts/update-compose.
    rendered = compose_files()
    assert sorted(rendered) == sorted(p.name for p in (ROOT / "compose").iterdir())
    for name, text in rendered.items():
        assert (ROOT / "compose" / name).read_text() == text, f"compose/{name} is stale: run scripts/update-compose"


def test_compose_files_are_valid_compose_documents():
    # `docker compose config` needs the compose plugin, which Debian's docker.io lacks: check the structure
    # the Compose specification requires of what these files use.
    allowed = {"image", "command", "environment", "ports", "volumes", "healthcheck", "depends_on"}
    for name in ("postgres.yml", "mysql.yml", "postgres-pgbouncer.yml"):
        document = yaml.safe_load((ROOT / "compose" / name).read_text())
        assert set(document) == {"services"}
        for service_name, service in document["services"].items():
            assert set(service) <= allowed and re.match(r"^[a-z][a-z0-9_-]*$", service_name)
            assert isinstance(service["image"], str) and all(isinstance(v, str) for v in service["environment"].values())
            assert all(isinstance(c, str) for c in service.get("command", []))
            for port in service["ports"]:  # published on loopback only
                assert re.match(r"^127\.0\.0\.1:\$\{[A-Z_]+:-\d+\}:\d+$", port), port
            for volume in service.get("volumes", []):
                assert (ROOT / "compose" / volume.split(":")[0]).exists()
            for dependency, condition in service.get("depends_on", {}).items():
                assert dependency in document["services"] and condition == {"condition": "service_healthy"}
                assert "healthcheck" in document["services"][dependency]
        images = {s["image"] for s in document["services"].values()}
        assert images <= {f"${{{var}:-{DEFAULT_IMAGES[kind]}}}" for var, kind in
                          (("POSTGRES_IMAGE", "postgres"), ("MYSQL_IMAGE", "mysql"), ("PGBOUNCER_IMAGE", "pgbouncer"))}


def test_compose_max_connections_is_a_variable():
    postgres = yaml.safe_load((ROOT / "compose" / "postgres.yml").read_text())["services"]["postgres"]
    assert "max_connections=${MAX_CONNECTIONS:-100}" in postgres["command"]
    mysql = yaml.safe_load((ROOT / "compose" / "mysql.yml").read_text())["services"]["mysql"]
    assert "--max-connections=${MAX_CONNECTIONS:-151}" in mysql["command"]
    bouncer = yaml.safe_load((ROOT / "compose" / "postgres-pgbouncer.yml").read_text())["services"]["pgbouncer"]
    assert bouncer["environment"]["MAX_DB_CONNECTIONS"] == "${PROXY_MAX_DB_CONNECTIONS:-100}"


def test_the_image_defaults_are_the_settings_defaults():
    for kind in ("postgres", "mysql", "pgbouncer"):
        assert SETTINGS_BY_NAME[f"{kind}_image"].default == DEFAULT_IMAGES[kind]


def workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "lambdaemu.yml").read_text())


def test_the_workflow_runs_the_engine_matrix_and_keeps_the_run_directories():
    flow = workflow()
    job = flow["jobs"]["connections"]
    matrix = {entry["name"]: entry["args"] for entry in job["strategy"]["matrix"]["include"]}
    assert matrix == {"postgres": "--engine postgres", "mysql": "--engine mysql",
                      "postgres-pgbouncer": "--engine postgres --proxy pgbouncer"}
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    upload = steps["Keep the run directory"]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    assert upload["with"]["path"] == "results/${{ matrix.name }}"


def test_the_workflows_commands_are_the_readmes():
    flow = workflow()
    job = flow["jobs"]["connections"]
    template = next(step["run"] for step in job["steps"] if "lambdaemu run" in step.get("run", ""))
    assert "--provider docker" in template
    assert "--threshold 'peak_percent<80'" in template and "--threshold 'errors.too_many_connections==0'" in template
    for entry in job["strategy"]["matrix"]["include"]:
        command = (template.replace("${{ matrix.args }}", entry["args"])
                   .replace("${{ matrix.name }}", entry["name"])
                   .replace('"$HANDLER"', flow["env"]["HANDLER"]))
        assert " ".join(command.split()) in " ".join(README.split()), command


def compose(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # Debian's docker-compose (installed by scripts/docker-setup): the Compose Specification's own checks.
    return subprocess.run(["docker-compose", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", ["postgres.yml", "mysql.yml", "postgres-pgbouncer.yml"])
def test_compose_validates_the_files(name, tmp_path):
    result = compose("-f", f"compose/{name}", "config", "-q")
    assert result.returncode == 0, result.stderr
    # The check is real: the same file with a key Compose does not know is refused.
    broken = tmp_path / name
    broken.write_text((ROOT / "compose" / name).read_text().replace("    image:", "    imagee:", 1))
    assert compose("-f", str(broken), "config", "-q").returncode != 0


def test_compose_postgres_up_then_a_run_against_it(tmp_path):
    # The README's steps with the stand-in image: compose up, then --provider external at the published port.
    from emulator.databases.base import free_port

    port = free_port()
    project = f"lambdaemu-test-{port}"
    env = {"POSTGRES_IMAGE": "lambdaemu-standin/postgres:2", "POSTGRES_PORT": str(port), "MAX_CONNECTIONS": "25"}
    up = compose("-p", project, "-f", "compose/postgres.yml", "up", "-d", env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        url = f"postgresql://app:app@127.0.0.1:{port}/app"
        deadline = time.monotonic() + 120
        while True:
            try:
                with psycopg.connect(url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, compose("-p", project, "-f", "compose/postgres.yml", "logs").stdout
                time.sleep(0.5)
        out = tmp_path / "run"
        run = subprocess.run([sys.executable, "-m", "emulator.cli", "run", "--provider", "external", "--db-url", url,
                              "--rps", "10", "--duration", "2s", "--work", "50ms", "--out", str(out)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["max_connections"] == 25 and summary["errors"]["total"] == 0 and summary["ok"] > 5
        with psycopg.connect(url, connect_timeout=2) as conn:  # an ordinary role, as on RDS
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    finally:
        compose("-p", project, "-f", "compose/postgres.yml", "down", "-v", timeout=300)
