"""The throwaway host of the escape suite: it owns what the probes aim at and judges their effects.

    python -m rlm.sandbox.escape_host LEVEL    # run by escapes.probe_level(); prints JSON

The targets are this process itself (its signals, priority, CPU affinity, scheduler, I/O
priority), a sacrificial `sleep` it started, files and a directory outside the sandbox's
scratch, TCP, Unix stream, abstract and datagram sockets listening, a SysV shared-memory
segment and message queue holding a secret, a context file loaded into the sandbox (and,
in a session of its own, a `str` context: the host's copy of it). After each probe the host
looks at its targets (and, through /proc, at the worker itself: its capabilities, scheduler,
descriptors and scratch) and puts back what changed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable

from rlm.sandbox.escapes import PROBES, SECRET_NAME, Probe
from rlm.sandbox.kernel import alive

MEMORY_LIMIT = 1 << 30  # the worker levels' limits while probing
FILE_SIZE_LIMIT = 4 << 20
_PIECE = 3 << 20  # scratch_total writes files of this size, each under the limit
_CONTEXT = b"the context of the escape suite, 61 bytes long, no more or less"[:61]
_STR_CONTEXT = "a str context, too long for a frame: the host passes a copy on disk. " * 1500
_HOST_FILE = b"a host file, mode 600\n"
_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (ioprio_set, ioprio_get) system call numbers
_IPC_CREAT_EXCL, _IPC_RMID, _IPC_NOWAIT = 0o1000 | 0o2000, 0, 0o4000
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.shmat.restype = ctypes.c_void_p


class _SysV:
    """A shared-memory segment holding the secret, and a message queue holding one message."""

    def __init__(self, secret: bytes) -> None:
        self.shm_key, self.msg_key = (secrets.randbelow(1 << 30) + 1 for _ in range(2))
        self.shm = _ipc(_LIBC.shmget(self.shm_key, 4096, _IPC_CREAT_EXCL | 0o600), "shmget")
        address = _LIBC.shmat(self.shm, None, 0)
        ctypes.memmove(address, secret, len(secret))
        _LIBC.shmdt(ctypes.c_void_p(address))
        self.queue = _ipc(_LIBC.msgget(self.msg_key, _IPC_CREAT_EXCL | 0o600), "msgget")
        message = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + 8)
        ctypes.c_long.from_buffer(message).value = 1  # mtype
        _ipc(_LIBC.msgsnd(self.queue, message, 8, _IPC_NOWAIT), "msgsnd")

    def shm_touched(self) -> bool:
        """Removed, or attached by another process since we wrote it (its last attacher's pid)."""
        row = _sysvipc("shm", self.shm)
        return row is None or int(row["lpid"]) != os.getpid()

    def queue_touched(self) -> bool:
        row = _sysvipc("msg", self.queue)
        return row is None or int(row["qnum"]) != 1

    def close(self) -> None:
        _LIBC.shmctl(self.shm, _IPC_RMID, None)  # fails harmlessly if a probe removed it
        _LIBC.msgctl(self.queue, _IPC_RMID, None)


def _ipc(result: int, what: str) -> int:
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what} for the escape suite's targets")
    return result


def _sysvipc(kind: str, ident: int) -> dict[str, str] | None:
    with open(f"/proc/sysvipc/{kind}", encoding="ascii") as table:
        header = table.readline().split()
        for line in table:
            row = dict(zip(header, line.split()))
            if int(row["shmid" if kind == "shm" else "msqid"]) == ident:
                return row
    return None


