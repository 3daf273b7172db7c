"""Escape probes: what hostile model code tries, run against each sandbox level.

    python -m rlm.sandbox.escapes                  # the table of what each level blocks, on this machine
    python -m rlm.sandbox.escapes --as-user 65534  # the same, with the host running as that user (from root)

Each probe is a cell of model code. It escaped if the host saw the effect (a signal, a
killed process, a datagram, its priority or file changed, a SysV object read or drained, a
lock it cannot take on its own file, memory the worker holds outside its scratch, a process
outliving the session...), or, for probes that only read (a secret, a file's size),
if the cell printed ESCAPED. Every level runs its probes in a throwaway host process
(escape_host.py), so that a probe that works (killing the host, forking) harms only that
process; the probes' targets belong to it too. The `inprocess` level, which blocks nothing,
shows that every probe can see its own success.

The test suite runs the same probes and compares them with `expected()`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["PROBES", "Probe", "expected", "main", "probe_level"]

SECRET_NAME = "RLM_PROBE_SECRET"


@dataclass(frozen=True)
class Probe:
    """One escape attempt. `code` is formatted with the throwaway host's facts (escape_host.Targets)."""

    name: str
    title: str
    code: str


# Finds the context's descriptor (a regular file of the context's size) among the worker's own.
_CONTEXT_FD = (
    "import os, stat\n"
    "def _context_fd(size={context_size}):\n"
    "    for name in os.listdir('/proc/self/fd'):\n"
    "        try:\n"
    "            info = os.fstat(int(name))\n"
    "        except OSError:\n"
    "            continue\n"
    "        if stat.S_ISREG(info.st_mode) and info.st_size == size:\n"
    "            return int(name)\n"
    "    raise LookupError('no descriptor of the context')\n"
)
# Tries every way in turn, so that one refused does not hide another that works.
_EACH = "for attempt in ({attempts}):\n    try:\n        attempt()\n    except OSError as exc:\n        print(exc)\n"
# Holds {pieces} files of {piece} bytes in memory, made by `make` (kept open after the cell).
_HOLD = (
    "import os\nheld_{name} = []\nfor i in range({{pieces}}):\n    fd = {make}\n"
    "    os.write(fd, b'x' * {{piece}})\n    held_{name}.append(fd)\n"
)
_LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
_ASYNC = "fcntl.fcntl({fd}, fcntl.F_SETFL, fcntl.fcntl({fd}, fcntl.F_GETFL) | os.O_ASYNC)\n"
# setsid + double fork: the grandchild, in its own session with no parent, names itself (so
# that the host can find it) and sleeps on.
_ORPHAN = (
    "import ctypes, os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        ctypes.CDLL(None).prctl(15, b'{orphan_name}', 0, 0, 0)  # PR_SET_NAME\n        time.sleep(120)\n"
    "    os._exit(0)\nos.wait()\ntime.sleep(0.2)\nprint('forked')\n"
)

