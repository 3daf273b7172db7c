"""What a worker does to itself before it runs model code: resource limits, Landlock, seccomp.

The host decides and sends it in the "setup" frame (see protocol.py):

    {"limits": {"memory": bytes, "cpu_time": seconds, "file_size": bytes},   # None: no limit
     "landlock": {"read": [paths], "write": [paths]} or None,
     "seccomp": base64 of a compiled BPF program (see seccomp.py) or None}

Order matters: limits first (seccomp would forbid setting them), then Landlock (it opens the
allowed paths), then seccomp. All of it happens before the worker starts any thread, because
Landlock and seccomp bind the calling thread and the threads it starts later, not others.

Runs inside the worker: standard library and ctypes, plus the `landlock` package when the
host asks for Landlock (the `strict` level checks that it is installed before starting us).
"""

from __future__ import annotations

import os
import resource
from typing import Any

__all__ = ["apply"]

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_BPF_INSTRUCTION_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


def apply(setup: dict[str, Any]) -> None:
    """Apply the limits and confinement the host asked for; raise if any of it fails."""
    set_limits(setup.get("limits") or {})
    landlock = setup.get("landlock")
    if landlock:
        restrict_paths(landlock["read"], landlock["write"])
    program = setup.get("seccomp")
    if program:
        import base64

        load_seccomp(base64.b64decode(program))


def set_limits(limits: dict[str, Any]) -> None:
    """Set soft and hard limits together, so that model code cannot raise them again."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core file to scratch
    for key, which in (("memory", resource.RLIMIT_AS), ("file_size", resource.RLIMIT_FSIZE)):
        if limits.get(key) is not None:
            _lower(which, limits[key], limits[key])
    if limits.get("cpu_time") is not None:
        # At the soft limit the kernel sends SIGXCPU (its default action ends the worker, and
        # the host reports it); the hard limit, a second later, is a SIGKILL nothing can catch.
        _lower(resource.RLIMIT_CPU, limits["cpu_time"], limits["cpu_time"] + 1)


def _lower(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def restrict_paths(read: list[str], write: list[str]) -> None:
    """Landlock: from now on this process may open only beneath these paths (and nothing may run)."""
    import landlock

    ruleset = landlock.Ruleset()  # handles every file-system right the kernel knows
    handled = ruleset.restrict_rules
    access = landlock.FSAccess
    read_file = access.READ_FILE
    read_dir = read_file | access.READ_DIR
    never = access.EXECUTE | access.MAKE_CHAR | access.MAKE_BLOCK | access.MAKE_SOCK | access.MAKE_FIFO
    if hasattr(access, "IOCTL_DEV"):
        never |= access.IOCTL_DEV
    write_dir = handled & ~never
    write_file = handled & (read_file | access.WRITE_FILE | getattr(access, "TRUNCATE", 0))
    for paths, on_dir, on_file in ((read, read_dir, read_file), (write, write_dir, write_file)):
        for path in paths:
            if not os.path.exists(path):
                continue  # e.g. /lib64 on a system without it
            ruleset.allow(path, rules=(on_dir if os.path.isdir(path) else on_file) & handled)
    ruleset.apply()


def load_seccomp(program: bytes) -> None:
    """Install a compiled seccomp BPF program on this thread (and every thread it starts later)."""
    import ctypes  # only here: the plain subprocess level starts without it

    class _SockFprog(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    if not program or len(program) % _BPF_INSTRUCTION_SIZE:
        raise ValueError(f"a seccomp program is a whole number of 8-byte instructions, got {len(program)} bytes")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    libc.prctl.restype = ctypes.c_int
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(code))
    # Without no_new_privs an unprivileged process may not install a filter.
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1, 0)
    _prctl(libc, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def _prctl(libc: Any, option: int, arg2: int, arg3: int) -> None:
    import ctypes

    if libc.prctl(option, arg2, arg3, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed while installing the seccomp filter: {os.strerror(errno)}")
