"""Escape probes: what hostile model code tries, run against each sandbox level.

    python -m rlm.sandbox.escapes            # the table of what each level blocks, on this machine

Each probe is a cell of model code. It escaped if it printed ESCAPED, or if the host saw
the effect (a file written outside scratch, a signal, a connection). Every level runs its
probes in a throwaway host process, so that a probe that works (killing the host,
forking) harms only that process; the probes' targets (a secret in the host's environment,
a TCP and a Unix socket listening, a directory outside scratch) belong to it too. The
`inprocess` level, which blocks nothing, shows that every probe can see its own success.

The test suite runs the same probes and compares them with `expected()`.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["PROBES", "Probe", "expected", "main", "probe_level"]

MEMORY_LIMIT = 1 << 30  # the worker levels' memory limit while probing
_SECRET_NAME = "RLM_PROBE_SECRET"


@dataclass(frozen=True)
class Probe:
    """One escape attempt. `code` is formatted with the throwaway host's facts (see `_facts`)."""

    name: str
    title: str
    code: str


PROBES = (
    Probe("read_passwd", "read /etc/passwd",
          "print('ESCAPED' if 'root:' in open('/etc/passwd').read() else 'no')"),
    Probe("host_environ_file", "read the host's /proc/<pid>/environ",
          "data = open('/proc/{pid}/environ', 'rb').read()\nprint('ESCAPED' if b'{secret}' in data else 'no')"),
    Probe("host_env_secret", "see a secret from the host's environment",
          "import os\nprint('ESCAPED' if os.environ.get('{secret_name}') == '{secret}' else 'no')"),
    Probe("write_outside", "write a file outside scratch",
          "with open('{outside}/written-by-model.txt', 'w') as f:\n    f.write('x')\nprint('ESCAPED')"),
    Probe("tcp_loopback", "open a TCP connection to 127.0.0.1",
          "import socket\nsocket.create_connection(('127.0.0.1', {tcp_port}), timeout=3)\nprint('ESCAPED')"),
    Probe("unix_socket", "connect to a Unix socket of the host",
          "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('{unix_path}')\nprint('ESCAPED')"),
    Probe("run_program", "start a program (subprocess)",
          "import subprocess\nprint(subprocess.run(['echo', 'ESCAPED'], capture_output=True, text=True).stdout)"),
    Probe("fork_bomb", "fork processes (a fork bomb, bounded to 8)",
          "import os\nkids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n"
          "    kids.append(pid)\nfor pid in kids:\n    os.waitpid(pid, 0)\nprint('ESCAPED')"),
    Probe("signal_host", "send a signal to the host process",
          "import os, signal\nos.kill({pid}, signal.SIGUSR1)"),
    Probe("raise_limits", "raise its resource limits",
          "import resource\ninf = resource.RLIM_INFINITY\nresource.setrlimit(resource.RLIMIT_AS, (inf, inf))\n"
          "print('ESCAPED')"),
    Probe("memory", "allocate past the memory limit",
          "block = bytes({too_much})\nprint('ESCAPED')"),
)


def expected(level: str) -> set[str]:
    """Names of the probes that are NOT blocked at `level` (all others must be)."""
    everything = {probe.name for probe in PROBES}
    if level == "inprocess":
        return everything
    if level == "subprocess":
        # Only the environment is scrubbed and the limits set; a hard limit can be raised
        # back only with CAP_SYS_RESOURCE (root outside a container, say).
        escaped = everything - {"host_env_secret", "memory", "raise_limits"}
        return escaped | ({"raise_limits"} if _has_capability(_CAP_SYS_RESOURCE) else set())
    return set()


_CAP_SYS_RESOURCE = 24


def _has_capability(bit: int) -> bool:
    """Whether this process (and so a worker it starts) holds a Linux capability."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def probe_level(level: str, timeout: float = 120.0) -> dict[str, dict]:
    """Run every probe against `level` in a throwaway host; {probe name: {'escaped', 'detail'}}.

    Raises RuntimeError (with the host's output) if the level could not be probed at all.
    """
    env = {**os.environ, _SECRET_NAME: secrets.token_hex(16)}
    done = subprocess.run(
        [sys.executable, "-m", "rlm.sandbox.escapes", "--host", level],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"probing {level!r} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the throwaway host ------------------------------------------------------------------------


class _Targets:
    """What the probes aim at, owned by the throwaway host."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: self.signals.append(signum))
        self.outside = tempfile.mkdtemp(prefix="rlm-escape-")
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix_path = os.path.join(self.outside, "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()

    def facts(self) -> dict[str, object]:
        return {
            "pid": os.getpid(), "secret": os.environ[_SECRET_NAME], "secret_name": _SECRET_NAME,
            "outside": self.outside, "tcp_port": self.tcp.getsockname()[1], "unix_path": self.unix_path,
            "too_much": 2 * MEMORY_LIMIT,
        }

    def saw_effect(self, probe: Probe) -> bool:
        """Whether the host saw the probe succeed (and undo it, for the next probe)."""
        if probe.name == "signal_host":
            seen, self.signals[:] = bool(self.signals), []
            return seen
        if probe.name == "write_outside":
            path = os.path.join(self.outside, "written-by-model.txt")
            seen = os.path.exists(path)
            if seen:
                os.remove(path)
            return seen
        listener = {"tcp_loopback": self.tcp, "unix_socket": self.unix}.get(probe.name)
        if listener is None or not select.select([listener], [], [], 0.05)[0]:
            return False
        listener.accept()[0].close()
        return True

    def close(self) -> None:
        self.tcp.close()
        self.unix.close()
        for name in os.listdir(self.outside):
            os.remove(os.path.join(self.outside, name))
        os.rmdir(self.outside)


def _serve_as_host(level: str) -> dict[str, dict]:
    from rlm.sandbox import SandboxLimits, create_sandbox

    targets = _Targets()
    limits = None if level == "inprocess" else SandboxLimits(memory=MEMORY_LIMIT)
    results: dict[str, dict] = {}
    try:
        with create_sandbox(level, lambda kind, prompts: ["" for _ in prompts], limits) as box:
            for probe in PROBES:
                outcome = box.run(probe.code.format(**targets.facts()), timeout=20, max_output=2000)
                escaped = "ESCAPED" in outcome.stdout or targets.saw_effect(probe)
                detail = (outcome.error or outcome.stdout or "").strip().splitlines()
                results[probe.name] = {"escaped": escaped, "detail": detail[-1] if detail else ""}
    finally:
        targets.close()
    return results


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
    if args[:1] == ["--host"]:
        print(json.dumps(_serve_as_host(args[1])))
        return 0
    from rlm.sandbox import SANDBOXES

    levels = ["inprocess", "subprocess", *(name for name in SANDBOXES if name not in ("inprocess", "subprocess"))]
    outcomes: dict[str, dict[str, dict] | str] = {}
    with ThreadPoolExecutor(max_workers=len(levels)) as pool:
        futures = {level: pool.submit(probe_level, level) for level in levels}
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
