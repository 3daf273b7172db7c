"""The `strict` level: the worker process confined by Landlock and seccomp. No privileges needed.

Before it runs any model code the worker (see confine.py) restricts itself with:

- Landlock: it may read only the Python installation, the system's shared libraries, time
  zones, our package, its own /proc entry and its scratch directory, and write only to the
  scratch directory (and /dev/null). Nothing anywhere may be executed. The context file
  needs no rule: the host passes it already open. If the host dies, the worker can empty
  its scratch directory but not remove it (that would need a right on /tmp itself).
- seccomp (seccomp.py): no sockets, no new programs or processes, no signals to other
  processes, no ptrace, no raising of resource limits.
- the resource limits of `SandboxLimits`, set so that they cannot be raised again.

Needs Linux 5.13+ with Landlock enabled, libseccomp, and the `landlock` and `pyseccomp`
packages (`pip install 'rlm[strict]'`); without them it fails when created, saying what is
missing. It costs about 20 ms more than `subprocess` to start, nothing per cell.
"""

from __future__ import annotations

import base64
import sys
from functools import lru_cache
from typing import Any

from rlm.errors import SandboxUnavailable
from rlm.sandbox import seccomp
from rlm.sandbox.runtime import SYSTEM_DIRS, package_dir, python_dirs, top_level
from rlm.sandbox.subprocess import SubprocessSandbox

__all__ = ["StrictSandbox", "landlock_abi"]

# Read-only files a Python program commonly needs that hold nothing private.
_SYSTEM_FILES = (
    "/etc/ld.so.cache",  # where the loader finds shared libraries
    "/usr/share/zoneinfo",  # time zones (/etc/localtime points in here)
    "/dev/urandom",
    "/dev/random",
    "/sys/devices/system/cpu",  # os.cpu_count() and friends
    "/proc/self",  # the worker's own entry (its memory use, say): opened, it is /proc/<its pid>
)


@lru_cache(maxsize=1)
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or SandboxUnavailable saying what is missing."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the strict sandbox needs Linux (Landlock and seccomp); this is {sys.platform}")
    try:
        import landlock
    except ImportError:
        raise SandboxUnavailable(
            "the strict sandbox needs the `landlock` package: install it with `pip install 'rlm[strict]'`"
        ) from None
    try:
        abi = landlock.landlock_abi_version()
    except OSError as exc:
        raise SandboxUnavailable(
            f"the strict sandbox needs Landlock, which this kernel does not offer ({exc}). It needs Linux 5.13 "
            "or newer with Landlock enabled (CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= boot "
            "parameter); use sandbox='bwrap' where bubblewrap is installed"
        ) from None
    seccomp.require()
    return int(abi)


class StrictSandbox(SubprocessSandbox):
    """A worker process that Landlock and seccomp confine to Python, its scratch and its pipes."""

    name = "strict"
    isolated = True
    _preload = ("landlock", "pyseccomp")

    @classmethod
    def check_platform(cls) -> None:
        landlock_abi()

    def _confinement(self, worker_pid: int) -> dict[str, Any]:
        read = top_level([*python_dirs(), *SYSTEM_DIRS, package_dir(), *_SYSTEM_FILES])
        write = [str(self._held.scratch), "/dev/null"]
        program = seccomp.compile_filter(worker_pid)
        return {"landlock": {"read": read, "write": write}, "seccomp": base64.b64encode(program).decode("ascii")}
