"""What a worker does to itself before it runs model code: limits, namespaces, privileges, Landlock, seccomp.

The host decides and sends it in the "setup" frame (see protocol.py); a key left out is not done:

    {"limits": {"memory": bytes, "cpu_time": seconds, "file_size": bytes},   # None: no limit
     "isolate": {"scratch_size": bytes or None,    # own IPC, network and mount namespaces (strict)
                 "own_root": true},                # and a root holding only the Landlock paths (newroot.py)
     "drop_privileges": true,                      # every capability gone, no_new_privs
     "landlock": {"read": [paths], "write": [paths]},
     "seccomp": base64 of a compiled BPF program (see seccomp.py)}

`apply()` returns what it did, for the host's records: {"landlock_abi": N or None,
"namespaces": [...], "scratch_size": bytes or None, "own_root": bool}.

Order matters. Limits first (seccomp forbids setting them). Namespaces next, while the
worker may still hold the capabilities a mount needs: as root it unshares IPC, network and
mount namespaces directly; otherwise inside a new user namespace (mapped to its own uid and
gid) where the kernel allows unprivileged ones; where neither works it goes on without them
(the seccomp filter denies SysV IPC and sockets anyway). In its own mount namespace, a tmpfs
of `scratch_size` over its scratch directory bounds the total it can write there, and with
`own_root` the worker pivots into a root of its own where only the paths Landlock will allow
exist (newroot.py), so that no other host file can even be stat'ed; without a mount namespace
there is no total, only the per-file limit, and the host's files stay visible to stat. Then every capability is dropped (also for
a root worker: the bounding and ambient sets emptied and the root-privilege securebits
locked) and no_new_privs set; then Landlock (it opens the allowed paths, so after the tmpfs
is mounted), with its scoping of signals and abstract Unix sockets where the kernel has it
(ABI 6+); seccomp last. All of it happens before the worker starts any thread, because
these bind the calling thread and the threads it starts later, not others.

Every worker also becomes a child subreaper, so that processes its model code starts (at the
`subprocess` level, where fork is allowed) stay in its tree however they detach, and die
with it (`kill_descendants`, and the host's `WorkerProcess.kill`).

Runs inside the worker: standard library and ctypes only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat
from typing import Any

from rlm.sandbox import kernel

__all__ = ["apply", "kill_descendants", "load_seccomp", "restrict_paths"]

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
_PR_SET_CHILD_SUBREAPER = 36
_MAX_FILES = 256  # open descriptors a worker may hold
# SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE, each with its lock:
# uid 0 gains nothing by being uid 0 again (execve, setuid), and nobody can undo that.
_SECUREBITS = 0b11101111
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x40000000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_BPF_INSTRUCTION_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

# Landlock (linux/landlock.h): file-system rights each ABI version handles, and the rest.
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_MAKE_CHAR, _FS_MAKE_SOCK, _FS_MAKE_FIFO, _FS_MAKE_BLOCK = 1 << 6, 1 << 9, 1 << 10, 1 << 11
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_TCP = 0b11  # bind and connect: with no rule allowing a port, no TCP at all (ABI 4+)
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2  # ABI 6+
_RULE_PATH_BENEATH = 1


def apply(setup: dict[str, Any]) -> dict[str, Any]:
    """Apply the limits and confinement the host asked for; raise if any of it fails."""
    set_limits(setup.get("limits") or {})
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    facts: dict[str, Any] = {"landlock_abi": None, "namespaces": [], "scratch_size": None, "own_root": False}
    if setup.get("drop_privileges"):
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as last:
            last_capability = int(last.read())  # read before a root of our own leaves /proc/sys out
    if setup.get("isolate") is not None:
        view = setup.get("landlock") if setup["isolate"].get("own_root") else None
        facts.update(isolate(setup["isolate"].get("scratch_size"), view))
    if setup.get("drop_privileges"):
        drop_privileges(last_capability)
    landlock = setup.get("landlock")
    if landlock:
        facts["landlock_abi"] = restrict_paths(landlock["read"], landlock["write"])
    program = setup.get("seccomp")
    if program:
        import base64

        load_seccomp(base64.b64decode(program))
    return facts


def set_limits(limits: dict[str, Any]) -> None:
    """Set soft and hard limits together, so that model code cannot raise them again."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core file to scratch
    # Kernel memory that no other limit counts grows with open descriptors (socket pairs hold
    # ~220 KiB each in buffers, pipes up to 64 KiB): at most this many bounds it (~60 MiB).
    _lower(resource.RLIMIT_NOFILE, _MAX_FILES, _MAX_FILES)
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


# -- namespaces and the scratch tmpfs ------------------------------------------------------


