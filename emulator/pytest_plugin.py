"""The pytest plugin (entry point `pytest11`, loaded wherever lambdaemu is installed): test that your own
handler stays within a connection budget at a given load, in your own test suite.

- `lambdaemu_database` (session scope): one database server for the whole session, started by any
  provider (`embedded` by default; `native`, `docker`, or `external` with a URL), with a user per
  application. Configured by ini options (`lambdaemu_provider = native`) or command-line options
  (`--lambdaemu-provider native`), the command line winning, as pytest-postgresql's are.
- `lambdaemu_run` (function scope): a factory, `lambdaemu_run("handlers/app.py:handler", rps=50,
  duration="10s", pool_max=1)`, that runs the handler against that server and returns an
  `emulator.api.Result` (summary, fidelity, rows). Before each run every session an earlier run left on
  the server is ended, so runs do not see each other's connections. Settings are `lambdaemu run` options
  by RunConfig field or option name (`duration` or `duration_s`), typed or as text.

Nothing is imported from lambdaemu until a fixture is used, so the plugin costs a test suite that does
not use it nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

#: (name, help, ini default). Each is an ini option `lambdaemu_<name>` and `--lambdaemu-<name>`.
OPTIONS = (
    ("provider", "where the database comes from: embedded, native, docker or external", "embedded"),
    ("engine", "database engine: postgres or mysql", ""),
    ("db_url", "URL of an existing server, with provider external", ""),
    ("max_connections", "the server's max_connections", ""),
    ("proxy", "pgbouncer to put the RDS Proxy stand-in in front", ""),
    ("proxy_max_connections_percent", "the proxy's MaxConnectionsPercent", ""),
    ("applications", "database users to create, comma-separated (a run's function name must be one of them)",
     "app"),
    ("results_dir", "where run directories go (default: pytest's temporary directory)", ""),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register every option twice: `lambdaemu_<name>` in ini files, `--lambdaemu-<name>` on the command line."""
    group = parser.getgroup("lambdaemu", "lambdaemu: runs against a real database")
    for name, help_text, default in OPTIONS:
        group.addoption(f"--lambdaemu-{name.replace('_', '-')}", dest=f"lambdaemu_{name}", default=None,
                        help=f"lambdaemu: {help_text} (ini: lambdaemu_{name})")
        parser.addini(f"lambdaemu_{name}", help=f"lambdaemu: {help_text}", default=default)


def _option(config: pytest.Config, name: str) -> str:
    value = config.getoption(f"lambdaemu_{name}")
    return str(value if value is not None else config.getini(f"lambdaemu_{name}") or "").strip()


def _base_config(config: pytest.Config) -> Any:
    """The RunConfig every run of the session starts from: the database settings of the options."""
    from .config import RunConfig

    settings = {"provider": _option(config, "provider") or None, "engine": _option(config, "engine") or None,
                "db_url": _option(config, "db_url") or None, "max_connections": _option(config, "max_connections"),
                "proxy": _option(config, "proxy") or "none",
                "proxy_max_connections_percent": _option(config, "proxy_max_connections_percent")}
    return RunConfig.from_strings({k: v or None for k, v in settings.items()})


@pytest.fixture(scope="session")
def lambdaemu_database(pytestconfig: pytest.Config) -> Iterator[Any]:
    """A database server (a started `emulator.databases.Database`) for the whole test session."""
    from . import databases
    from .results import new_run_id

    base = _base_config(pytestconfig)
    applications = [a.strip() for a in _option(pytestconfig, "applications").split(",") if a.strip()] or ["app"]
    db = databases.create(base, f"pytest-{new_run_id()}", applications=applications)
    db.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
def lambdaemu_run(lambdaemu_database: Any, pytestconfig: pytest.Config,
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """A factory that runs a handler against the session's database and returns its `Result`:
    `lambdaemu_run(handler, **settings)`; `arrivals=` gives exact arrival offsets (emulator.load.fixed)."""
    from .api import Result, run
    from .config import by_field

    base = _base_config(pytestconfig)
    results = _option(pytestconfig, "results_dir")
    count = 0

    def factory(handler: str | None = None, *, arrivals: Any = None, **settings: Any) -> Result:
        nonlocal count
        count += 1
        values = by_field(settings, "lambdaemu_run")
        if handler is not None:
            values["handler"] = handler
        root = Path(results) if results else tmp_path_factory.mktemp("lambdaemu")
        values.setdefault("out", str(root / f"run-{count}"))
        config = base.replace(**values)
        if base.provider != "external":
            lambdaemu_database.clear_sessions()
        return run(config, arrivals=arrivals, database=lambdaemu_database)

    return factory
