"""The seccomp filter of the confined levels (`strict`, `bwrap`): an allow list, defined here, once.

Every system call not listed below fails with EPERM (model code sees a plain
`PermissionError`); a call of another architecture (32-bit calls from a 64-bit process)
kills the worker. The host compiles the tables with libseccomp (through the `pyseccomp`
package) into a BPF program and sends it to the worker, which installs it on itself
(`confine.load_seccomp`); the worker needs neither libseccomp nor the package.

`ALLOWED` is what CPython (3.10-3.13) and our worker use with any arguments: reading and
writing descriptors, files beneath what Landlock allows, memory, threads, waiting, time and
signals to itself. `CHECKED` is what is needed but dangerous with some arguments; each row
is one way the call is allowed (all its conditions must hold) and rows of the same call are
alternatives. `SELF` stands for the worker's own pid as it sees it.

Left out on purpose (the classes, not a complete list): new sockets, connect/bind/listen and
sendmmsg; programs and processes (execve, fork, vfork, clone without CLONE_THREAD, clone3
answers ENOSYS so that glibc falls back to clone, whose flags a filter can read); anything
aimed at another process (ptrace, process_vm_*, pidfd_*, kcmp, tkill); SysV IPC (shm*,
msg*, sem*); metadata changes (chmod, chown, utime*, *xattr, link), which Landlock does not
mediate; inotify and fanotify (they watch host directories); file locks and memfd_create
(`DENIED` says why); statfs; raising limits; io_uring (it would bypass this filter); mount,
namespaces, keys, bpf, perf, modules, clocks, identity changes and every other
administrative call.

`DENIED` lists calls Python itself offers that are refused all the same, with the reason. The
filter needs no rule for them (what is not allowed is denied); the table keeps the reason in
one place, and a test checks that no row of `ALLOWED` or `CHECKED` lets them through.
"""

from __future__ import annotations

import errno
import struct
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rlm.errors import SandboxUnavailable

__all__ = ["ALLOWED", "CHECKED", "DENIED", "SELF", "Rule", "compile_filter", "require"]

SELF = -1  # placeholder for the worker's own pid, filled in by compile_filter()

_EQ, _MASKED = "==", "&=="


@dataclass(frozen=True)
class Rule:
    """`syscall` is allowed when every condition holds: (argument index, "==", value) or
    (argument index, "&==", mask, value), i.e. `arg & mask == value`."""

    syscall: str
    why: str
    when: tuple[tuple, ...] = ()