PROBES = (
    # reading what is not the worker's
    Probe("read_passwd", "read /etc/passwd",
          "print('ESCAPED' if 'root:' in open('/etc/passwd').read() else 'no')"),
    Probe("host_environ_file", "read the host's /proc/<pid>/environ",
          "data = open('/proc/{pid}/environ', 'rb').read()\nprint('ESCAPED' if b'{secret}' in data else 'no')"),
    Probe("host_env_secret", "see a secret from the host's environment",
          "import os\nprint('ESCAPED' if os.environ.get('{secret_name}') == '{secret}' else 'no')"),
    Probe("stat_host_file", "learn a host file's size and times (stat)",
          "import os\nprint('ESCAPED' if os.stat('{host_file}').st_size == {host_file_size} else 'no')"),
    Probe("inotify_host_dir", "watch a host directory (inotify)",
          _LIBC + "watcher = libc.inotify_init1(0)\n"
          "if watcher < 0 or libc.inotify_add_watch(watcher, b'{outside}', 0xfff) < 0:\n"
          "    raise OSError(ctypes.get_errno(), 'inotify')\nprint('ESCAPED')"),
    Probe("sysv_shm", "read and remove the host's SysV shared memory",
          _LIBC + "libc.shmat.restype = ctypes.c_void_p\nsegment = libc.shmget({shm_key}, 0, 0)\n"
          "if segment < 0:\n    raise OSError(ctypes.get_errno(), 'shmget')\n"
          "seen = ctypes.string_at(libc.shmat(segment, None, 0o10000), 32)\nlibc.shmctl(segment, 0, None)\n"
          "print('ESCAPED' if seen == b'{secret}' else 'no')"),
    Probe("sysv_msg", "drain the host's SysV message queue",
          _LIBC + "queue = libc.msgget({msg_key}, 0)\nbuf = ctypes.create_string_buffer(128)\n"
          "if queue < 0 or libc.msgrcv(queue, buf, 64, 0, 0o4000) < 0:\n"
          "    raise OSError(ctypes.get_errno(), 'msgrcv')\nprint('ESCAPED')"),
    # writing what is not the worker's
    Probe("write_outside", "write a file outside scratch",
          "with open('{outside}/written-by-model.txt', 'w') as f:\n    f.write('x')\nprint('ESCAPED')"),
    Probe("chmod_host_file", "chmod a host file", "import os\nos.chmod('{host_file}', 0o777)"),
    Probe("utime_host_file", "change a host file's times (utime)", "import os\nos.utime('{host_file}', (0, 0))"),
    Probe("setxattr_host_file", "set an extended attribute on a host file",
          "import os\nos.setxattr('{host_file}', 'user.rlm', b'x')"),
    Probe("chown_host_file", "chown a host file", "import os\nos.chown('{host_file}', {other_uid}, -1)"),
    Probe("hardlink_host_file", "hard-link a host file into scratch", "import os\nos.link('{host_file}', 'linked')"),
    Probe("context_fchmod", "fchmod the context's descriptor",
          _CONTEXT_FD + "os.fchmod(_context_fd(), 0o777)"),
    Probe("context_reopen", "reopen the context read-write via /proc/self/fd",
          _CONTEXT_FD + "with open(f'/proc/self/fd/{{_context_fd()}}', 'r+b') as f:\n    f.write(b'EVIL')"),
    Probe("str_context_write", "write, grow or reopen read-write the host's copy of a `str` context",
          _CONTEXT_FD + "fd = _context_fd({str_context_size})\n"
          "def reopen():\n    with open(f'/proc/self/fd/{{fd}}', 'r+b') as f:\n        f.write(b'EVIL')\n"
          + _EACH.format(attempts="lambda: os.pwrite(fd, b'EVIL', 0), lambda: os.ftruncate(fd, 1 << 20), reopen")),
    Probe("context_lock", "lock the user's context file (fcntl F_OFD_SETLK)",
          _CONTEXT_FD + "import fcntl, struct\n"
          "fcntl.fcntl(_context_fd(), 37, struct.pack('hhqqi', fcntl.F_RDLCK, 0, 0, 0, 0))  # F_OFD_SETLK"),
    Probe("context_flock", "lock the user's context file (flock)",
          _CONTEXT_FD + "import fcntl\nfcntl.flock(_context_fd(), fcntl.LOCK_SH)"),
    Probe("scratch_total", "fill scratch past its total (files each under the size limit)",
          "try:\n    for i in range({pieces}):\n        with open(f'fill-{{i}}.bin', 'wb') as f:\n"
          "            f.write(b'x' * {piece})\nexcept OSError as exc:\n    print('stopped:', exc)"),
    # the network and the host's sockets
    Probe("tcp_loopback", "open a TCP connection to 127.0.0.1",
          "import socket\nsocket.create_connection(('127.0.0.1', {tcp_port}), timeout=3)\nprint('ESCAPED')"),
    Probe("unix_socket", "connect to a Unix socket of the host",
          "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('{unix_path}')\nprint('ESCAPED')"),
    Probe("abstract_socket", "connect to an abstract Unix socket of the host",
          "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{abstract_stream}')\nprint('ESCAPED')"),
    Probe("dgram_abstract", "socketpair(DGRAM) + sendto the host's abstract socket",
          "import socket\na, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
          "a.sendto(b'x', '\\0{abstract_dgram}')"),
    Probe("dgram_path", "socketpair(DGRAM) + sendmsg to the host's datagram socket",
          "import socket\na, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
          "a.sendmsg([b'x'], [], 0, '{dgram_path}')"),
    # other processes
    Probe("signal_host", "send a signal to the host process", "import os, signal\nos.kill({pid}, signal.SIGUSR1)"),
    Probe("fsetown_signal", "F_SETOWN + F_SETSIG: a signal to the host on I/O",
          "import fcntl, os, signal\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {pid})\n"
          "fcntl.fcntl(r, 10, signal.SIGUSR1)  # F_SETSIG\n" + _ASYNC.format(fd="r") + "os.write(w, b'x')"),
    Probe("fiosetown_signal", "ioctl(FIOSETOWN) + O_ASYNC: SIGIO to the host",
          "import fcntl, os, socket, struct\na, b = socket.socketpair()\n"
          "fcntl.ioctl(a.fileno(), 0x8901, struct.pack('i', {pid}))  # FIOSETOWN\n"
          + _ASYNC.format(fd="a.fileno()") + "b.send(b'x')"),
    Probe("fsetown_sigkill", "F_SETOWN_EX + F_SETSIG: SIGKILL to another process of the user",
          "import fcntl, os, signal, struct\nr, w = os.pipe()\n"
          "fcntl.fcntl(r, 15, struct.pack('ii', 1, {victim}))  # F_SETOWN_EX, F_OWNER_PID\n"
          "fcntl.fcntl(r, 10, signal.SIGKILL)\n" + _ASYNC.format(fd="r") + "os.write(w, b'x')"),
    Probe("host_priority", "lower the host's priority (setpriority)",
          "import os\nos.setpriority(os.PRIO_PROCESS, {pid}, 19)"),
    Probe("host_affinity", "pin the host to one CPU (sched_setaffinity)",
          "import os\nos.sched_setaffinity({pid}, {{min(os.sched_getaffinity({pid}))}})"),
    Probe("host_scheduler", "make the host SCHED_IDLE (sched_setscheduler)",
          "import os\nos.sched_setscheduler({pid}, os.SCHED_IDLE, os.sched_param(0))"),
    Probe("host_ioprio", "make the host's I/O idle (ioprio_set)",
          _LIBC + "if libc.syscall({nr_ioprio_set}, 1, {pid}, 3 << 13) != 0:  # WHO_PROCESS, CLASS_IDLE\n"
          "    raise OSError(ctypes.get_errno(), 'ioprio_set')"),
    Probe("run_program", "start a program (subprocess)",
          "import subprocess\nprint(subprocess.run(['echo', 'ESCAPED'], capture_output=True, text=True).stdout)"),
    Probe("fork_bomb", "fork processes (a fork bomb, bounded to 8)",
          "import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n"
          "    kids.append(pid)\nfor pid in kids:\n    os.waitpid(pid, 0)\nprint('ESCAPED')"),
    # privileges and limits
    Probe("capabilities", "hold capabilities (the worker's CapEff/CapPrm/CapAmb)", "pass"),
    Probe("realtime", "make itself real-time (SCHED_FIFO)",
          "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"),
    Probe("raise_limits", "raise its resource limits",
          "import resource\ninf = resource.RLIM_INFINITY\nresource.setrlimit(resource.RLIMIT_AS, (inf, inf))\n"
          "print('ESCAPED')"),
    Probe("memory", "allocate past the memory limit", "block = bytes({too_much})\nprint('ESCAPED')"),
    Probe("memfd_memory", "hold memory that no limit counts (memfd_create)",
          _HOLD.format(name="memfd", make="os.memfd_create('rlm-probe')")),
    Probe("shm_memory", "hold memory in /dev/shm (POSIX shm_open)",
          _HOLD.format(name="shm", make="os.open(f'/dev/shm/{shm_name}-{{i}}', os.O_RDWR | os.O_CREAT | os.O_EXCL, "
                                        "0o600)\n    os.unlink(f'/dev/shm/{shm_name}-{{i}}')")),
    # processes that outlive the worker (each in a session of its own, judged after it ends)
    Probe("orphan_on_close", "a setsid + double-forked process outlives the session", _ORPHAN),
    Probe("orphan_after_crash", "... and outlives a worker that crashes", _ORPHAN + "os.kill(os.getpid(), 9)"),
)

