"""Running on Ray (`pip install 'rlm[ray]'`): connecting to a cluster, and one item per Ray task.

`connected(address)`: `"local"` starts a Ray instance on this machine for the batch, listening
on 127.0.0.1 only, without a dashboard, and stops it at the end; any other address is handed
to `ray.init` (`"auto"`: the cluster `ray start` runs on this machine; `"host:6379"`;
`"ray://host:10001"`). A process already connected to Ray (`ray.init()` called) keeps its
own connection, whatever the address, and it is left open.

`run_tasks(...)`: each job is one Ray task declaring its CPU and memory (`TaskResources`),
at most `window` in flight. What Ray reports as a failure of the task's process (the worker or
its node died, was killed, ran out of memory; the task was cancelled) loses that job's result,
which is reported to `on_lost`: the item has no result, so the next run does it, as after a
killed driver. Ray retries such a task first (`TaskResources.retries`). An exception raised by
the task's own code is a bug and stops the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from rlm.errors import ConfigError

__all__ = ["LOCAL", "TaskResources", "connected", "local_cluster", "run_tasks"]

LOCAL = "local"
_LOCAL_OBJECT_STORE = 1 << 30  # bytes of shared memory for inline contexts in flight; Ray spills past it
_INSTALL = "running on Ray needs Ray: pip install 'rlm[ray]' (and rlm on every node of the cluster)"


@dataclass(frozen=True, kw_only=True)
class TaskResources:
    """What each Ray task declares, for Ray's scheduler (logical amounts, not limits).

    An RLM run waits on its model most of the time, so a fraction of a CPU is the default;
    memory is what the run and its REPL worker usually need (raise it for big contexts).
    `retries`: how many times Ray runs a task again whose process died.
    """

    cpus: float = 0.5
    memory: int = 1 << 30
    retries: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)) or not 0 < self.cpus <= 1024:
            raise ConfigError(f"task CPUs must be a number above 0 and at most 1024, got {self.cpus!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or not 1 << 20 <= self.memory <= 1 << 50:
            raise ConfigError(f"task memory must be a whole number of bytes from 1 MiB up, got {self.memory!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 100:
            raise ConfigError(f"task retries must be a whole number from 0 to 100, got {self.retries!r}")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(_INSTALL) from None
    return ray


@contextlib.contextmanager
def local_cluster(
    *, num_cpus: int | None = None, object_store_memory: int = _LOCAL_OBJECT_STORE, temp_dir: str | None = None
) -> Iterator[Any]:
    """A Ray instance on this machine for the length of the block: 127.0.0.1 only, no dashboard,
    a bounded object store; stopped (all its processes) at the end. Yields the `ray` module.

    Ray reads the choice of 127.0.0.1 once per process, on import: a process that started a
    local instance this way joins a remote cluster afterwards through its ray:// address.
    `temp_dir`: where Ray keeps its sockets and logs (default /tmp/ray; keep the path short).
    """
    # Read by Ray when it is imported (so a Ray imported earlier keeps its own choice) and by the
    # processes it starts: node address 127.0.0.1, so no port opens beyond this machine; token
    # authentication on, as Ray's default for a local instance, without its warning.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray = _import_ray()
    try:
        ray.init(
            address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
            logging_level=logging.WARNING, log_to_driver=False, **({"_temp_dir": temp_dir} if temp_dir else {}),
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"Ray could not start on this machine ({exc}); start it yourself (ray start --head) and "
                          "pass --ray auto") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def connected(address: str, resources: TaskResources | None = None) -> Iterator[Any]:
    """Ray, connected to `address` for the length of the block (see the module's docstring).

    On a local instance started here, `resources` are checked first: Ray would wait forever
    for a node that can run a task declaring more than this machine has.
    """
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"the Ray address must be 'local', 'auto', host:port or ray://host:port, got {address!r}")
    imported = sys.modules.get("ray")  # not imported yet: then not connected either
    if address == LOCAL and not (imported is not None and imported.is_initialized()):
        with local_cluster() as ray:
            if resources is not None:
                _check_fits(ray.cluster_resources(), resources)
            yield ray
        return
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to a Ray cluster at {address!r} ({exc}); start one there (ray start --head), "
            "or pass --ray alone for a local one"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_fits(total: dict[str, float], resources: TaskResources) -> None:
    cpus, memory = total.get("CPU", 0), total.get("memory", 0)
    if resources.cpus > cpus or resources.memory > memory:
        raise ConfigError(
            f"a task declares {resources.cpus:g} CPU and {resources.memory / 2**30:.2f} GiB, and this machine's Ray has "
            f"{cpus:g} CPU and {memory / 2**30:.2f} GiB: lower --task-cpus or --task-memory"
        )


def run_tasks(
    ray: Any,
    function: Callable[..., dict[str, Any]],
    jobs: Iterator[tuple[str, tuple[Any, ...]]],
    *,
    window: int,
    resources: TaskResources,
    name: str,
    on_done: Callable[[str, dict[str, Any]], None],
    on_lost: Callable[[str, str], None],
) -> None:
    """Run `function(*args)` as a Ray task for each (key, args) of `jobs`, at most `window` at
    once; `on_done(key, value)` or `on_lost(key, reason)` in this thread as each ends.
    Interrupted, the tasks in flight are cancelled."""
    remote = ray.remote(function).options(
        name=name, num_cpus=resources.cpus, memory=resources.memory, max_retries=resources.retries,
        retry_exceptions=False,
    )
    running: dict[Any, str] = {}
    try:
        for key, args in jobs:
            while len(running) >= window:
                _collect(ray, running, on_done, on_lost)
            running[remote.remote(*args)] = key
        while running:
            _collect(ray, running, on_done, on_lost)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _collect(
    ray: Any, running: dict[Any, str], on_done: Callable[[str, dict[str, Any]], None],
    on_lost: Callable[[str, str], None],
) -> None:
    ready, _ = ray.wait(list(running), num_returns=1)
    for ref in ready:
        key = running.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # the task's own code raised: a bug, not a lost process
        except ray.exceptions.RayError as exc:
            on_lost(key, _reason(exc))
            continue
        on_done(key, value)


def _reason(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
