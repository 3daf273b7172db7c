"""The seccomp filter of the confined levels (`strict`, `bwrap`): defined here, once.

The host compiles it with libseccomp (through the `pyseccomp` package) into a BPF program
and sends it to the worker, which installs it on itself (`confine.load_seccomp`); the worker
needs neither libseccomp nor the package. Every call below fails with EPERM, so model code
sees a plain `PermissionError`; all other system calls are allowed.

What it stops: new sockets (TCP, UDP, Unix, netlink...; a connected pair made with
socketpair() is allowed, asyncio needs one), starting programs (execve) and new processes
(fork; threads are allowed), signals to any process but the worker itself, ptrace and
reading other processes' memory, raising resource limits, io_uring (it would bypass this
filter), and the administrative calls (mount, namespaces, modules, bpf, keyrings...) that a
worker running as root could otherwise use. System calls of another architecture (32-bit
calls from a 64-bit process) kill the worker.
"""

from __future__ import annotations

import errno
import tempfile
from typing import Any

from rlm.errors import SandboxUnavailable

__all__ = ["DENIED", "compile_filter", "require"]

CLONE_THREAD = 0x00010000

# Denied outright (names the running architecture lacks are left out when compiling).
DENIED = (
    # network: no new sockets, and nothing to do with an inherited one but read and write
    "socket", "connect", "bind", "listen", "accept", "accept4",
    # programs and processes (clone is handled below: threads only)
    "execve", "execveat", "fork", "vfork",
    # other processes: tracing, their memory, their file descriptors, signals by pidfd or thread id
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill", "migrate_pages", "move_pages",
    # limits (prlimit64 is handled below: reading stays allowed)
    "setrlimit",
    # io_uring submits work that this filter never sees
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # file systems and namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "mknod", "mknodat", "swapon", "swapoff", "quotactl", "fanotify_init",
    # the kernel and the machine
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "syslog", "acct", "iopl", "ioperm", "personality",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "vhangup", "lookup_dcookie", "keyctl", "add_key", "request_key",
    # identity
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset",
)

# Signal-sending calls whose first argument is the target process: allowed only for the worker.
_SIGNALS_TO_SELF = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")

_INSTALL_HINT = (
    "install the Python packages with `pip install 'rlm[strict]'` (pyseccomp, landlock) and the "
    "system library with `apt-get install libseccomp2` (Debian/Ubuntu; `dnf install libseccomp` on Fedora)"
)


def require() -> Any:
    """The `pyseccomp` module, or SandboxUnavailable saying what to install."""
    try:
        import pyseccomp
    except ImportError:
        raise SandboxUnavailable(f"the seccomp filter needs the `pyseccomp` package: {_INSTALL_HINT}") from None
    except RuntimeError as exc:  # raised by pyseccomp itself when libseccomp is missing
        raise SandboxUnavailable(f"the seccomp filter needs libseccomp ({exc}): {_INSTALL_HINT}") from None
    return pyseccomp


def compile_filter(own_pid: int) -> bytes:
    """The BPF program for a worker whose pid, as it sees it itself, is `own_pid`."""
    seccomp = require()
    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in DENIED:
        _add(seccomp, rules, deny, name)
    # glibc starts threads with clone3, whose flags sit in memory a filter cannot read: answer
    # "not implemented" so that glibc falls back to clone, whose flags we can check.
    _add(seccomp, rules, seccomp.ERRNO(errno.ENOSYS), "clone3")
    _add(seccomp, rules, deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    _add(seccomp, rules, deny, "prlimit64", seccomp.Arg(2, seccomp.NE, 0))
    for name in _SIGNALS_TO_SELF:
        _add(seccomp, rules, deny, name, seccomp.Arg(0, seccomp.NE, own_pid))
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def _add(seccomp: Any, rules: Any, action: int, name: str, *conditions: Any) -> None:
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) == -1:  # __NR_SCMP_ERROR: unknown here
        return
    rules.add_rule(action, name, *conditions)
