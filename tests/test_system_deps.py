"""scripts/system-deps.sh, the first step of the README's test command: it installs only what is
missing, runs `apt-get update` once before installing, and uses sudo only when not root. Run
against stand-ins for apt-get and sudo that record what they were asked."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "system-deps.sh"
PACKAGES = "bubblewrap libseccomp2 chromium chromium-driver"
NOBODY = 65534


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder any user can enter (uid 65534 runs the script from it when the tests run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="rlm-system-deps-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def tools(place: Path, present: tuple[str, ...], *, sudo: bool) -> Path:
    """A PATH of its own: bash, python3 and env, the `present` programs, and recording stand-ins."""
    folder = place / "bin"
    folder.mkdir()
    log = place / "log"
    for name, target in (("bash", "/bin/bash"), ("env", "/usr/bin/env"), ("id", "/usr/bin/id"),
                         ("python3", sys.executable)):
        (folder / name).symlink_to(target)
    scripts = {name: "#!/bin/sh\nexit 0\n" for name in present}
    scripts["apt-get"] = f'#!/bin/sh\necho "apt-get $*" >> {log}\n'
    if sudo:
        scripts["sudo"] = f'#!/bin/sh\necho "sudo" >> {log}\nexec "$@"\n'
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run(folder: Path, *, uid: int | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(folder), "HOME": str(folder.parent)}
    return subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, env=env, cwd=folder.parent, timeout=30,
        preexec_fn=(lambda: os.setuid(uid)) if uid is not None else None,
    )


def logged(place: Path) -> list[str]:
    log = place / "log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_script_is_executable() -> None:
    assert SCRIPT.stat().st_mode & stat.S_IXUSR


def test_with_everything_there_it_does_nothing(place: Path) -> None:
    done = run(tools(place, ("bwrap", "chromium", "chromedriver"), sudo=False))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert logged(place) == []


def test_another_browser_name_on_path_is_enough(place: Path) -> None:
    done = run(tools(place, ("bwrap", "chromium-browser", "chromedriver"), sudo=False))
    assert done.returncode == 0 and logged(place) == []


def _user_cases(place: Path, uid: int | None) -> None:
    """As a user without privileges: through sudo when there is one, else the command to run as root."""
    with_sudo, without = place / "with-sudo", place / "without-sudo"
    for folder in (with_sudo, without):
        folder.mkdir()
        folder.chmod(0o777)  # the stand-ins, run as that user, write their log here
    done = run(tools(with_sudo, ("bwrap",), sudo=True), uid=uid)
    assert done.returncode == 0, done.stderr
    assert logged(with_sudo) == ["sudo", "apt-get update -qq", "sudo", f"apt-get install -y -qq {PACKAGES}"]
    done = run(tools(without, ("bwrap",), sudo=False), uid=uid)
    assert done.returncode == 1 and logged(without) == []
    assert "sudo is not installed" in done.stderr and f"apt-get install -y {PACKAGES}" in done.stderr


def test_what_is_missing_is_installed_after_one_update_with_sudo_only_when_needed(place: Path) -> None:
    if os.getuid() == 0:
        done = run(tools(place, ("bwrap", "chromium"), sudo=True))
        assert done.returncode == 0, done.stderr
        assert logged(place) == ["apt-get update -qq", f"apt-get install -y -qq {PACKAGES}"]  # root: no sudo
        assert "missing: chromium-driver" in done.stderr
        for name in ("bin", "log"):
            subprocess.run(["rm", "-rf", str(place / name)], check=True)
        _user_cases(place, NOBODY)
    else:
        _user_cases(place, None)