def isolate(scratch_size: int | None, view: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Own IPC, network and mount namespaces where possible, and a tmpfs on scratch; what was done.

    `view` ({"read": [...], "write": [...]}, the Landlock paths): with a scratch size, pivot into
    a root of our own holding only those (newroot.py).
    """
    wanted = _CLONE_NEWIPC | _CLONE_NEWNET | _CLONE_NEWNS
    names = ["ipc", "net", "mnt"]
    if _LIBC.unshare(wanted) != 0:
        if ctypes.get_errno() != errno.EPERM or not _enter_user_namespace(wanted):
            return {"namespaces": []}  # neither root nor user namespaces: seccomp still denies IPC and sockets
        names.insert(0, "user")
    if scratch_size is None:
        return {"namespaces": names}
    scratch = os.getcwd()
    # Nothing mounted here may propagate back to the host's mount namespace.
    _check(_LIBC.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make mounts private")
    if view is not None:
        from rlm.sandbox import newroot

        newroot.enter(_LIBC, _check, read=view["read"], write=view["write"], scratch=scratch, scratch_size=scratch_size)
        return {"namespaces": names, "scratch_size": scratch_size, "own_root": True}
    options = f"size={scratch_size},mode=0700".encode()
    _check(_LIBC.mount(b"rlm-scratch", os.fsencode(scratch), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options),
           f"mount a tmpfs on {scratch}")
    os.chdir(scratch)  # the old working directory is the directory under the mount
    return {"namespaces": names, "scratch_size": scratch_size}


def _enter_user_namespace(flags: int) -> bool:
    """unshare() into a new user namespace mapping only our own uid and gid; False if refused."""
    uid, gid = os.getuid(), os.getgid()
    if _LIBC.unshare(_CLONE_NEWUSER | flags) != 0:
        if ctypes.get_errno() in (errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EUSERS):
            return False  # refused by the kernel's settings, or inside a chroot
        _check(-1, "unshare a user namespace")
    for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{path}", "w", encoding="ascii") as file:
            file.write(text)
    return True


# -- capabilities ---------------------------------------------------------------------------


def drop_privileges(last_capability: int) -> None:
    """No capability in any set, root's securebits locked, and no_new_privs: also for uid 0.

    `last_capability`: the kernel's highest capability number (/proc/sys/kernel/cap_last_cap)."""
    holds_setpcap = _has_capability(8)  # CAP_SETPCAP: needed to change the bounding set and securebits
    if holds_setpcap:
        _prctl(_PR_SET_SECUREBITS, _SECUREBITS)
        for cap in range(last_capability + 1):
            _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two 32-bit words each: all zero
    _check(_LIBC.capset(header, data), "drop every capability")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _has_capability(bit: int) -> bool:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


# -- Landlock -------------------------------------------------------------------------------


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_paths(read: list[str], write: list[str]) -> int:
    """Landlock: open only beneath these paths, execute nothing, no TCP, and (ABI 6+) signal no
    process and reach no abstract Unix socket outside this sandbox. Returns the ABI used."""
    abi = kernel.landlock_abi()
    handled = _FS_BY_ABI.get(abi, _FS_BY_ABI[5])
    attr = _RulesetAttr(handled, _NET_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = _syscall(kernel.SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    _check(ruleset, "create a Landlock ruleset")
    try:
        read_dir = _FS_READ_FILE | _FS_READ_DIR
        never = _FS_EXECUTE | _FS_MAKE_CHAR | _FS_MAKE_BLOCK | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_IOCTL_DEV
        write_file = _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE
        for paths, on_dir, on_file in ((read, read_dir, _FS_READ_FILE), (write, ~never, write_file)):
            for path in paths:
                _allow(ruleset, path, on_dir & handled, on_file & handled)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        _check(_syscall(kernel.SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "enforce the Landlock ruleset")
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, on_dir: int, on_file: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # e.g. /lib64 on a system without it
    try:
        rule = _PathBeneath(on_dir if stat.S_ISDIR(os.fstat(fd).st_mode) else on_file, fd)
        _check(_syscall(kernel.SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               f"allow {path} in the Landlock ruleset")
    finally:
        os.close(fd)


# -- seccomp --------------------------------------------------------------------------------


def load_seccomp(program: bytes) -> None:
    """Install a compiled seccomp BPF program on this thread (and every thread it starts later)."""

    class _SockFprog(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    if not program or len(program) % _BPF_INSTRUCTION_SIZE:
        raise ValueError(f"a seccomp program is a whole number of 8-byte instructions, got {len(program)} bytes")
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _BPF_INSTRUCTION_SIZE, ctypes.addressof(code))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # without it an unprivileged process may not install a filter
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# -- processes ------------------------------------------------------------------------------


def kill_descendants() -> int:
    """Kill every process this worker's model code started (they are all below it: it is a
    subreaper). For a worker leaving because its host is gone; where fork is denied there are none."""
    return kernel.kill_descendants(os.getpid())


# -- system calls ---------------------------------------------------------------------------

_LIBC: Any = kernel.libc()
_LIBC.syscall.restype = ctypes.c_long
_LIBC.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


def _syscall(number: int, *args: Any) -> int:
    # syscall() reads whole registers: a Python int would go as a 32-bit C int.
    return int(_LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))


def _prctl(option: int, arg2: int, arg3: int = 0) -> None:
    _check(_LIBC.prctl(option, arg2, arg3, 0, 0), f"prctl({option}, {arg2})")


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"the worker could not {what} while confining itself: {os.strerror(code)}")
    return result
