"""The `docker` launcher: PostgreSQL, MariaDB/MySQL and PgBouncer as containers, through the Docker Engine
API (the `docker` package, used directly).

The official images by default (`postgres:16`, `mariadb:11`, `edoburu/pgbouncer:latest`), each
replaceable (`--postgres-image`, `--mysql-image`, `--pgbouncer-image`), driven through their own
interfaces: environment variables for the superuser and PgBouncer's settings, arguments for the server
options (the same options the native launcher gives the binaries). `definition()` is the one description
of each container; `compose/` is rendered from it (scripts/update-compose), so the two cannot drift.

Networking: where the engine has a bridge network, ports are published on 127.0.0.1 only; where it runs
without one (`dockerd --bridge=none`, as in sandboxes and some CI runners), containers use the host
network and the servers themselves listen on 127.0.0.1 on a free port. describe() says which.

Every container carries labels: the run id, lambdaemu's version and the pid (and start time) of the
lambdaemu process that owns it, so `lambdaemu cleanup` removes the containers of runs that died. They
are removed at the end of a run, on errors and on Ctrl-C/SIGTERM, and, as the servers have no parent
process on this machine to die with, by `lambdaemu cleanup` after a kill -9.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from typing import Any, Callable, Mapping

import psutil

from ..errors import UsageError
from .server import ADMIN_USER, Launcher

#: The images used unless --postgres-image / --mysql-image / --pgbouncer-image say otherwise. MariaDB
#: rather than MySQL: it is what Debian ships, what the native launcher runs and what the stand-in images
#: run, so one engine code path (extra_port, its status counters) is the one tested end to end.
DEFAULT_IMAGES = {"postgres": "postgres:16", "mysql": "mariadb:11", "pgbouncer": "edoburu/pgbouncer:latest"}
#: The port each image's server listens on inside its container.
CONTAINER_PORTS = {"postgres": 5432, "mysql": 3306, "pgbouncer": 5432}
#: The flag that overrides each image, for messages.
IMAGE_FLAGS = {"postgres": "--postgres-image", "mysql": "--mysql-image", "pgbouncer": "--pgbouncer-image"}

LABEL_RUN_ID = "lambdaemu.run-id"
LABEL_VERSION = "lambdaemu.version"
LABEL_OWNER_PID = "lambdaemu.owner-pid"
LABEL_OWNER_STARTED = "lambdaemu.owner-started"
LABEL_ROLE = "lambdaemu.role"

#: Longest wait for the Docker engine to answer one API call.
DOCKER_TIMEOUT_S = 30


def docker_client() -> Any:
    """A client of the Docker engine, or a UsageError saying how to get one (nothing is started)."""
    import docker

    try:
        client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the engine means the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise UsageError(f"--provider docker: no Docker engine answers at {where} ({reason[:160]}); "
                         "start Docker, or use --provider embedded|native") from None
    return client


def has_bridge(client: Any) -> bool:
    """Whether the engine has its default bridge network (else containers share the host's network)."""
    return any(network.name == "bridge" for network in client.networks.list(names=["bridge"]))


def definition(kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The container for `kind` ("postgres", "mysql", "pgbouncer"): image, command and environment, with
    the values given (real ones for a run, `${VAR:-default}` placeholders for compose/).

    `values` keys: image, admin_password (postgres, mysql), command (the server options), and for
    pgbouncer db_host, db_port, db_user, db_password, db_name, listen_addr, listen_port, options (the
    [pgbouncer] settings as lower-case names)."""
    if kind == "postgres":
        environment = {"POSTGRES_USER": ADMIN_USER, "POSTGRES_PASSWORD": values["admin_password"],
                       "POSTGRES_DB": "postgres"}
    elif kind == "mysql":
        # MYSQL_* for the mysql image, MARIADB_* for mariadb (which also reads MYSQL_*).
        environment = {"MARIADB_ROOT_PASSWORD": values["admin_password"],
                       "MYSQL_ROOT_PASSWORD": values["admin_password"], "MARIADB_ROOT_HOST": "%",
                       "MYSQL_ROOT_HOST": "%"}
    else:
        environment = {"DB_HOST": values["db_host"], "DB_PORT": values["db_port"], "DB_USER": values["db_user"],
                       "DB_PASSWORD": values["db_password"], "DB_NAME": values["db_name"],
                       "LISTEN_ADDR": values["listen_addr"], "LISTEN_PORT": values["listen_port"],
                       "UNIX_SOCKET_DIR": "",
                       **{name.upper(): value for name, value in values["options"].items()}}
    spec = {"image": values["image"], "environment": {key: str(value) for key, value in environment.items()}}
    if values.get("command"):  # none: the image's own CMD
        spec["command"] = list(values["command"])
    return spec


class DockerLauncher(Launcher):
    """Servers as containers of `image` (the official image for the engine by default)."""

    name = "docker"
    #: Application users connect through the host (host network) or the bridge's gateway (published ports).
    client_hosts = ("%",)

    def __init__(self, engine: str, *, image: str | None = None, network: str | None = None,
                 **unused: object) -> None:
        self.engine = engine
        self.image = image or DEFAULT_IMAGES[engine]
        self.client = docker_client()
        #: "host", or the bridge network containers join with their ports published on 127.0.0.1: the
        #: engine's default bridge when it has one (or `network`, a bridge network that exists).
        self.network = network or ("bridge" if has_bridge(self.client) else "host")
        self.host_network = self.network == "host"
        self.container: Any = None
        self.containers: list[Any] = []
        self._log = bytearray()
        self._log_lock = threading.Lock()
        self._logged = 0

    # -- Launcher --------------------------------------------------------------------------------------
    def mysql_flavour(self) -> str:
        """"MariaDB" or "MySQL", from the image name (known before anything starts)."""
        from .mysql import flavour_of

        return flavour_of(self.image)

    def prepare(self, target: Any) -> None:
        import docker

        try:
            self.client.images.get(self.image)
        except docker.errors.ImageNotFound:
            try:
                self.client.images.pull(self.image)
            except docker.errors.APIError as exc:
                raise UsageError(f"{IMAGE_FLAGS[self.engine]} {self.image}: not on this machine and it cannot be "
                                 f"pulled ({exc.explanation or exc}); pull or build it, or name another image") from None
        self.run_id = target.run_id

    def _listen(self, port: int) -> tuple[str, int, dict[str, Any]]:
        """Where the server listens inside the container, and the run options that make it reachable on
        127.0.0.1:`port` of this machine."""
        if self.host_network:
            return "127.0.0.1", port, {"network_mode": "host"}
        inside = CONTAINER_PORTS[self.engine]
        return "0.0.0.0", inside, {"network": self.network, "ports": {f"{inside}/tcp": ("127.0.0.1", port)}}

    def _run(self, kind: str, spec: Mapping[str, Any], options: dict[str, Any], port: int,
             files: Mapping[str, str] | None = None) -> None:
        from importlib.metadata import version

        owner = psutil.Process()
        labels = {LABEL_RUN_ID: self.run_id, LABEL_VERSION: version("lambdaemu"), LABEL_OWNER_PID: str(owner.pid),
                  LABEL_OWNER_STARTED: f"{owner.create_time():.3f}", LABEL_ROLE: kind}
        container = self.client.containers.create(
            spec["image"], command=spec.get("command"), environment=spec["environment"], labels=labels,
            name=f"lambdaemu-{self.run_id}-{kind}-{port}", detach=True, **options)
        self.containers.append(container)
        self.container = container
        for path, text in (files or {}).items():
            container.put_archive(os.path.dirname(path), _tar(os.path.basename(path), text))
        container.start()
        self._follow_log(container)

    def _follow_log(self, container: Any) -> None:
        with self._log_lock:
            self._log.clear()
            self._logged = 0

        def follow() -> None:
            try:
                for chunk in container.logs(stream=True, follow=True):
                    with self._log_lock:
                        self._log.extend(chunk)
            except Exception:  # noqa: BLE001 - the container went away: its log ends here
                pass

        threading.Thread(target=follow, name="lambdaemu-container-log", daemon=True).start()

    def bootstrap_connect(self, target: Any) -> Any:
        user = ADMIN_USER if target.kind == "postgres" else "root"
        return target.engine_impl.connect(host=target.host, port=target.port, user=user,
                                          password=target.admin_password)

    def exited(self) -> str | None:
        if self.container is None:
            return None
        try:
            self.container.reload()
        except Exception:  # noqa: BLE001
            return "was removed"
        if self.container.status in ("exited", "dead"):
            return f"exited with status {self.container.attrs['State'].get('ExitCode')}"
        return None

    def log_tail(self, lines: int = 8) -> str:
        with self._log_lock:
            text = bytes(self._log).decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def __getstate__(self) -> dict[str, Any]:
        # In another process (the sampler) the engine client, the container handle and the log are made
        # again from the container's id when needed.
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("client", "container", "containers", "_log", "_log_lock")}
        state["container_id"] = self.container.id if self.container is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.client = None
        self.container = None
        self.containers = []
        self._log = bytearray()
        self._log_lock = threading.Lock()
        self._logged = 0

    def log_reader(self) -> Callable[[], bytes]:
        if self.container is None and self.__dict__.get("container_id"):
            self.client = self.client or docker_client()
            self.container = self.client.containers.get(self.container_id)
            self._follow_log(self.container)

        def read_new() -> bytes:
            with self._log_lock:
                data = bytes(self._log[self._logged:])
                self._logged = len(self._log)
            return data

        return read_new

    def kill(self) -> None:
        if self.container is not None:
            _remove(self.container)
            self.container = None

    def stop(self) -> None:
        for container in self.containers:
            _remove(container)
        self.containers.clear()
        self.container = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "image": self.image,
                "network": "host" if self.host_network else f"{self.network} (ports published on 127.0.0.1)"}

    # -- engines -------------------------------------------------------------------------------------------
    def _launch_postgres(self, server: Any, port: int) -> None:
        listen, inside, options = self._listen(port)
        spec = definition("postgres", {"image": self.image, "admin_password": server.admin_password,
                                       "command": server.engine_impl.server_options(listen=listen, port=inside)})
        self._run("postgres", spec, options, port)

    def _launch_mysql(self, server: Any, port: int) -> None:
        from .base import free_port

        listen, inside, options = self._listen(port)
        server.admin_port = free_port()  # the sampler's port (MariaDB extra_port, MySQL admin_port)
        admin_inside = server.admin_port
        if not self.host_network:
            admin_inside = CONTAINER_PORTS["mysql"] + 1
            options["ports"][f"{admin_inside}/tcp"] = ("127.0.0.1", server.admin_port)
        command = server.engine_impl.server_options(listen=listen, port=inside, admin_port=admin_inside)
        spec = definition("mysql", {"image": self.image, "admin_password": server.admin_password, "command": command})
        self._run("mysql", spec, options, port)

    def _launch_pgbouncer(self, bouncer: Any, port: int) -> None:
        import docker

        listen, inside, options = self._listen(port)
        backend = bouncer.backend
        backend_host, backend_port = backend.host, backend.port
        backend_container = getattr(getattr(backend, "launcher", None), "container", None)
        if not self.host_network and backend_container is not None:
            backend_container.reload()
            backend_host = backend_container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
            backend_port = CONTAINER_PORTS["postgres"]
        first = bouncer.account()
        spec = definition("pgbouncer", {
            "image": self.image, "db_host": backend_host, "db_port": backend_port, "db_user": first.user,
            "db_password": first.password, "db_name": bouncer.dbname,
            "listen_addr": listen, "listen_port": inside,
            "options": bouncer.pgbouncer_options()})
        # Every application's user and the console's admin: the image itself writes only DB_USER's line,
        # and keeps a file that is already there.
        options["ulimits"] = [docker.types.Ulimit(name="nofile", soft=bouncer.nofile, hard=bouncer.nofile)]
        self._run("pgbouncer", spec, options, port, files={"/etc/pgbouncer/userlist.txt": bouncer.auth_file_text()})

    def pgbouncer_version(self) -> str:
        """PgBouncer's version as the container reports it."""
        assert self.container is not None
        result = self.container.exec_run(["pgbouncer", "--version"])
        text = result.output.decode(errors="replace").strip()
        return text.splitlines()[0] if text else self.image


def _tar(name: str, text: str) -> bytes:
    data = text.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True)  # SIGKILL: a throwaway server needs no clean shutdown
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if "already in progress" not in str(exc):
            raise


def owner_alive(labels: Mapping[str, str]) -> bool:
    """Whether the lambdaemu process named in a container's labels is still running (not a reused pid)."""
    try:
        proc = psutil.Process(int(labels[LABEL_OWNER_PID]))
        return abs(proc.create_time() - float(labels[LABEL_OWNER_STARTED])) < 1
    except (KeyError, ValueError, psutil.NoSuchProcess):
        return False


def leftover_containers(client: Any | None = None) -> list[Any]:
    """Containers labelled by lambdaemu runs whose owner is gone."""
    client = client or docker_client()
    return [c for c in client.containers.list(all=True, filters={"label": LABEL_RUN_ID})
            if not owner_alive(c.labels)]


def remove_leftovers(client: Any | None = None) -> list[str]:
    """Remove the containers of dead runs; one line per container."""
    lines = []
    for container in leftover_containers(client):
        _remove(container)
        lines.append(f"removed container {container.name} (run {container.labels.get(LABEL_RUN_ID)})")
    return lines