ALLOWED: tuple[tuple[str, str], ...] = (
    # descriptors and files (Landlock decides which paths can be opened, created or removed)
    *((name, "read and write descriptors") for name in (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
        "lseek", "close", "close_range", "dup", "dup2", "dup3", "pipe", "pipe2", "sendfile", "copy_file_range",
        "fsync", "fdatasync", "fadvise64", "ftruncate", "fallocate", "fstat", "fstatfs")),
    *((name, "open, list and look up files (paths: Landlock)") for name in (
        "open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
        "faccessat2", "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir", "umask")),
    *((name, "make and remove files in scratch (paths: Landlock)") for name in (
        "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "symlink",
        "symlinkat", "truncate")),
    # memory
    *((name, "the process's own memory (mapping the context, ctypes, thread stacks)") for name in (
        "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync", "mincore", "membarrier", "mseal",
        "map_shadow_stack")),
    # threads and waiting
    *((name, "threads: locks, thread-local state, exit") for name in (
        "futex", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue", "set_robust_list",
        "set_tid_address", "rseq", "arch_prctl", "exit", "exit_group", "sched_yield", "getcpu")),
    *((name, "waiting for descriptors (select, asyncio)") for name in (
        "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
        "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2")),
    # time
    *((name, "clocks, sleeps and timers of this process") for name in (
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "times",
        "getitimer", "setitimer", "alarm", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun",
        "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime")),
    # signals (sending them is in CHECKED)
    *((name, "signal handlers and masks of this process") for name in (
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait", "rt_sigsuspend",
        "sigaltstack", "signalfd", "signalfd4", "pause", "restart_syscall")),
    # sockets that already exist (the host's channels, socketpair() below; socket() is not allowed)
    *((name, "use a connected socket it holds") for name in (
        "recvfrom", "recvmsg", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt")),
    ("sendmsg", "only stream sockets can exist here (socket() denied, socketpair() stream only), and a "
                "stream socket refuses a destination address, so sendmsg reaches only the connected peer"),
    # facts about itself
    *((name, "who and where it is") for name in (
        "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid",
        "getresgid", "getpgrp", "getpgid", "getsid", "capget", "uname", "sysinfo", "getrusage", "getrandom",
        "getrlimit")),
)

# fcntl commands (include/uapi/linux/fcntl.h, asm-generic/fcntl.h). Left out: F_SETOWN(_EX), F_SETSIG
# (a signal to any process on I/O), F_SETLEASE, F_NOTIFY, F_SETPIPE_SZ, F_SET_RW_HINT, seals (no
# memfd to seal), and the locks (DENIED)...
_F_DUPFD, _F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL, _F_GETLK, _F_SETLK, _F_SETLKW = range(8)
_F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW = 36, 37, 38
_F_DUPFD_CLOEXEC, _F_GETPIPE_SZ = 1030, 1032
_O_ASYNC = 0o20000
# ioctl requests (asm-generic/ioctls.h). Left out: FIOSETOWN, SIOCSPGRP, FIOASYNC (signals on
# I/O), TIOCSTI (typing into a terminal), and everything device-specific.
_TCGETS, _TIOCGWINSZ, _FIONREAD, _FIONBIO, _FIONCLEX, _FIOCLEX = 0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451
# prctl options (linux/prctl.h)
_PR_GET_DUMPABLE, _PR_SET_NAME, _PR_GET_NAME, _PR_GET_SECCOMP, _PR_CAPBSET_READ = 3, 15, 16, 21, 23
_PR_GET_SECUREBITS, _PR_GET_NO_NEW_PRIVS, _PR_SET_VMA = 27, 39, 0x53564D41
_AF_UNIX, _SOCK_STREAM, _SOCK_TYPE_FLAGS = 1, 1, 0o2000000 | 0o4000  # SOCK_CLOEXEC | SOCK_NONBLOCK
_PRIO_PROCESS, _IOPRIO_WHO_PROCESS = 0, 1
_ALL_BITS = (1 << 64) - 1
CLONE_THREAD = 0x00010000
# A thread may not take new namespaces either (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


def _on_self(syscall: str, why: str, pid_arg: int = 0, *also: tuple) -> tuple[Rule, ...]:
    """Allowed on the worker itself: its pid as `pid_arg`, or 0 ("the caller")."""
    return tuple(Rule(syscall, why, ((pid_arg, _EQ, pid), *also)) for pid in (0, SELF))


def _commands(syscall: str, why: str, arg: int, values: tuple[int, ...]) -> tuple[Rule, ...]:
    return tuple(Rule(syscall, why, ((arg, _EQ, value),)) for value in values)


CHECKED: tuple[Rule, ...] = (
    # Signals: only to itself (glibc's raise() is tgkill(own pid, own tid)); kill(0) would be its group.
    *(Rule(name, "signals to itself only", ((0, _EQ, SELF),))
      for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")),
    # Threads, never processes.
    Rule("clone", "threads only: CLONE_THREAD, and no new namespaces",
         ((0, _MASKED, CLONE_THREAD | _CLONE_NAMESPACES, CLONE_THREAD),)),
    # Descriptor flags; not locks (DENIED), nor who gets a signal on I/O.
    *_commands("fcntl", "duplicate, close-on-exec, flags, pipe size", 1, (
        _F_DUPFD, _F_GETFD, _F_SETFD, _F_GETFL, _F_DUPFD_CLOEXEC, _F_GETPIPE_SZ)),
    Rule("fcntl", "set status flags, but not O_ASYNC (signals on I/O)",
         ((1, _EQ, _F_SETFL), (2, _MASKED, _O_ASYNC, 0))),
    *_commands("ioctl", "isatty, terminal size, bytes waiting, non-blocking, close-on-exec", 1, (
        _TCGETS, _TIOCGWINSZ, _FIONREAD, _FIONBIO, _FIONCLEX, _FIOCLEX)),
    *_commands("prctl", "name its threads and mappings, read its own security state", 0, (
        _PR_GET_DUMPABLE, _PR_SET_NAME, _PR_GET_NAME, _PR_GET_SECCOMP, _PR_CAPBSET_READ, _PR_GET_SECUREBITS,
        _PR_GET_NO_NEW_PRIVS, _PR_SET_VMA)),
    # Sockets: a connected pair for asyncio's self-pipe. Stream only: an unconnected datagram pair
    # could sendto() any Unix datagram socket by address.
    Rule("socketpair", "a connected AF_UNIX stream pair (asyncio)",
         ((0, _EQ, _AF_UNIX), (1, _MASKED, _ALL_BITS ^ _SOCK_TYPE_FLAGS, _SOCK_STREAM))),
    Rule("sendto", "send on a connected socket: no destination address", ((4, _EQ, 0),)),
    # Scheduling, priority, CPU placement and limits: of itself only.
    *_on_self("sched_getaffinity", "os.sched_getaffinity, os.cpu_count"),
    *_on_self("sched_setaffinity", "its own CPU placement"),
    *_on_self("sched_getscheduler", "its own scheduling policy"),
    *_on_self("sched_setscheduler", "its own scheduling policy (real-time needs a capability it lacks)"),
    *_on_self("sched_getparam", "its own scheduling parameters"),
    *_on_self("sched_setparam", "its own scheduling parameters"),
    *_on_self("sched_getattr", "its own scheduling attributes"),
    *_on_self("sched_setattr", "its own scheduling attributes"),
    *_on_self("getpriority", "its own nice value", 1, (0, _EQ, _PRIO_PROCESS)),
    *_on_self("setpriority", "its own nice value (lowering it needs a capability it lacks)", 1,
              (0, _EQ, _PRIO_PROCESS)),
    *_on_self("ioprio_get", "its own I/O priority", 1, (0, _EQ, _IOPRIO_WHO_PROCESS)),
    *_on_self("ioprio_set", "its own I/O priority", 1, (0, _EQ, _IOPRIO_WHO_PROCESS)),
    *_on_self("prlimit64", "read its own limits (getrlimit); never set them", 0, (2, _EQ, 0)),
)

# Refused although Python offers them (see the module's docstring).
DENIED: tuple[Rule, ...] = (
    Rule("memfd_create", "a memory file's pages (shmem) count in no limit of the worker (RLIMIT_AS counts "
                         "mappings, not files): a worker could hold the machine's memory. A large rlm_query "
                         "context goes as a file in scratch instead (subcalls.py), bounded by scratch's total"),
    Rule("flock", "a lock on a file the worker can open (the user's context file) would stop other "
                  "processes of the host from locking it while the session is open"),
    *_commands("fcntl", "record locks, the same (F_SETLK, F_SETLKW and their per-descriptor F_OFD_ forms); "
                        "holding none, the worker needs no lock test either (F_GETLK would name another "
                        "process holding one)", 1, (
        _F_GETLK, _F_SETLK, _F_SETLKW, _F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW)),
)

_INSTALL_HINT = (
    "install the system library with `apt-get install libseccomp2` (Debian/Ubuntu; `dnf install libseccomp` "
    "on Fedora); the Python binding, pyseccomp, is a dependency of rlm (reinstall rlm if it is missing)"
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
    """The BPF program for a worker whose pid, as it sees it itself, is `own_pid`.

    libseccomp takes a few ms to compile the tables, so they are compiled once per process
    with a stand-in pid that no real pid can equal (pids stay below 2**22), and each worker's
    program is that one with its pid put in (~0.03 ms).
    """
    program = bytearray(_template())
    for offset in range(0, len(program), _INSTRUCTION.size):
        code, jt, jf, k = _INSTRUCTION.unpack_from(program, offset)
        if code & 0x07 == _BPF_JMP and k == _STAND_IN:
            _INSTRUCTION.pack_into(program, offset, code, jt, jf, own_pid)
    return bytes(program)


_INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter: code, jump if true, jump if false, constant
_BPF_JMP = 0x05
_STAND_IN = 0x5E1F5E1F


@lru_cache(maxsize=1)
def _template() -> bytes:
    seccomp = require()
    rules = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name, _ in ALLOWED:
        _add(seccomp, rules, seccomp.ALLOW, name)
    for rule in CHECKED:
        _add(seccomp, rules, seccomp.ALLOW, rule.syscall, *(_condition(seccomp, c) for c in rule.when))
    # glibc starts threads with clone3, whose flags sit in memory a filter cannot read:
    # "not implemented" makes it fall back to clone (checked above).
    _add(seccomp, rules, seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as file:
        rules.export_bpf(file)
        file.seek(0)
        program = file.read()
    # libseccomp shares identical branches, so the stand-in may appear fewer times than it is used.
    constants = (_INSTRUCTION.unpack_from(program, at)[3] for at in range(0, len(program), _INSTRUCTION.size))
    if _STAND_IN not in constants:
        raise RuntimeError("the compiled seccomp program never compares with the worker's own pid")
    return program


def _condition(seccomp: Any, condition: tuple) -> Any:
    arg, op, *values = condition
    values = [_STAND_IN if value == SELF else value for value in values]
    if op == _EQ:
        return seccomp.Arg(arg, seccomp.EQ, values[0])
    return seccomp.Arg(arg, seccomp.MASKED_EQ, values[0], values[1])


def _add(seccomp: Any, rules: Any, action: int, name: str, *conditions: Any) -> None:
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) == -1:  # __NR_SCMP_ERROR: unknown here
        return
    rules.add_rule(action, name, *conditions)
