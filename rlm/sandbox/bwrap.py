"""The `bwrap` level: the worker process inside bubblewrap namespaces, plus the seccomp filter.

bubblewrap (`apt-get install bubblewrap`) starts the worker with:

- new user, pid, network, IPC, UTS and cgroup namespaces (`--unshare-all`): no network at
  all but a private loopback, no other process visible, the host's Unix sockets unreachable;
- a file system holding only the Python installation and the system's shared libraries
  (read-only), our package (read-only), a fresh /proc and a minimal /dev, and a private
  in-memory scratch directory at /scratch holding at most about the file-size limit in all;
- no capabilities (`--cap-drop ALL`), a new session (no terminal to inject keys into), and
  death with the host (`--die-with-parent`).

Inside, the worker drops what capabilities are left in its user namespace, restricts itself
with Landlock to what is mounted (writing only to /scratch; where the kernel has Landlock),
and applies the same seccomp filter and resource limits as `strict`. The context file is
passed already open, so it is not mounted, and Landlock refuses to reopen it read-write
through /proc/self/fd. Starting costs 50-90 ms more
than `subprocess`; cells cost the same. Fails when created if bubblewrap or libseccomp is
missing, or if the kernel refuses unprivileged user namespaces, saying which.
"""

from __future__ import annotations

import base64
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlm.errors import SandboxError, SandboxUnavailable
from rlm.sandbox import kernel, seccomp
from rlm.sandbox.base import LLMBridge, SandboxLimits
from rlm.sandbox.runtime import SCRATCH_SLACK, SYSTEM_DIRS, SYSTEM_FILES, package_dir, python_dirs, top_level
from rlm.sandbox.process import WorkerProcess
from rlm.sandbox.subprocess import Launch, SubprocessSandbox, python_argv, scrubbed_env

__all__ = ["BwrapSandbox", "bwrap_path"]

SCRATCH = "/scratch"


_UNSHARED = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")  # what --unshare-all asks for


@lru_cache(maxsize=1)
def _landlock_available() -> bool:
    try:
        kernel.landlock_abi()
    except OSError:
        return False  # bubblewrap's mounts still hide the host's files; only the /proc/self/fd reopen stays
    return True


def bwrap_path() -> str:
    """Where the bwrap program is, or SandboxUnavailable saying how to install it."""
    found = shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)), None)
    if found is None:
        raise SandboxUnavailable(
            "the bwrap sandbox needs bubblewrap: install it with `apt-get install bubblewrap` (Debian/Ubuntu), "
            "`dnf install bubblewrap` (Fedora) or your system's bubblewrap package"
        )
    return found


class BwrapSandbox(SubprocessSandbox):
    """A worker process in its own namespaces, seeing only Python and a private scratch."""

    name = "bwrap"
    isolated = True

    @classmethod
    def check_platform(cls) -> None:
        bwrap_path()
        seccomp.require()

    def __init__(self, bridge: LLMBridge, limits: SandboxLimits | None = None, *, tools: list | None = None) -> None:
        self._started_once = False
        super().__init__(bridge, limits, tools=tools)

    @property
    def confinement(self) -> dict | None:
        """The worker's own facts, and what bwrap did before it started: the namespaces of
        `--unshare-all` (the user namespace where the kernel allows one) and the scratch tmpfs."""
        facts = super().confinement
        if facts is not None:
            facts["namespaces"] = sorted({*facts["namespaces"], *_UNSHARED})
            facts["scratch_size"] = self.limits.file_size + SCRATCH_SLACK if self.limits.file_size else None
            facts["own_root"] = True  # bwrap's mounts: only what the worker needs
        return facts

    def _make_scratch(self) -> Path | None:
        return None  # a tmpfs inside the sandbox: nothing on the host's disk to leave behind

    def _start(self) -> WorkerProcess:
        if self._started_once:
            return super()._start()
        try:
            worker = super()._start()
        except SandboxError as exc:  # bwrap is there but the kernel refused it: say why, once
            raise SandboxUnavailable(
                f"bubblewrap could not start the sandbox ({exc}). It needs unprivileged user namespaces: "
                "check `sysctl user.max_user_namespaces` (and on Ubuntu 24.04+ "
                "`kernel.apparmor_restrict_unprivileged_userns`), or use sandbox='strict'"
            ) from None
        self._started_once = True
        return worker

    def _launch(self) -> Launch:
        argv = [
            bwrap_path(),
            "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            *_mounts(),
            "--proc", "/proc", "--dev", "/dev",
            *(["--size", str(self.limits.file_size + SCRATCH_SLACK)] if self.limits.file_size else []),
            "--tmpfs", SCRATCH, "--chdir", SCRATCH,
            "--", *python_argv(),
        ]
        # bwrap hands its own (scrubbed) environment on to the worker; cwd is bwrap's own.
        return Launch(argv=argv, cwd="/", env=scrubbed_env(SCRATCH), signal_in_exit_code=True)

    def _confinement(self, worker_pid: int) -> dict[str, Any]:
        # Landlock inside the mounts as well: what is mounted may be read, only /scratch written,
        # and no descriptor it holds (the context's) can be reopened through /proc/self/fd.
        read = top_level([*python_dirs(), *SYSTEM_DIRS, package_dir(), *SYSTEM_FILES])
        confinement: dict[str, Any] = {"drop_privileges": True}
        if _landlock_available():
            confinement["landlock"] = {"read": read, "write": [SCRATCH, "/dev/null"]}
        program = seccomp.compile_filter(worker_pid)
        return {**confinement, "seccomp": base64.b64encode(program).decode("ascii")}


def _mounts() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in top_level([*python_dirs(), package_dir()]):
        if not any(path == top or path.startswith(top + "/") for top in SYSTEM_DIRS):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args
