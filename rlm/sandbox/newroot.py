"""A strict worker's own root: only what it may read exists for it, so a host file cannot even be stat'ed.

Landlock decides what a worker may open, not what it may look at: `stat` of any host path
still tells whether it exists, its size, owner and times. In its own mount namespace
(confine.isolate), the worker therefore builds a new root on a small tmpfs, mounted over its
scratch directory: each path of its read list bind-mounted read-only at the same place, the
write list's files (/dev/null) bound writable, its scratch a tmpfs of the scratch size, its
own /proc entry as /proc/<pid> (with /proc/self pointing there); then it pivots into that
root, detaches the old one and makes the new one read-only. Landlock is applied afterwards, on
the same paths, as before.

`bwrap` does the same from outside (bubblewrap builds the root before the worker starts).
Runs inside the worker, before any thread starts: standard library and ctypes only.
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Any, Callable

__all__ = ["enter"]

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC = 0x20, 0x1000, 0x4000
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 0x400, 0x800, 0x200000
_MNT_DETACH = 2
_ST_RELATIME = 0x1000  # statvfs's f_flag; its other bits are the MS_ values above
_LOCKED = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_NOATIME | _MS_NODIRATIME  # kept as they were
_ROOT_SIZE = 1 << 20  # the new root holds only the directories and files the mounts need
_OLD_ROOT = ".old-root"


def enter(libc: Any, check: Callable[[int, str], None], *, read: list[str], write: list[str], scratch: str,
          scratch_size: int) -> None:
    """Build the new root over `scratch` and pivot into it; the working directory is then the
    scratch tmpfs, at the same path as before. Raises OSError (with the step) if any mount fails."""
    root = scratch  # a mount point of its own: pivot_root needs one
    options = f"size={_ROOT_SIZE},mode=0755".encode()
    check(libc.mount(b"rlm-root", os.fsencode(root), b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "mount the worker's root")
    for path in read:
        if path == "/proc/self":
            _own_proc(libc, check, root)
        elif os.path.lexists(path):
            _bind(libc, check, path, root, writable=False)
    for path in write:
        if path != scratch and os.path.lexists(path):
            _bind(libc, check, path, root, writable=True)
    inside = root + scratch
    os.makedirs(inside, mode=0o700)
    check(libc.mount(b"rlm-scratch", os.fsencode(inside), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                     f"size={scratch_size},mode=0700".encode()), f"mount a tmpfs on {scratch}")
    os.mkdir(os.path.join(root, _OLD_ROOT))
    old = os.fsencode(os.path.join(root, _OLD_ROOT))
    check(libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), os.fsencode(root), old), "pivot into the worker's root")
    os.chdir("/")
    check(libc.umount2(os.fsencode("/" + _OLD_ROOT), _MNT_DETACH), "detach the host's root")
    os.rmdir("/" + _OLD_ROOT)
    check(libc.mount(None, b"/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None),
          "make the worker's root read-only")
    os.chdir(scratch)


def _bind(libc: Any, check: Callable[[int, str], None], path: str, root: str, *, writable: bool) -> None:
    """`path` (a directory, file or symbolic link) at the same place under `root`."""
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)  # /lib -> usr/lib: the link, its target bound on its own
        return
    if os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        with open(target, "w"):
            pass
    check(libc.mount(os.fsencode(path), os.fsencode(target), None, _MS_BIND | _MS_REC, None), f"bind {path}")
    # A bind mount starts with the source mount's flags; a user namespace may add flags but not
    # drop those the source had (the kernel locks them), so they are read and kept.
    held = os.statvfs(path).f_flag
    flags = _MS_REMOUNT | _MS_BIND | (held & _LOCKED) | (_MS_RELATIME if held & _ST_RELATIME else 0)
    if not stat.S_ISCHR(os.stat(path).st_mode):
        flags |= _MS_NOSUID | _MS_NODEV
    if not writable:
        flags |= _MS_RDONLY
    check(libc.mount(None, os.fsencode(target), None, flags, None), f"remount {path}")


def _own_proc(libc: Any, check: Callable[[int, str], None], root: str) -> None:
    """The worker's own /proc entry, and /proc/self pointing to it: no other process shows."""
    pid = str(os.getpid())
    os.makedirs(os.path.join(root, "proc", pid), mode=0o755)
    check(libc.mount(os.fsencode(f"/proc/{pid}"), os.fsencode(f"{root}/proc/{pid}"), None, _MS_BIND, None),
          "bind the worker's /proc entry")
    os.symlink(pid, os.path.join(root, "proc", "self"))


_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(os.uname().machine, -1)
