"""Runtimes: which program an environment runs, and how it is started.

Python handlers keep the zygote fast path (`environment.py`). Every other handler runs as a fresh
process that speaks the Lambda Runtime API (`runtime_api.py`) to an endpoint of its own:

| runtime (`--runtime`) | handler spec (`--handler`) | process | `_HANDLER`, `LAMBDA_TASK_ROOT` |
|---|---|---|---|
| `nodejs` (`nodejs18.x`, `nodejs20.x`, `nodejs22.x`; inferred from a `.js`/`.mjs`/`.cjs` file) | `path/to/app.js:handler` (also `.mjs`, `.cjs`; the function may be dotted, `app.js:api.handler`), or Lambda's own `path/to/app.handler` | `node <lambdaemu>/runtimes/node/bootstrap.mjs` (no native build) | `path/to/app.handler` relative to the task root, which is the current directory (or the file's own directory when the file is outside it) |
| `provided` (`provided.al2`, `provided.al2023`) | `path/to/bootstrap[:HANDLER]`, or a directory holding an executable `bootstrap` | that executable, any language | `HANDLER` (empty when not given), the executable's directory |

So `--handler handlers/app.js:handler` runs in the current directory with `_HANDLER=handlers/app.handler`,
exactly as Lambda runs a deployment package whose root is the current directory; Lambda's loader then
finds `app.js` (or `app.mjs`, `app.cjs`). A spec naming a file that Lambda's loader would not pick (an
`app.mjs` next to an `app.js`) is refused rather than silently running the other file.

`command(...)` checks everything it can without running user code (the file exists, `node` ≥ 18 is on
PATH and parses the file, a package's `node_modules` is installed, the bootstrap is executable) and
raises `UsageError` naming `--handler` (or `--runtime`) and the fix.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import UsageError

#: The Node.js bootstrap shipped with lambdaemu (package data).
NODE_BOOTSTRAP = Path(__file__).resolve().parent / "node" / "bootstrap.mjs"
#: Oldest Node.js the bootstrap and the workloads support (Lambda's oldest supported Node runtime).
NODE_MIN_MAJOR = 18
NODE_EXTENSIONS = (".js", ".mjs", ".cjs")

#: Names `--runtime` takes, by runtime family. Lambda's versioned names are accepted for familiarity;
#: lambdaemu runs the `node` on PATH whatever version the name says (recorded in AWS_EXECUTION_ENV).
RUNTIME_NAMES = {
    "python": ("python", "python3.9", "python3.10", "python3.11", "python3.12", "python3.13"),
    "nodejs": ("nodejs", "nodejs18.x", "nodejs20.x", "nodejs22.x"),
    "provided": ("provided", "provided.al2", "provided.al2023"),
}

#: Init error types (`Lambda-Runtime-Function-Error-Type` of a posted init error) that mean the handler
#: cannot be loaded at all, so every cold start would fail the same way: the run should end with the
#: message instead of spawning environments forever. `WorkloadError` is what lambdaemu's Node workloads
#: throw for settings they cannot run with (as the Python workloads' WorkloadError is an ImportError).
LOAD_ERROR_TYPES = frozenset({"Runtime.ImportModuleError", "Runtime.HandlerNotFound", "Runtime.MalformedHandlerName",
                              "Runtime.UserCodeSyntaxError", "Runtime.MalformedStreamingHandler", "WorkloadError"})


@dataclass(frozen=True)
class RuntimeCommand:
    """How to start one environment of a Runtime API runtime: `argv` run in `cwd` with the process
    environment `environ(...)` builds. The supervisor adds what is per environment (the endpoint's
    address, `PGAPPNAME`) and starts it in its own process group."""

    runtime: str  # nodejs | provided
    runtime_name: str  # as given (nodejs20.x, provided.al2023, ...), for AWS_EXECUTION_ENV and run.json
    argv: tuple[str, ...]
    cwd: str
    handler: str  # _HANDLER
    task_root: str  # LAMBDA_TASK_ROOT
    variables: Mapping[str, str] = field(default_factory=dict)  # the Lambda-defined variables

    def environ(self, base: Mapping[str, str], runtime_api: str, extra: Mapping[str, str] = ()) -> dict[str, str]:
        """The process environment: `base` (e.g. the supervisor's own), then the function's variables
        `extra` (DATABASE_URL, POOL_MAX, PGAPPNAME, ...), then the Lambda-defined ones, which a function
        cannot override in Lambda either, and `AWS_LAMBDA_RUNTIME_API`."""
        env = dict(base)
        env.update(extra)
        env.update(self.variables)
        env["AWS_LAMBDA_RUNTIME_API"] = runtime_api
        return env

    def popen(self, runtime_api: str, extra: Mapping[str, str] = (), *, log: Any = subprocess.DEVNULL,
              base: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start one environment directly, in a new session (its own process group), output to `log`
        (a file object or DEVNULL): for tests, benchmarks and tools that run an environment outside a run.
        The supervisor starts its environments from its spawn helper instead."""
        return subprocess.Popen(self.argv, cwd=self.cwd, env=self.environ(os.environ if base is None else base,
                                                                          runtime_api, extra),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def runtime_family(handler: str, runtime: str | None = None) -> str:
    """`python`, `nodejs` or `provided` for `--runtime` (None: inferred from the handler: a .js/.mjs/.cjs
    file is Node.js, anything else Python)."""
    if runtime:
        for family, names in RUNTIME_NAMES.items():
            if runtime in names:
                return family
        known = ", ".join(name for names in RUNTIME_NAMES.values() for name in names)
        raise UsageError(f"--runtime: {runtime!r} is not a runtime lambdaemu knows; use one of {known}")
    target = handler.rpartition(":")[0]
    return "nodejs" if target.endswith(NODE_EXTENSIONS) else "python"


def command(handler: str, runtime: str | None = None, task_root: str | None = None, *,
            function_name: str = "lambdaemu-function", memory_mb: int | None = None) -> RuntimeCommand:
    """Check `handler` for a Node.js or `provided` runtime without running it, and return how to start
    its environments. `task_root` is where relative specs are resolved (default: the current directory).
    Raises UsageError naming the option and the fix; ValueError for a Python handler (the zygote's)."""
    family = runtime_family(handler, runtime)
    base = Path(task_root or os.getcwd()).resolve()
    name = runtime or family
    if family == "nodejs":
        cmd = _node_command(handler, base, name)
    elif family == "provided":
        cmd = _provided_command(handler, base, name)
    else:
        raise ValueError(f"{handler!r} is a Python handler: it runs in the zygote, not through the Runtime API")
    variables = {
        "_HANDLER": cmd.handler,
        "LAMBDA_TASK_ROOT": cmd.task_root,
        "LAMBDA_RUNTIME_DIR": str(Path(cmd.argv[-1]).parent),
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{name}",
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb or 128),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "lambdaemu",
    }
    return RuntimeCommand(cmd.runtime, name, cmd.argv, cmd.cwd, cmd.handler, cmd.task_root, variables)


# --- Node.js -----------------------------------------------------------------------------------------

_EXAMPLE = "e.g. --handler handlers/app.js:handler or handlers/app.handler"


def _node_command(spec: str, base: Path, name: str) -> RuntimeCommand:
    node = node_executable()
    target, sep, func = spec.rpartition(":")
    if sep and target.endswith(NODE_EXTENSIONS):
        if not func:
            raise UsageError(f"--handler: {spec!r} names no function after ':'; {_EXAMPLE}")
        path = (base / target).resolve()
        if not path.is_file():
            raise UsageError(f"--handler: file {target!r} not found (relative to {base}); give an existing "
                             f".js, .mjs or .cjs file")
        task_root = base if path.is_relative_to(base) else path.parent
        module = path.relative_to(task_root).with_suffix("")
        if "." in module.name:
            # Lambda splits `dir/my.app.handler` at the first dot of the last part: module `my`.
            raise UsageError(f"--handler: {path.name}: Lambda cannot name a module with a dot in it; rename "
                             "the file without the extra dot")
        picked = _lambda_module_file(task_root / module)
        if picked != path:
            raise UsageError(f"--handler: Lambda would load {picked.relative_to(task_root)} for "
                             f"{module}.{func}, not {target}; rename one of them")
        lambda_handler = f"{module}.{func}"
    else:
        # Lambda's own form: path/to/module.function, relative to the task root.
        lambda_handler, task_root = spec, base
        head, _, tail = spec.rpartition("/")
        match = re.match(r"^([^.]+)\.(.+)$", tail)
        if ".." in spec or not match:
            raise UsageError(f"--handler: {spec!r} is neither path/to/file.js:function nor Lambda's "
                             f"path/to/module.function; {_EXAMPLE}")
        module_path = task_root / head / match.group(1)
        path = _lambda_module_file(module_path)
        if path is None:
            raise UsageError(f"--handler: no {head + '/' if head else ''}{match.group(1)}.js, .mjs or .cjs "
                             f"under {task_root}; {_EXAMPLE}")
    _check_node_syntax(node, path, spec)
    _check_node_modules(path, task_root)
    return RuntimeCommand("nodejs", name, (node, str(NODE_BOOTSTRAP)), str(task_root), lambda_handler,
                          str(task_root))


def _lambda_module_file(base: Path) -> Path | None:
    """The file Lambda's Node loader picks for module path `base` (UserFunction.js `_tryRequire`):
    extensionless, then .js, .mjs, .cjs."""
    for candidate in (base, *(base.with_name(base.name + ext) for ext in NODE_EXTENSIONS)):
        if candidate.is_file():
            return candidate.resolve()
    return None


def node_executable() -> str:
    """The `node` on PATH, checked to be at least Node.js 18; UsageError with the fix otherwise."""
    node = shutil.which("node")
    if node is None:
        raise UsageError(f"Node.js handlers need node >= {NODE_MIN_MAJOR} on PATH, and none was found: install "
                         "Node.js (Debian: apt-get install nodejs), then npm ci --prefix workloads/node")
    version = node_version(node)
    major = int(version.lstrip("v").split(".")[0]) if re.match(r"^v?\d+", version) else 0
    if major < NODE_MIN_MAJOR:
        raise UsageError(f"Node.js handlers need node >= {NODE_MIN_MAJOR}; {node} is {version or 'unknown'}: "
                         "install a newer Node.js")
    return node


@functools.lru_cache(maxsize=8)
def node_version(node: str) -> str:
    """`node --version` (e.g. `v20.11.1`), or "" when it cannot be run."""
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _check_node_syntax(node: str, path: Path, spec: str) -> None:
    # `node --check` parses the file without running any of it: a syntax error is a usage error now,
    # not a failed init in every environment.
    try:
        out = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"--handler: {spec}: cannot run {node} --check: {exc}") from None
    if out.returncode != 0:
        detail = next((line for line in out.stderr.splitlines() if "Error" in line), out.stderr.strip()[:200])
        raise UsageError(f"--handler: {path}: {detail}; fix the handler file")