class Targets:
    """What the probes aim at, owned by the throwaway host."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.signals: list[int] = []
        for signum in (signal.SIGUSR1, signal.SIGIO):
            signal.signal(signum, lambda number, frame: self.signals.append(number))
        self.outside = tempfile.mkdtemp(prefix="rlm-escape-")
        self.cwd = tempfile.mkdtemp(prefix="rlm-escape-cwd-")  # the in-process level's "scratch"
        os.chdir(self.cwd)
        token = secrets.token_hex(8)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix = self._listen(os.path.join(self.outside, "host.sock"))
        self.abstract_stream = self._listen(f"\0rlm-escape-{token}")
        self.abstract_dgram = self._bound(f"\0rlm-escape-dgram-{token}")
        self.dgram = self._bound(os.path.join(self.outside, "host.dgram"))
        self.host_file = self._file("host-file.txt", _HOST_FILE, 0o600)
        self.context_file = self._file("context.txt", _CONTEXT, 0o644)
        self.victim = self._sacrifice()
        self.sysv = _SysV(os.environ[SECRET_NAME].encode())
        self.baseline = self._own_state()
        self.orphan_name = f"rlm-{token[:8]}"  # what processes started by the orphan probes call themselves
        self.str_copy: IO[bytes] | None = None  # the host's copy of the str context, while its session is open
        self.memory_seen: set[tuple[int, int]] = set()  # files already judged by _memory_outside_scratch

    @staticmethod
    def _listen(address: str) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen()
        return listener

    @staticmethod
    def _bound(address: str) -> socket.socket:
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(address)
        return receiver

    def _file(self, name: str, content: bytes, mode: int) -> str:
        path = os.path.join(self.outside, name)
        with open(path, "wb") as file:
            file.write(content)
        os.chmod(path, mode)
        return path

    @staticmethod
    def _sacrifice() -> subprocess.Popen:
        return subprocess.Popen(["sleep", "600"], start_new_session=True)

    def _own_state(self) -> dict[str, object]:
        ioprio_get = _IOPRIO.get(platform.machine(), (None, None))[1]
        return {
            "priority": os.getpriority(os.PRIO_PROCESS, 0),
            "affinity": os.sched_getaffinity(0),
            "scheduler": os.sched_getscheduler(0),
            "ioprio": _LIBC.syscall(ioprio_get, 1, 0) if ioprio_get else None,
            "host_file": os.stat(self.host_file),
        }

    def facts(self) -> dict[str, object]:
        other_uid = 1 if os.getuid() != 1 else 2
        return {
            "pid": os.getpid(), "secret": os.environ[SECRET_NAME], "secret_name": SECRET_NAME,
            "outside": self.outside, "tcp_port": self.tcp.getsockname()[1], "unix_path": self.unix.getsockname(),
            "abstract_stream": self.abstract_stream.getsockname()[1:].decode(),
            "abstract_dgram": self.abstract_dgram.getsockname()[1:].decode(), "dgram_path": self.dgram.getsockname(),
            "host_file": self.host_file, "host_file_size": len(_HOST_FILE), "context_size": len(_CONTEXT),
            "victim": self.victim.pid, "shm_key": self.sysv.shm_key, "msg_key": self.sysv.msg_key,
            "nr_ioprio_set": _IOPRIO.get(platform.machine(), (-1, -1))[0], "other_uid": other_uid,
            "pieces": 12, "piece": _PIECE, "too_much": 2 * MEMORY_LIMIT, "orphan_name": self.orphan_name,
            "str_context_size": len(_STR_CONTEXT), "shm_name": f"{self.orphan_name}-shm",
        }

    def close(self) -> None:
        for listener in (self.tcp, self.unix, self.abstract_stream, self.abstract_dgram, self.dgram):
            listener.close()
        self.victim.kill()
        self.victim.wait()
        self.sysv.close()
        for directory in (self.outside, self.cwd):
            shutil.rmtree(directory, ignore_errors=True)


# -- judging: did the host see the probe's effect? (and put it back) ---------------------------

Effect = Callable[[Targets, int], bool]


def _signalled(signum: int) -> Effect:
    def seen(targets: Targets, worker: int) -> bool:
        deadline = time.monotonic() + 0.2  # the handler runs at the host's next bytecode
        while signum not in targets.signals and time.monotonic() < deadline:
            time.sleep(0.01)
        found, targets.signals[:] = signum in targets.signals, []
        return found
    return seen


def _victim_killed(targets: Targets, worker: int) -> bool:
    time.sleep(0.05)
    if targets.victim.poll() is None:
        return False
    targets.victim = targets._sacrifice()
    return True


def _received(name: str) -> Effect:
    def seen(targets: Targets, worker: int) -> bool:
        sock: socket.socket = getattr(targets, name)
        readable = select.poll()  # not select.select: it refuses a descriptor numbered 1024 or more
        readable.register(sock, select.POLLIN)
        if not readable.poll(50):
            return False
        if sock.type == socket.SOCK_DGRAM:
            sock.recv(100)
        else:
            sock.accept()[0].close()
        return True
    return seen


def _written_outside(targets: Targets, worker: int) -> bool:
    path = os.path.join(targets.outside, "written-by-model.txt")
    seen = os.path.exists(path)
    if seen:
        os.remove(path)
    return seen


def _host_file_changed(targets: Targets, worker: int) -> bool:
    before, now = targets.baseline["host_file"], os.stat(targets.host_file)
    changed = (now.st_mode, now.st_mtime_ns, now.st_uid) != (before.st_mode, before.st_mtime_ns, before.st_uid)
    if os.listxattr(targets.host_file):
        os.removexattr(targets.host_file, "user.rlm")
        changed = True
    if changed:  # put it back
        os.chmod(targets.host_file, before.st_mode & 0o7777)
        os.utime(targets.host_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        if now.st_uid != before.st_uid:
            os.chown(targets.host_file, before.st_uid, -1)
        targets.baseline["host_file"] = os.stat(targets.host_file)
    return changed


def _context_changed(targets: Targets, worker: int) -> bool:
    info = os.stat(targets.context_file)
    with open(targets.context_file, "rb") as file:
        content = file.read()
    changed = info.st_mode & 0o7777 != 0o644 or content != _CONTEXT
    if changed:
        os.chmod(targets.context_file, 0o644)
        with open(targets.context_file, "r+b") as file:
            file.write(_CONTEXT)
    return changed


def _str_copy_changed(targets: Targets, worker: int) -> bool:
    """The host's copy of the str context (an unnamed file on its disk) written, grown or shrunk."""
    if targets.str_copy is None:
        raise RuntimeError("str_context_write is judged only in a session holding a str context")
    fd = targets.str_copy.fileno()
    expected = _STR_CONTEXT.encode()
    return os.fstat(fd).st_size != len(expected) or os.pread(fd, len(expected), 0) != expected


