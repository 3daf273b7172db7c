"""What of the host's file system a confined worker needs to see: Python, its libraries, our package.

Shared by `strict` (as Landlock read rules) and `bwrap` (as read-only mounts, and Landlock
rules inside them). Nothing here
holds user data: no /etc (beyond the loader's cache), /home, /root, /tmp, /run or /proc.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Iterable

from rlm.sandbox.subprocess import package_root

__all__ = ["SCRATCH_SLACK", "SYSTEM_DIRS", "SYSTEM_FILES", "package_dir", "python_dirs", "top_level"]

# Shared libraries the interpreter and its extension modules load (on merged-/usr systems
# the top-level ones are symbolic links into /usr).
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32")
# Read-only files a Python program commonly needs that hold nothing private (Landlock rules;
# under bwrap those that are mounted).
SYSTEM_FILES = (
    "/etc/ld.so.cache",  # where the loader finds shared libraries
    "/usr/share/zoneinfo",  # time zones (/etc/localtime points in here)
    "/dev/urandom",
    "/dev/random",
    "/sys/devices/system/cpu",  # os.cpu_count() and friends
    "/proc/self",  # the worker's own entry (its memory use, say): opened, it is /proc/<its pid>
)
# Room in an in-memory scratch beyond the file-size limit, so that one file at the limit fails
# as too large (EFBIG), not as a full disk.
SCRATCH_SLACK = 1 << 20


def python_dirs() -> list[str]:
    """The running Python installation: its prefixes, the interpreter's directory, site-packages."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        *site.getsitepackages(),
    }
    return top_level(os.path.realpath(path) for path in candidates if os.path.isdir(path))


def package_dir() -> str:
    """Our own package directory (only it: not the rest of a source checkout around it)."""
    return os.path.join(package_root(), "rlm")


def top_level(paths: Iterable[str]) -> list[str]:
    """The paths without any that lies inside another one, sorted."""
    unique = sorted(set(paths))
    return [path for path in unique if not any(_inside(path, other) for other in unique if other != path)]


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip("/") + "/")
