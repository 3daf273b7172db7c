"""How a REPL worker is started: its command, environment, directory and `sys.path`.

Shared by every worker level (subprocess, strict, bwrap) and by the fork server's caller.
"""

from __future__ import annotations

import json
import os
import site
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import rlm

__all__ = ["Launch", "disk_tempdir", "package_root", "scrubbed_env", "worker_path"]

# Host variables the worker may need to start Python at all; nothing else is passed on.
_PASSED_ON = ("LD_LIBRARY_PATH",)


def scrubbed_env(home: str) -> dict[str, str]:
    """The whole environment of a worker whose home and temporary directory is `home`."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    env.update({name: os.environ[name] for name in _PASSED_ON if name in os.environ})
    return env


def package_root() -> str:
    """The directory holding our `rlm` package (the worker imports it from there)."""
    return str(Path(rlm.__file__).resolve().parent.parent)


@lru_cache(maxsize=1)
def worker_path() -> str:
    """Our package (first), then the site-packages (after the standard library), as JSON."""
    site_dirs = [path for path in site.getsitepackages() if os.path.isdir(path) and path != package_root()]
    return json.dumps([package_root(), *dict.fromkeys(site_dirs)])


@lru_cache(maxsize=1)
def disk_tempdir() -> str:
    """The temporary directory, or /var/tmp when that one lives in memory (tmpfs pins RAM)."""
    default = tempfile.gettempdir()
    if _filesystem_type(default) in ("tmpfs", "ramfs") and os.access("/var/tmp", os.W_OK):
        if _filesystem_type("/var/tmp") not in ("tmpfs", "ramfs"):
            return "/var/tmp"
    return default


def _filesystem_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


@dataclass(frozen=True)
class Launch:
    """How to start one worker. The file channel's descriptor number is appended to `argv`."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    signal_in_exit_code: bool = False  # a wrapper that reports a worker killed by N as 128 + N
    forked: bool = False  # `argv` is `subprocess.python_argv()`: fork the worker from the fork server instead
    preload: tuple[str, ...] = ()  # modules the fork server imports before forking this worker