def _locked(how: str) -> Effect:
    """Whether another process of the host can no longer lock the context file (`how`: lockf or flock)."""
    def seen(targets: Targets, worker: int) -> bool:
        with open(targets.context_file, "r+b") as file:
            lock = fcntl.lockf if how == "lockf" else fcntl.flock
            try:
                lock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EAGAIN or EACCES: someone holds a lock
                return True
            lock(file, fcntl.LOCK_UN)
        return False
    return seen


def _memory_outside_scratch(targets: Targets, worker: int) -> bool:
    """The worker holds open files outside its scratch (memory files, /dev/shm) taking more room
    than scratch's total: memory that neither its memory limit nor scratch counts. Files an
    earlier probe left open (its judgment saw them) do not count again."""
    scratch = os.stat(f"/proc/{worker}/cwd").st_dev
    held = 0
    for name in os.listdir(f"/proc/{worker}/fd"):
        try:
            info = os.stat(f"/proc/{worker}/fd/{name}")
        except OSError:
            continue
        file = (info.st_dev, info.st_ino)
        if stat.S_ISREG(info.st_mode) and info.st_dev != scratch and file not in targets.memory_seen:
            targets.memory_seen.add(file)
            held += info.st_blocks * 512
    return held > FILE_SIZE_LIMIT + (1 << 20)


def _own_state_changed(key: str) -> Effect:
    def seen(targets: Targets, worker: int) -> bool:
        before, now = targets.baseline[key], targets._own_state()[key]
        if now == before:
            return False
        if key == "affinity":
            os.sched_setaffinity(0, before)
        elif key == "scheduler":
            _try(lambda: os.sched_setscheduler(0, int(before), os.sched_param(0)))
        targets.baseline = targets._own_state()  # an unprivileged host cannot take back a higher nice
        return True
    return seen


def _try(action: Callable[[], object]) -> None:
    try:
        action()
    except PermissionError:
        pass  # an unprivileged host may not undo it; the next probe compares with what is now


def _capabilities(targets: Targets, worker: int) -> bool:
    with open(f"/proc/{worker}/status", encoding="ascii") as status:
        sets = dict(line.split(":", 1) for line in status if line.startswith(("CapEff", "CapPrm", "CapAmb")))
    return any(int(value, 16) for value in sets.values())


def _realtime(targets: Targets, worker: int) -> bool:
    policy = os.sched_getscheduler(worker)
    if policy in (os.SCHED_FIFO, os.SCHED_RR) and worker == os.getpid():
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return policy in (os.SCHED_FIFO, os.SCHED_RR)


def _watching(targets: Targets, worker: int) -> bool:
    """An inotify watch among the worker's descriptors (model code keeps its watcher open)."""
    for name in os.listdir(f"/proc/{worker}/fdinfo"):
        try:
            with open(f"/proc/{worker}/fdinfo/{name}", encoding="ascii") as info:
                if "inotify wd:" in info.read():
                    return True
        except OSError:
            continue
    return False


def _scratch_over_total(targets: Targets, worker: int) -> bool:
    """The files in the worker's scratch (its working directory, as it sees it) add up past the total."""
    root = f"/proc/{worker}/cwd"
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
            if name.startswith("fill-"):
                os.remove(os.path.join(directory, name))
    return total > FILE_SIZE_LIMIT + (1 << 20)