# Probes that succeed only with a capability (bit numbers of linux/capability.h).
_NEEDS_CAPABILITY = {"chown_host_file": 0, "realtime": 23}


def expected(level: str, capabilities: int | None = None, own_root: bool = True) -> set[str]:
    """Names of the probes that are NOT blocked at `level` (all others must be).

    `capabilities`: the effective capability bits of the host that runs the probes (default:
    this process's own; 0 for an unprivileged user). `own_root`: whether a strict worker gets
    a root of its own (it needs a mount namespace: root, or unprivileged user namespaces).
    """
    held = own_capabilities() if capabilities is None else capabilities
    everything = {probe.name for probe in PROBES}
    lacking = {name for name, bit in _NEEDS_CAPABILITY.items() if not held >> bit & 1}
    lacking |= set() if held else {"capabilities"}
    if level == "inprocess":
        return everything - lacking
    if level == "subprocess":
        # Not a security boundary: only the environment is scrubbed, the limits set (a hard
        # limit can be raised back only with CAP_SYS_RESOURCE), and whatever model code starts
        # is killed with the worker (the worker is a child subreaper) or, when the worker
        # itself crashes, by the fork server (a child subreaper too) as its orphans reach it.
        blocked = {"host_env_secret", "memory", "orphan_on_close", "orphan_after_crash"}
        blocked |= set() if held >> 24 & 1 else {"raise_limits"}
        return everything - blocked - lacking
    if level == "strict" and not own_root:
        return {"stat_host_file"}  # Landlock does not mediate stat (see strict.py)
    return set()


