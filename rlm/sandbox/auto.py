"""`sandbox="auto"`: the strongest isolation level this machine really provides, chosen once.

Strongest first: `bwrap` (bubblewrap installed, libseccomp loadable, and the kernel lets it
build its namespaces: checked by starting bubblewrap once with the sandbox's own namespace
options, ~5 ms), then `strict` (Landlock and libseccomp), then `subprocess`, which does not
stop hostile code. Landing on `subprocess` issues one `IsolationWarning` per process, naming
what to install. The choice is made on first use, by one thread, and kept for the life of
the process: every session of every run gets the same level.

Only `"auto"` may land lower than the strongest level: a level named explicitly still raises
SandboxUnavailable when it cannot be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from rlm.errors import IsolationWarning, SandboxUnavailable

__all__ = ["AutoChoice", "Chooser", "auto_choice", "default_checks", "probe_bwrap"]

FLOOR = "subprocess"  # what is left when no isolating level works: a worker process, no confinement
_PROBE_TIMEOUT = 10.0  # seconds; a first bubblewrap start on a cold, loaded machine can take a while

Check = Callable[[], None]  # raises SandboxUnavailable, saying what is missing, when the level cannot run


@dataclass(frozen=True)
class AutoChoice:
    """The level `"auto"` stands for here, and why each stronger level was passed over."""

    level: str
    passed_over: tuple[tuple[str, str], ...] = ()  # (level, the reason it cannot run here)

    @property
    def isolated(self) -> bool:
        """False when model code runs with the user's own rights (the `subprocess` floor)."""
        return self.level != FLOOR

    def warning(self) -> str:
        """What the IsolationWarning says: the risk, and for each level what it lacks."""
        reasons = "; ".join(f"{level}: {why}" for level, why in self.passed_over)
        return (
            f'sandbox="auto" found no isolation on this machine, so model-written code runs as a plain '
            f"{self.level} worker with your user's rights (it can read your files and use the network). "
            f"To isolate it, install bubblewrap (apt-get install bubblewrap), or run on Linux with "
            f"Landlock and libseccomp (apt-get install libseccomp2). Why each level was passed over: {reasons}"
        )


class Chooser:
    """Picks the first level whose checks pass, once, and remembers it (thread-safe)."""

    def __init__(self, checks: Sequence[tuple[str, Sequence[Check]]], floor: str = FLOOR) -> None:
        self._checks = tuple(checks)
        self._floor = floor
        self._lock = threading.Lock()
        self._choice: AutoChoice | None = None

    def choice(self) -> AutoChoice:
        """The level for this process; the first call checks (and warns if it is the floor)."""
        with self._lock:
            if self._choice is not None:
                return self._choice
            self._choice = choice = self._choose()
        if not choice.isolated:  # outside the lock: a warnings filter set to "error" raises here
            warnings.warn(choice.warning(), IsolationWarning, stacklevel=_caller_outside_rlm())
        return choice

    def _choose(self) -> AutoChoice:
        passed_over: list[tuple[str, str]] = []
        for level, checks in self._checks:
            try:
                for check in checks:
                    check()
            except SandboxUnavailable as exc:
                passed_over.append((level, str(exc)))
                continue
            return AutoChoice(level, tuple(passed_over))
        return AutoChoice(self._floor, tuple(passed_over))


def _caller_outside_rlm() -> int:
    """The `stacklevel` that points a warning at the first caller outside this package (the
    user's `RLM_REPL(...)` line), wherever inside it the choice was first needed."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def probe_bwrap() -> None:
    """Start bubblewrap once with the sandbox's namespace options; SandboxUnavailable if refused.

    Having the program is not enough: a kernel (or an AppArmor policy) can forbid the user
    namespaces it needs, and that only shows when it runs.
    """
    from rlm.sandbox.bwrap import bwrap_path

    true = shutil.which("true") or "/bin/true"
    argv = [
        bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", true,
    ]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap could not be started ({exc})") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SandboxUnavailable(
            f"bubblewrap is installed but could not create its namespaces ({said[-1] if said else done.returncode}); "
            "check `sysctl user.max_user_namespaces` (and on Ubuntu 24.04+ "
            "`kernel.apparmor_restrict_unprivileged_userns`)"
        )


def _platform_check(level: str) -> Check:
    def check() -> None:
        from rlm.sandbox import sandbox_class

        sandbox_class(level).check_platform()

    return check


def default_checks() -> list[tuple[str, list[Check]]]:
    """The levels `"auto"` tries, strongest first, with the checks each must pass."""
    return [
        ("bwrap", [_platform_check("bwrap"), probe_bwrap]),
        ("strict", [_platform_check("strict")]),
    ]


_CHOOSER = Chooser(default_checks())


def auto_choice() -> AutoChoice:
    """What `"auto"` stands for in this process (checked on the first call, then remembered)."""
    return _CHOOSER.choice()
