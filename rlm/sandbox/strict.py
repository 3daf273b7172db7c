"""The `strict` level: the worker process confined by Landlock, seccomp and namespaces. No privileges needed.

Before it runs any model code the worker (see confine.py) restricts itself with:

- namespaces where the machine allows them (as root, or through an unprivileged user
  namespace): its own IPC namespace (no SysV shared memory or queues of the host's), its own
  network namespace (no network, not even the host's abstract Unix sockets), and its own
  mount namespace, in which it pivots into a root of its own (newroot.py) holding only what
  Landlock will let it read, bound read-only, and a tmpfs as its scratch directory holding at
  most about the file-size limit in all. Where namespaces are refused it goes on without
  them: there is then no total size for scratch, only the per-file limit, and the host's
  files stay visible to `stat` (see below).
- no capabilities, also when the host runs as root, and no_new_privs.
- Landlock: it may read only the Python installation, the system's shared libraries, time
  zones, our package, its own /proc entry and its scratch directory, and write only to the
  scratch directory (and /dev/null). Nothing anywhere may be executed, no TCP, and (Landlock
  ABI 6+) no signal or abstract Unix socket reaches outside. The context file needs no rule:
  the host passes it already open, and reopening it through /proc/self/fd is refused. If the
  host dies, the worker can empty its scratch directory but not remove it.
- seccomp (seccomp.py): an allow list of what Python needs, so no sockets, programs,
  processes, signals or scheduling changes aimed at other processes, SysV IPC, metadata
  changes (chmod, chown, utime, xattr), inotify, ptrace, or raising of limits.
- the resource limits of `SandboxLimits`, set so that they cannot be raised again.

What leaks without a mount namespace: Landlock does not mediate `stat`, so model code can
then learn whether a host path exists, its size, owner and times (not its content, nor a
directory's listing). The trajectory says which case a run had (`confinement.own_root`).

Needs Linux 5.13+ with Landlock enabled and the system's libseccomp (its Python binding,
`pyseccomp`, is a dependency of rlm); without them it fails when created, saying what is missing.
It costs a few ms more than `subprocess` to start, nothing per cell.
"""

from __future__ import annotations

import base64
import sys
from functools import lru_cache
from typing import Any

from rlm.errors import SandboxUnavailable
from rlm.sandbox import kernel, seccomp
from rlm.sandbox.runtime import SCRATCH_SLACK, SYSTEM_DIRS, SYSTEM_FILES, package_dir, python_dirs, top_level
from rlm.sandbox.subprocess import SubprocessSandbox

__all__ = ["StrictSandbox", "landlock_abi"]

@lru_cache(maxsize=1)
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or SandboxUnavailable saying what is missing."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the strict sandbox needs Linux (Landlock and seccomp); this is {sys.platform}")
    try:
        abi = kernel.landlock_abi()
    except OSError as exc:
        raise SandboxUnavailable(
            f"the strict sandbox needs Landlock, which this kernel does not offer ({exc}). It needs Linux 5.13 "
            "or newer with Landlock enabled (CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= boot "
            "parameter); use sandbox='bwrap' where bubblewrap is installed"
        ) from None
    seccomp.require()
    return abi


class StrictSandbox(SubprocessSandbox):
    """A worker process that Landlock and seccomp confine to Python, its scratch and its pipes."""

    name = "strict"
    isolated = True

    @classmethod
    def check_platform(cls) -> None:
        landlock_abi()

    def _confinement(self, worker_pid: int) -> dict[str, Any]:
        read = top_level([*python_dirs(), *SYSTEM_DIRS, package_dir(), *SYSTEM_FILES])
        write = [str(self._held.scratch), "/dev/null"]
        size = self.limits.file_size
        return {
            "isolate": {"scratch_size": None if size is None else size + SCRATCH_SLACK, "own_root": True},
            "drop_privileges": True,
            "landlock": {"read": read, "write": write},
            "seccomp": base64.b64encode(seccomp.compile_filter(worker_pid)).decode("ascii"),
        }
