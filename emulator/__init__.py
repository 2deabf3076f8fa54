"""lambdaemu: emulate AWS Lambda scaling against a real database.

The Python API: `from emulator import run, sweep, Scenario, RunConfig, load_scenario` (and `open_run`,
`resume_sweep`, `Result`). Names are imported on first use, so that environment processes, which import
this package, do not pay for what only the caller needs.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": ("emulator.api", "run"),
    "open_run": ("emulator.api", "open_run"),
    "Result": ("emulator.api", "Result"),
    "sweep": ("emulator.sweeps", "sweep"),
    "resume_sweep": ("emulator.sweeps", "resume"),
    "SweepResult": ("emulator.sweeps", "SweepResult"),
    "Scenario": ("emulator.scenario", "Scenario"),
    "load_scenario": ("emulator.scenario", "load_scenario"),
    "RunConfig": ("emulator.config", "RunConfig"),
    "UsageError": ("emulator.errors", "UsageError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emulator' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