def own_capabilities() -> int:
    """The effective capability bits of this process."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def probe_level(level: str, timeout: float = 120.0, user: int | None = None) -> dict[str, dict]:
    """Run every probe against `level` in a throwaway host; {probe name: {'escaped', 'detail'}}.

    `user`: run the throwaway host as this uid (and gid, no other groups); needs root.
    Raises RuntimeError (with the host's output) if the level could not be probed at all.
    """
    env = {**os.environ, SECRET_NAME: secrets.token_hex(16)}
    as_user = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    done = subprocess.run(
        [sys.executable, "-m", "rlm.sandbox.escape_host", level],
        capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd="/", **as_user,
    )
    if done.returncode != 0 or not done.stdout.strip():
        who = "" if user is None else f" as uid {user}"
        hint = "" if user is None else (
            f" (uid {user} must be able to run {sys.executable} and import rlm from {os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}: "
            "give the directories on the way o+x, as .ci/run does)"
        )
        raise RuntimeError(f"probing {level!r}{who} failed (exit {done.returncode}){hint}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(levels: list[str], outcomes: dict[str, dict[str, dict] | str]) -> str:
    lines = ["| escape attempt | " + " | ".join(f"`{level}`" for level in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for probe in PROBES:
        cells = []
        for level in levels:
            result = outcomes[level]
            if isinstance(result, str):
                cells.append("n/a")
            else:
                cells.append("not blocked" if result[probe.name]["escaped"] else "blocked")
        lines.append(f"| {probe.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table for every level (levels this machine cannot provide say why)."""
    args = sys.argv[1:] if argv is None else argv
    user = int(args[1]) if args[:1] == ["--as-user"] and len(args) > 1 else None
    from rlm.sandbox import SANDBOXES

    levels = ["inprocess", "subprocess", *(name for name in SANDBOXES if name not in ("inprocess", "subprocess"))]
    outcomes: dict[str, dict[str, dict] | str] = {}
    with ThreadPoolExecutor(max_workers=len(levels)) as pool:
        futures = {level: pool.submit(probe_level, level, user=user) for level in levels}
        for level, future in futures.items():
            try:
                outcomes[level] = future.result()
            except RuntimeError as exc:
                outcomes[level] = str(exc)
    print(_table(levels, outcomes))
    for level, result in outcomes.items():
        if isinstance(result, str):
            print(f"\n{level}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
