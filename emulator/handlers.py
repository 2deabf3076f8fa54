"""Handler validation in the CLI process, without running a line of the handler's code.

`--handler module:function` or `path/to/file.py:function` is checked before anything starts: the module
file is located by walking the search path the environments will import from, its source is decoded
and parsed the way the import system does it (PEP 263 coding line, UTF-8 BOM), and the function name
must be defined at its top level. Nothing is imported: importing a module runs its package's
`__init__.py` and its own module code, which is the init phase, and init runs only in environments
(where it may need the database, which is not started yet, and where a `sys.exit()` or an exception
is an init error of that environment, not the end of the CLI).

Anything odd about the file (missing, unreadable, a directory or a device under a module's name, a
symbolic-link loop, binary junk, too large to be a handler) is a `UsageError`: one line naming
--handler, the bad value and the fix (exit status 2).
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import stat
import sys
import zipimport
from dataclasses import dataclass

from .environment import split_handler
from .errors import UsageError
from .processes import child_pythonpath

#: Largest handler source read and parsed. Parsing costs ~1.5 s and ~230 MB of memory per MiB of dense
#: source on a small machine, and no handler module comes near a megabyte; anything larger is refused
#: instead of stalling validation.
MAX_SOURCE_BYTES = 1 << 20

_EXAMPLE = "e.g. workloads.sqlalchemy_pool:handler or handlers/app.py:handler"

# The import system's order inside one directory: extension modules, then source, then bytecode.
_SUFFIXES = (*importlib.machinery.EXTENSION_SUFFIXES, *importlib.machinery.SOURCE_SUFFIXES,
             *importlib.machinery.BYTECODE_SUFFIXES)

# Statements that may or may not bind a name, depending on how they run.
_COMPOUND = (ast.If, ast.Try, getattr(ast, "TryStar", ast.Try), ast.With, ast.AsyncWith, ast.For, ast.AsyncFor,
             ast.While, ast.Match)

# Meta-path finders the walk below already stands for (the others, e.g. an editable install's, are asked).
_STANDARD_FINDERS = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter,
                     importlib.machinery.PathFinder)


@dataclass(frozen=True)
class _Found:
    """Where one dotted part of a module name was found."""

    file: str | None  # the module's file (a package's __init__), None for a namespace package
    locations: tuple[str, ...] = ()  # where its submodules are, empty for a plain module
    checkable: bool = True  # False: compiled, in a zip, built in: nothing to read, environments will tell


def search_path(cwd: str) -> list[str]:
    """The directories an environment imports handler modules from, in its order: the current
    directory, this package's checkout (for `workloads.*`), PYTHONPATH, then this interpreter's path."""
    # The same PYTHONPATH the zygote gets, so the check and the environments cannot disagree.
    entries = [cwd, *child_pythonpath().split(os.pathsep), *sys.path]
    # An empty entry is the current directory, as in sys.path; relative entries are relative to it.
    return list(dict.fromkeys(os.path.normpath(os.path.join(cwd, entry)) for entry in entries))


def check_handler(spec: str, cwd: str | None = None) -> None:
    """Check, without importing or running anything, that `spec` names a module (or file) that defines
    the function. Raises UsageError naming --handler and the fix."""
    try:
        target, func = split_handler(spec)
    except ValueError:
        raise UsageError(f"--handler: {spec!r} is not module:function or path/to/file.py:function; "
                         f"{_EXAMPLE}") from None
    cwd = cwd or os.getcwd()
    if target.endswith(".py"):
        path = os.path.join(cwd, target)
        _require_file(path, f"file {target!r}", cwd)
        source_file: str | None = path
    else:
        found = _locate(target, search_path(cwd))
        if found is None or not found.checkable:
            return
        if found.file is None:
            raise UsageError(f"--handler: {target} is a namespace package (a directory without __init__.py), "
                             f"which defines no function {func!r}; name a module inside it")
        source_file = found.file
    tree = _parse(source_file)
    names, undecidable = _top_level_names(tree)
    if func not in names and not undecidable:
        raise UsageError(f"--handler: {target} has no function {func!r}; define def {func}(event, context) "
                         f"there or name an existing function")


# --- locating a module ------------------------------------------------------------------------------


def _locate(target: str, entries: list[str]) -> _Found | None:
    """Find `target` (dotted) the way the import system would, reading directories only.
    None means "found, but a parent package may rearrange its submodules at import: not checked"."""
    parts = target.split(".")
    if not all(parts) or any(os.sep in part for part in parts):
        raise UsageError(f"--handler: {target!r} is not a module name; use dotted names ({_EXAMPLE}) or "
                         "give path/to/file.py:function")
    if target in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(target):
        return _Found(None, checkable=False)
    locations: tuple[str, ...] = tuple(entries)
    parent: _Found | None = None
    for depth, part in enumerate(parts):
        name = ".".join(parts[:depth + 1])
        if parent is not None and not parent.locations:
            raise UsageError(f"--handler: {'.'.join(parts[:depth])} is a module, not a package, so it has no "
                             f"submodule {part!r}; check the name")
        found = _find_in(locations, part, name)
        if found is None and depth == 0:
            found = _ask_other_finders(name)
        if found is None:
            if parent is not None and _rewrites_path(parent):
                return None
            raise UsageError(f"--handler: module {name!r} cannot be found{_near_miss(locations, part)}; check "
                             "the name and the current directory, or give path/to/file.py:function")
        if not found.checkable:
            return found
        parent, locations = found, found.locations
    return parent


def _find_in(locations: tuple[str, ...], part: str, name: str) -> _Found | None:
    namespace: list[str] = []
    for entry in locations:
        if _is_file(entry):  # a zip archive on the path
            if _zip_has(entry, name):
                return _Found(None, checkable=False)
            continue
        base = os.path.join(entry, part)
        if _is_dir(base):
            init = _first_file(base, "__init__")
            if init is not None:
                return _Found(init, (base,), checkable=init.endswith(".py"))
            namespace.append(base)
        module = _first_file(entry, part)
        if module is not None:
            return _Found(module, checkable=module.endswith(".py"))
    # A directory without __init__.py is a namespace package only if no entry has the real thing.
    return _Found(None, tuple(namespace)) if namespace else None


def _first_file(directory: str, stem: str) -> str | None:
    for suffix in _SUFFIXES:
        candidate = os.path.join(directory, stem + suffix)
        if _is_file(candidate):
            return candidate
    return None


def _ask_other_finders(name: str) -> _Found | None:
    # Editable installs map top-level names to directories through a meta-path finder installed by a
    # .pth file; environments run the same interpreter, so they have it too. Asking a finder for a
    # top-level name looks it up without importing it.
    for finder in sys.meta_path:
        if finder in _STANDARD_FINDERS or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(name, None)
        except Exception:  # noqa: BLE001 - a broken third-party finder is no reason to refuse a handler
            continue
        if spec is None:
            continue
        locations = tuple(spec.submodule_search_locations or ())
        if spec.origin and spec.origin.endswith(".py"):
            return _Found(spec.origin, locations)
        return _Found(None, locations, checkable=bool(locations) and not spec.origin)
    return None


def _zip_has(archive: str, name: str) -> bool:
    try:
        return zipimport.zipimporter(archive).find_spec(name) is not None
    except (zipimport.ZipImportError, OSError):
        return False


def _rewrites_path(package: _Found) -> bool:
    # pkgutil/pkg_resources-style packages extend __path__ when imported; their submodules can live
    # anywhere, so the walk cannot tell. The environment's import will.
    return package.file is not None and b"__path__" in _read(package.file, "package")


def _near_miss(locations: tuple[str, ...], part: str) -> str:
    # Say why an entry that looks like the module was passed over (the import system skips it silently).
    for entry in locations:
        for candidate in (os.path.join(entry, part + ".py"), os.path.join(entry, part, "__init__.py")):
            if os.path.lexists(candidate) and not _is_file(candidate):
                return f": {candidate} is {_what(candidate)}"
    return ""


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _what(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file (device, pipe or socket)"


# --- reading and parsing the source -----------------------------------------------------------------


def _require_file(path: str, label: str, cwd: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"--handler: {label} not found (relative to {cwd}); give an existing .py file") \
            from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--handler: cannot read {label} ({reason}); give a readable .py file") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"--handler: {label} is {_what(path)}, not a Python file; give a .py file")


def _read(path: str, label: str = "handler") -> bytes:
    """At most MAX_SOURCE_BYTES + 1 bytes of a regular file; anything else is a UsageError."""
    try:
        # O_NONBLOCK: a FIFO under a module's name must not hang validation.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--handler: cannot read {label} file {path} ({exc.strerror}); make it readable") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"--handler: {path} is {_what(path)}, not a Python file; give a .py file")
        try:
            data = fh.read(MAX_SOURCE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"--handler: cannot read {label} file {path} ({exc.strerror}); make it readable") \
                from None
    return data


def _parse(path: str) -> ast.Module:
    data = _read(path)
    if len(data) > MAX_SOURCE_BYTES:
        raise UsageError(f"--handler: {path} is larger than {MAX_SOURCE_BYTES >> 20} MiB, too large to be a "
                         "handler module; move data out of the source and keep the handler small")
    try:
        # Bytes, not text: the compiler decodes them as an import does (coding line, BOM, UTF-8 default).
        return ast.parse(data, filename=path)
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise UsageError(f"--handler: {where}: syntax error ({exc.msg}); fix the handler module") from None
    except ValueError as exc:  # null bytes (Python 3.11), undecodable text
        raise UsageError(f"--handler: {path} is not Python source ({exc}); give a .py file") from None
    except (MemoryError, RecursionError):
        raise UsageError(f"--handler: {path} is nested too deeply to parse; simplify the handler module") from None


def _top_level_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names a module binds at its top level, and whether it binds names the parse cannot see
    (`from x import *`, definitions inside if/try/with/for/match): then the environment decides."""
    names: set[str] = set()
    undecidable = False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                undecidable = undecidable or alias.name == "*"
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, _COMPOUND):
            undecidable = True
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.NamedExpr):
            names.add(node.value.target.id)
    return names, undecidable