def _check_node_modules(path: Path, task_root: Path) -> None:
    """A handler whose package (the nearest package.json above it) declares dependencies that are not
    installed fails with a clear line naming the install command."""
    for folder in path.parents:
        manifest = folder / "package.json"
        if manifest.is_file():
            try:
                deps = json.loads(manifest.read_text()).get("dependencies") or {}
            except (OSError, ValueError, AttributeError):
                return
            if deps and not (folder / "node_modules").is_dir():
                where = os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)
                raise UsageError(f"--handler: {path.name} needs the packages of {manifest} and they are not "
                                 f"installed: run npm ci --prefix {where}")
            return
        if folder == task_root or folder.name == "node_modules":
            return


# --- provided ----------------------------------------------------------------------------------------


def _provided_command(spec: str, base: Path, name: str) -> RuntimeCommand:
    target, sep, lambda_handler = spec.rpartition(":")
    if not sep:
        target, lambda_handler = spec, ""
    path = (base / target).resolve()
    if path.is_dir():
        path = path / "bootstrap"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise UsageError(f"--handler: {target!r} is not an executable file (or a directory with an executable "
                         "bootstrap); --runtime provided runs path/to/bootstrap[:HANDLER], a program that "
                         "speaks the Lambda Runtime API")
    return RuntimeCommand("provided", name, (str(path),), str(path.parent), lambda_handler, str(path.parent))