EFFECTS: dict[str, Effect] = {
    "signal_host": _signalled(signal.SIGUSR1), "fsetown_signal": _signalled(signal.SIGUSR1),
    "fiosetown_signal": _signalled(signal.SIGIO), "fsetown_sigkill": _victim_killed,
    "tcp_loopback": _received("tcp"), "unix_socket": _received("unix"),
    "abstract_socket": _received("abstract_stream"), "dgram_abstract": _received("abstract_dgram"),
    "dgram_path": _received("dgram"), "write_outside": _written_outside,
    **dict.fromkeys(("chmod_host_file", "utime_host_file", "setxattr_host_file", "chown_host_file"),
                    _host_file_changed),
    "hardlink_host_file": lambda targets, worker: os.stat(targets.host_file).st_nlink > 1,
    "context_fchmod": _context_changed, "context_reopen": _context_changed, "str_context_write": _str_copy_changed,
    "context_lock": _locked("lockf"), "context_flock": _locked("flock"),
    "memfd_memory": _memory_outside_scratch, "shm_memory": _memory_outside_scratch,
    "sysv_shm": lambda targets, worker: targets.sysv.shm_touched(),
    "sysv_msg": lambda targets, worker: targets.sysv.queue_touched(),
    "host_priority": _own_state_changed("priority"), "host_affinity": _own_state_changed("affinity"),
    "host_scheduler": _own_state_changed("scheduler"), "host_ioprio": _own_state_changed("ioprio"),
    "capabilities": _capabilities, "realtime": _realtime, "inotify_host_dir": _watching,
    "scratch_total": _scratch_over_total,
}


# -- the run ----------------------------------------------------------------------------------


def serve(level: str) -> dict[str, dict]:
    """Run every probe against `level`; {probe name: {'escaped', 'detail'}}."""
    from rlm.sandbox import ContextSource, SandboxLimits, create_sandbox

    targets = Targets(level)
    limits = None if level == "inprocess" else SandboxLimits(memory=MEMORY_LIMIT, file_size=FILE_SIZE_LIMIT)
    results: dict[str, dict] = {}
    bridge = lambda kind, prompts: ["" for _ in prompts]  # noqa: E731
    try:
        with create_sandbox(level, bridge, limits) as box:
            box.load_context(ContextSource(path=Path(targets.context_file)))
            for probe in PROBES:
                if probe.name not in _OWN_SESSION:
                    results[probe.name] = _run(box, probe, targets)
        for probe in PROBES:
            if probe.name in _OWN_SESSION:
                with create_sandbox(level, bridge, limits) as box:
                    if probe.name == "str_context_write":
                        box.load_context(ContextSource(value=_STR_CONTEXT))
                        held = getattr(box, "_held", None)  # the host's copy (none in-process)
                        targets.str_copy = held.context_file if held is not None else None
                    results[probe.name] = _run(box, probe, targets)
                    targets.str_copy = None
                if probe.name.startswith("orphan_"):
                    survived = _survivors(targets.orphan_name)  # judged now that the session is over
                    results[probe.name]["escaped"] = results[probe.name]["escaped"] or survived
    finally:
        targets.close()
    return results


# Probes that need a session of their own: its end to judge by, or another context.
_OWN_SESSION = ("str_context_write", "orphan_on_close", "orphan_after_crash")
# What in-process is not tried, and why: it blocks nothing anyway.
_NOT_IN_PROCESS = {
    "orphan_after_crash": "not run in-process: it would end the host",
    "str_context_write": "not run in-process: the context is the host's own string, in its memory",
}


def _run(box: Any, probe: Probe, targets: Targets) -> dict:
    if targets.level == "inprocess" and probe.name in _NOT_IN_PROCESS:
        return {"escaped": True, "detail": _NOT_IN_PROCESS[probe.name]}
    worker = box.worker_pid if targets.level != "inprocess" else os.getpid()
    outcome = box.run(probe.code.format(**targets.facts()), timeout=20, max_output=2000)
    effect = EFFECTS.get(probe.name)
    escaped = "ESCAPED" in outcome.stdout or (effect is not None and effect(targets, worker))
    detail = (outcome.error or outcome.stdout or "").strip().splitlines()
    return {"escaped": escaped, "detail": detail[-1] if detail else ""}


def _survivors(name: str) -> bool:
    """Whether a process named `name` is still running a second after its session ended (and
    kill it, so that the suite leaves nothing behind)."""
    deadline = time.monotonic() + 1.0
    found: list[int] = []
    while time.monotonic() < deadline:
        found = [pid for pid in _named(name) if alive(pid)]
        if not found:
            return False
        time.sleep(0.05)
    for pid in found:
        os.kill(pid, signal.SIGKILL)
    return True


def _named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as comm:
                if entry.isdigit() and comm.read().strip() == name:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


if __name__ == "__main__":
    print(json.dumps(serve(sys.argv[1])))
