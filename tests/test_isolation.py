"""Isolation levels: the escape suite over every level, limits, levels a machine lacks, and clean-up.

The escape probes (rlm/sandbox/escapes.py) run in a throwaway host process per level, so a
probe that gets out harms only that process; as root, the worker levels are probed again
with the throwaway host running as an unprivileged user. On this project's machines and CI every level
must really work: a level that cannot start here fails these tests, it is not skipped.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import RecordingBridge, make, ok, process_alive, repl, run
from rlm.errors import ConfigError, SandboxError, SandboxUnavailable
from rlm.sandbox import (
    SANDBOXES,
    ContextSource,
    SandboxLimits,
    check_available,
    create_sandbox,
    escapes,
    kernel,
    parse_size,
)

WORKER_LEVELS = ("subprocess", "strict", "bwrap")
CONFINED_LEVELS = ("strict", "bwrap")
MiB = 1 << 20


# -- the escape suite -----------------------------------------------------------------------------

UNPRIVILEGED = 65534  # nobody: the suite runs again as this user when the tests run as root
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def probed() -> dict[tuple[str, int | None], dict[str, dict]]:
    """Every level probed once, in parallel (each in its own throwaway host); as root, also the
    worker levels with the host running as an unprivileged user."""
    runs = [(level, None) for level in SANDBOXES]
    runs += [(level, UNPRIVILEGED) for level in WORKER_LEVELS] if AS_ROOT else []
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {run: pool.submit(escapes.probe_level, run[0], user=run[1]) for run in runs}
        return {run: future.result() for run, future in futures.items()}


@pytest.mark.parametrize("probe", [probe.name for probe in escapes.PROBES])
@pytest.mark.parametrize("level", sorted(SANDBOXES))
def test_escape_attempt_is_blocked_exactly_where_expected(probed, level, probe):
    outcome = probed[level, None][probe]
    should_escape = probe in escapes.expected(level)
    assert outcome["escaped"] is should_escape, f"{level}/{probe}: {outcome['detail']}"


@pytest.mark.skipif(not AS_ROOT, reason="switching to another user needs root")
@pytest.mark.parametrize("level", WORKER_LEVELS)
def test_escape_suite_as_an_unprivileged_user(probed, level):
    outcomes = probed[level, UNPRIVILEGED]
    wrong = {name: outcome["detail"] for name, outcome in outcomes.items()
             if outcome["escaped"] is not (name in escapes.expected(level, capabilities=0))}
    assert not wrong, f"{level} as uid {UNPRIVILEGED}: {wrong}"


def test_confined_levels_block_every_probe(probed):
    assert escapes.expected("bwrap") == escapes.expected("strict") == set()
    assert escapes.expected("strict", own_root=False) == {"stat_host_file"}  # Landlock does not mediate stat
    for level in CONFINED_LEVELS:
        escaped = {name for name, outcome in probed[level, None].items() if outcome["escaped"]}
        assert escaped == escapes.expected(level)


def test_every_probe_can_see_its_own_success(probed):
    """In-process nothing is blocked, so a probe that reports 'blocked' there would prove nothing
    (but for the few that need a capability this host lacks)."""
    outcomes = probed["inprocess", None]
    assert {name for name, outcome in outcomes.items() if outcome["escaped"]} == escapes.expected("inprocess")
    if escapes.own_capabilities() >> 23 & 1 and escapes.own_capabilities() & 1:  # CAP_SYS_NICE, CAP_CHOWN
        assert all(outcome["escaped"] for outcome in outcomes.values())


@pytest.mark.parametrize("level", sorted(SANDBOXES))
def test_the_confinement_the_worker_applied_is_recorded_on_its_first_cell(level):
    from rlm.sandbox.kernel import landlock_abi

    rlm, _, _ = make([repl("x = 1"), repl("y = 2"), "FINAL(done)"], sandbox=level, max_iterations=3)
    assert rlm.completion(context="ctx", query="q") == "done"
    first, second = [event.confinement for event in rlm.trace if event.type == "exec"]
    assert second is None  # the same worker: said once
    if level == "inprocess":
        assert first is None
    elif level == "subprocess":
        assert first == {"landlock_abi": None, "namespaces": [], "scratch_size": None, "own_root": False}
    else:
        assert first["landlock_abi"] == landlock_abi()
        assert first["scratch_size"] == SandboxLimits().file_size + MiB  # a tmpfs sized by the file limit
        assert {"ipc", "net", "mnt"} <= set(first["namespaces"])  # named as in /proc/self/ns
        assert first["own_root"]


# -- limits ---------------------------------------------------------------------------------------


@pytest.fixture(params=WORKER_LEVELS)
def limited(request: pytest.FixtureRequest, bridge: RecordingBridge):
    box = create_sandbox(request.param, bridge, SandboxLimits(memory=512 * MiB, file_size=MiB, cpu_time=1))
    yield box
    box.close()


def test_memory_past_the_limit_is_a_memory_error_and_the_session_survives(limited):
    ok(limited, "kept = 'yes'")
    result = run(limited, "block = bytearray(1024 * 1024 * 1024)")
    assert result.error is not None and "MemoryError" in result.error
    assert not result.restarted
    assert ok(limited, "small = bytearray(64 * 1024 * 1024)\nprint(kept, len(small))") == f"yes {64 * MiB}\n"


def test_descriptors_and_the_kernel_memory_they_hold_are_bounded(limited):
    """Socket buffers count against no memory limit: the number of descriptors bounds them."""
    code = (
        "import socket\nheld = []\ntry:\n    for _ in range(5000):\n        held.append(socket.socketpair())\n"
        "except OSError as exc:\n    print(len(held), exc.errno)\n"
    )
    pairs, code_number = ok(limited, code).split()
    assert int(pairs) < 130 and int(code_number) == 24  # EMFILE, past 256 descriptors


def test_a_file_past_the_size_limit_cannot_be_written(limited):
    result = run(limited, "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (2 * 1024 * 1024))")
    assert result.error is not None and "File too large" in result.error
    assert not result.restarted
    assert ok(limited, "with open('small.bin', 'wb') as f:\n    print(f.write(b'y' * 1000))") == "1000\n"


def test_cpu_time_past_the_limit_kills_and_replaces_the_worker(limited):
    limited.load_context(ContextSource(value="ctx"))
    ok(limited, "doomed = 1")
    started = time.monotonic()
    result = run(limited, "while True:\n    pass", timeout=30)
    assert time.monotonic() - started < 10
    assert result.restarted is True
    assert "CPU time limit" in result.error
    assert "NameError" in run(limited, "doomed").error
    assert ok(limited, "print(context)") == "ctx\n"


def test_limits_cannot_be_raised_from_model_code(limited):
    result = run(limited, "import resource\nresource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))")
    assert result.error is not None and ("ValueError" in result.error or "PermissionError" in result.error)
    soft, hard = map(int, ok(limited, "print(*resource.getrlimit(resource.RLIMIT_AS))").split())
    assert soft == hard == 512 * MiB


def test_inprocess_refuses_limits_it_cannot_enforce(bridge):
    with pytest.raises(ConfigError, match="cannot enforce"):
        create_sandbox("inprocess", bridge, SandboxLimits(memory=MiB * 512))
    create_sandbox("inprocess", bridge, SandboxLimits()).close()  # the defaults are accepted


@pytest.mark.parametrize(
    "kwargs", [{"memory": 0}, {"memory": -1}, {"cpu_time": 0}, {"file_size": "1G"}, {"memory": True}, {"memory": 1000}]
)
def test_bad_limits_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SandboxLimits(**kwargs)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4G", 4 << 30), ("512M", 512 * MiB), ("1.5g", 3 << 29), ("2GiB", 2 << 30), ("100kb", 102_400), ("123", 123),
     ("none", None), ("off", None)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "lots", "-1G", "0"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


# -- a level the machine lacks fails when created, saying what to install -------------------------


def test_every_level_is_available_here():
    for name in SANDBOXES:
        check_available(name)


def test_bwrap_without_bubblewrap_names_the_package(bridge, monkeypatch):
    from rlm.sandbox import bwrap

    monkeypatch.setattr(bwrap.shutil, "which", lambda name: None)
    monkeypatch.setattr(bwrap.os, "access", lambda path, mode: False)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        create_sandbox("bwrap", bridge)


def test_bwrap_refused_by_the_kernel_says_why(bridge, monkeypatch, tmp_path):
    from rlm.sandbox import bwrap

    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bwrap, "bwrap_path", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*user namespaces"):
        create_sandbox("bwrap", bridge)


def test_strict_on_a_kernel_without_landlock_says_so(bridge, monkeypatch):
    import errno

    from rlm.sandbox import kernel, strict

    def no_landlock() -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    strict.landlock_abi.cache_clear()
    monkeypatch.setattr(kernel, "landlock_abi", no_landlock)
    try:
        with pytest.raises(SandboxUnavailable, match="Landlock.*5.13"):
            create_sandbox("strict", bridge)
    finally:
        strict.landlock_abi.cache_clear()


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_confined_levels_without_pyseccomp_name_it(bridge, monkeypatch, level):
    from rlm.sandbox import strict

    strict.landlock_abi.cache_clear()
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    try:
        with pytest.raises(SandboxUnavailable, match="pyseccomp.*libseccomp2"):
            create_sandbox(level, bridge)
    finally:
        strict.landlock_abi.cache_clear()


# -- confinement details --------------------------------------------------------------------------


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_confined_worker_keeps_what_python_needs(bridge, level):
    with create_sandbox(level, bridge) as box:
        code = (
            "import json, re, zlib, hashlib, decimal, sqlite3, datetime, threading, asyncio, os\n"
            "with open('notes.txt', 'w') as f:\n    f.write('kept')\n"
            "t = threading.Thread(target=lambda: print('thread', llm_query('x')))\nt.start(); t.join()\n"
            "print(asyncio.run(asyncio.sleep(0, 'async')), open('notes.txt').read(), os.cpu_count() >= 1)\n"
            "os.kill(os.getpid(), 0)"
        )
        assert ok(box, code) == "thread X\nasync kept True\n"


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_confined_worker_cannot_reach_the_rest_of_the_checkout_or_ptrace(bridge, level):
    root = Path(__file__).resolve().parent.parent
    with create_sandbox(level, bridge) as box:
        code = (
            f"try:\n    open({str(root / 'pyproject.toml')!r}).read()\n    print('read')\n"
            "except OSError as exc:\n    print(type(exc).__name__)\n"
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())"  # PTRACE_ATTACH
        )
        out = ok(box, "import os\n" + code).split()
    assert out[0] in ("PermissionError", "FileNotFoundError")
    assert out[1:] == ["-1", "1"]  # EPERM


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_confined_worker_holds_no_capability_and_is_filtered(bridge, level):
    """Read by the host from /proc: no capability in any set, also when the host is root."""
    with create_sandbox(level, bridge) as box:
        status = _status(box.worker_pid)
    assert {key: int(status[key], 16) for key in ("CapInh", "CapPrm", "CapEff", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapAmb"), 0)
    if AS_ROOT:
        assert int(status["CapBnd"], 16) == 0
    assert (status["NoNewPrivs"].strip(), status["Seccomp"].strip()) == ("1", "2")


def test_strict_worker_has_its_own_ipc_network_and_mount_namespaces(bridge):
    with create_sandbox("strict", bridge) as box:
        theirs = {name: os.readlink(f"/proc/{box.worker_pid}/ns/{name}") for name in ("ipc", "net", "mnt")}
    assert not {name for name, link in theirs.items() if link == os.readlink(f"/proc/self/ns/{name}")}


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_no_system_call_makes_a_process(bridge, level):
    """fork, vfork, clone without CLONE_THREAD, clone3 (ENOSYS, so that glibc falls back to clone)."""
    import pyseccomp

    number = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in ("clone", "fork", "vfork",
                                                                                        "clone3")}
    code = (
        "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "args = ctypes.create_string_buffer(88)  # struct clone_args, all zero: a plain fork\nfailed = []\n"
        f"for call in (({number['clone']}, 17, 0, 0, 0, 0), ({number['clone']}, 0x4111, 0, 0, 0, 0), "
        f"({number['fork']},), ({number['vfork']},), ({number['clone3']}, args, 88)):\n"
        "    if libc.syscall(*call) == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    failed.append(ctypes.get_errno())\nprint(failed)"
    )
    with create_sandbox(level, bridge) as box:
        out = ok(box, code)
        children = kernel.descendants(box.worker_pid)
    assert children == []
    assert out == "[1, 1, 1, 1, 38]\n"  # EPERM for each, ENOSYS for clone3


def test_seccomp_policy_is_an_auditable_allow_list():
    from rlm.sandbox import seccomp

    allowed = [name for name, _ in seccomp.ALLOWED]
    assert len(allowed) == len(set(allowed))
    assert all(why for _, why in seccomp.ALLOWED) and all(rule.why and rule.when for rule in seccomp.CHECKED)
    assert not set(allowed) & {rule.syscall for rule in seccomp.CHECKED}
    never = {
        "socket", "connect", "bind", "listen", "accept4", "sendmmsg", "execve", "execveat", "fork", "vfork", "clone3",
        "ptrace", "process_vm_readv", "pidfd_open", "pidfd_send_signal", "tkill", "shmget", "shmat", "msgget",
        "msgrcv", "semget", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
        "utimensat", "setxattr", "lsetxattr", "fsetxattr", "link", "linkat", "inotify_init1", "inotify_add_watch",
        "fanotify_init", "flock", "statfs", "setrlimit", "io_uring_setup", "unshare", "setns", "mount", "bpf",
        "perf_event_open", "userfaultfd", "keyctl", "capset", "setuid", "seccomp", "landlock_create_ruleset",
        "memfd_create", "memfd_secret", "mq_open",
    }
    assert not never & set(allowed)
    # What is denied on purpose says why, and nothing allowed lets it through: not the call with
    # any arguments, nor a checked row whose conditions all hold for the denied ones.
    assert all(rule.why for rule in seccomp.DENIED)
    for denied in seccomp.DENIED:
        assert denied.syscall not in allowed
        same_call = [rule for rule in seccomp.CHECKED if rule.syscall == denied.syscall]
        assert not [rule for rule in same_call if set(rule.when) <= set(denied.when)]


# -- files: nothing left behind -------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("level", WORKER_LEVELS)
def test_close_after_a_worker_crash_leaves_no_files_or_descriptors(bridge, level):
    before = _open_fds()
    box = create_sandbox(level, bridge)
    scratch = box._held.scratch  # noqa: SLF001 - where the host keeps it (None under bwrap: a tmpfs)
    box.load_context(ContextSource(value="written once to an unnamed temporary file"))
    ok(box, "with open('model-file.txt', 'w') as f:\n    f.write('x')")
    assert run(box, "import os\nos._exit(9)").restarted
    assert ok(box, "print(context[:7])") == "written\n"
    box.close()
    assert scratch is None or not scratch.exists()
    assert _open_fds() == before


# Model code that takes the worker's own ways out away: a thread (which interpreter shutdown
# waits for) keeps the exit path patched, so only something outside the worker can end it.
_NO_WAY_OUT = (
    "import os, sys, threading, time\n"
    "serve = sys.modules['rlm.sandbox.serve']\n"
    "def forever(*args):\n"
    "    while True:\n"
    "        time.sleep(3600)\n"
    "def keep():\n"
    "    while True:\n"
    "        serve._leave_orphaned, os._exit = forever, (lambda *args: None)\n"
    "        time.sleep(0.001)\n"
    "threading.Thread(target=keep).start()\n"
)


def _host_script(level: str, cell: str = "") -> str:
    return (
        "import sys, time\n"
        "from rlm.sandbox import create_sandbox, ContextSource\n"
        f"box = create_sandbox({level!r}, lambda kind, prompts: prompts)\n"
        "box.load_context(ContextSource(value='x' * 1000))\n"
        "box.run(\"open('model-file.txt', 'w').write('x')\", timeout=10, max_output=100)\n"
        f"box.run({cell!r}, timeout=10, max_output=100)\n"
        "scratch = box._held.scratch\n"
        "print(box.worker_pid, scratch or '', flush=True)\n"
        "time.sleep(60)\n"
    )


@pytest.mark.parametrize("cell", ["", _NO_WAY_OUT], ids=["plain", "exit path patched"])
@pytest.mark.parametrize("level", WORKER_LEVELS)
def test_worker_and_scratch_go_when_the_host_is_killed(level, cell):
    host = subprocess.Popen([sys.executable, "-c", _host_script(level, cell)], stdout=subprocess.PIPE, text=True)
    scratch: list[str] = []
    try:
        worker_pid, *scratch = host.stdout.readline().split()
        os.kill(host.pid, signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 10  # the worker looks twice a second; a loaded machine is slower
        while time.monotonic() < deadline and (process_alive(int(worker_pid)) or _left_behind(scratch)):
            time.sleep(0.05)
        assert not process_alive(int(worker_pid))
        assert not _left_behind(scratch)
        if level == "subprocess":
            assert not Path(scratch[0]).exists()
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
        if scratch:
            shutil.rmtree(scratch[0], ignore_errors=True)  # the empty directory strict leaves


def _left_behind(scratch: list[str]) -> bool:
    """Files left in the scratch directory. Under strict the worker may empty it but not remove
    it (Landlock lets it write only beneath it); under bwrap it is a tmpfs that vanishes."""
    return bool(scratch) and Path(scratch[0]).exists() and any(Path(scratch[0]).iterdir())


def test_a_start_failure_is_a_sandbox_error_with_the_workers_output(bridge, monkeypatch):
    from rlm.sandbox import process
    from rlm.sandbox import subprocess as worker_sandbox

    # A fresh interpreter (as bwrap starts one) that fails at boot...
    monkeypatch.setattr(process, "BOOT", "import sys; sys.stderr.write('boom at boot'); sys.exit(5)")
    fresh = worker_sandbox.SubprocessSandbox._launch
    monkeypatch.setattr(worker_sandbox.SubprocessSandbox, "_launch",
                        lambda self: dataclasses.replace(fresh(self), argv=worker_sandbox.python_argv(), forked=False))
    with pytest.raises(SandboxError, match="boom at boot"):
        create_sandbox("subprocess", bridge)
    # ... and a forked worker that cannot become one (its directory is gone).
    monkeypatch.setattr(worker_sandbox.SubprocessSandbox, "_launch",
                        lambda self: dataclasses.replace(fresh(self), cwd="/nonexistent/scratch"))
    with pytest.raises(SandboxError, match="nonexistent/scratch"):
        create_sandbox("subprocess", bridge)


# -- the choice and the limits, through RLM_REPL and the command line -----------------------------


def test_rlm_repl_refuses_an_unavailable_level_when_made(monkeypatch):
    from helpers import make
    from rlm.sandbox import bwrap

    monkeypatch.setattr(bwrap, "bwrap_path", lambda: (_ for _ in ()).throw(SandboxUnavailable("install bubblewrap")))
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
        make(["FINAL(x)"], sandbox="bwrap")
    with pytest.raises(ConfigError, match="cannot enforce"):
        make(["FINAL(x)"], sandbox="inprocess", memory_limit=512 * MiB)
    with pytest.raises(ConfigError, match="memory"):
        make(["FINAL(x)"], sandbox="subprocess", memory_limit=0)


@pytest.mark.parametrize("level", CONFINED_LEVELS)
def test_a_run_goes_on_after_model_code_hits_the_memory_limit(level):
    from helpers import make, repl

    rlm, root, _ = make(
        [repl("hog = bytearray(1024 * 1024 * 1024)"), repl("print(len(context))"), "FINAL(done)"],
        sandbox=level, memory_limit=512 * MiB,
    )
    assert rlm.completion(context="twelve chars", query="How long?") == "done"
    cells = [event for event in rlm.trace if event.type == "exec"]
    assert "MemoryError" in cells[0].error and not cells[0].restarted
    assert cells[1].stdout == "12\n"


def test_cli_names_what_a_missing_level_needs_and_exits_4(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from rlm.cli.main import app
    from rlm.sandbox import bwrap

    monkeypatch.setattr(bwrap.shutil, "which", lambda name: None)
    monkeypatch.setattr(bwrap.os, "access", lambda path, mode: False)
    context = tmp_path / "context.txt"
    context.write_text("text")
    result = CliRunner().invoke(app, ["ask", "q", "--context", str(context), "--sandbox", "bwrap", "--quiet",
                                      "--api-url", "http://127.0.0.1:9/v1", "--model", "m", "--sub-model", "m"])
    assert result.exit_code == 4, result.output
    assert "apt-get install bubblewrap" in result.stderr
    assert "inprocess" not in result.stderr  # never advise less isolation


def test_cli_rejects_a_bad_memory_limit(tmp_path):
    from typer.testing import CliRunner

    from rlm.cli.main import app

    context = tmp_path / "context.txt"
    context.write_text("text")
    result = CliRunner().invoke(app, ["ask", "q", "--context", str(context), "--memory-limit", "lots", "--quiet",
                                      "--api-url", "http://127.0.0.1:9/v1", "--model", "m", "--sub-model", "m"])
    assert result.exit_code == 2
    assert "4G" in result.stderr
