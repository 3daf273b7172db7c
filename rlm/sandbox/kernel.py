"""Linux facts both sides of the sandbox need: the Landlock ABI, and a process's descendants.

Neutral ground: the host (to check a level and to stop a worker with everything it started)
and the worker (to confine itself, and to take its own children with it when it leaves)
both import this module, and nothing else of each other. Standard library and ctypes only.
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False  # typing costs a worker start-up time; type checkers read this as True
if TYPE_CHECKING:
    from typing import Callable, Iterable

__all__ = ["landlock_abi", "alive", "descendants", "kill_descendants", "kill_strays"]

# The Landlock system calls have the same numbers on every architecture (they are newer than
# the unified numbering).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_KILL_ROUNDS = 50  # rounds of looking for descendants; each kills all that it finds


def libc() -> "object":
    """The C library, with errno kept for ctypes.get_errno()."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; OSError (EOPNOTSUPP, ENOSYS) without Landlock."""
    import ctypes

    lib = libc()
    lib.syscall.restype = ctypes.c_long
    abi = lib.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                      ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(abi)


def _stat(pid: int | str) -> tuple[bytes, int] | None:
    """(state, parent pid) of a process, or None if it has ended."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the name in parentheses may hold anything
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended, only not yet been reaped)."""
    found = _stat(pid)
    return found is not None and found[0] not in (b"Z", b"X")


def _children() -> dict[int, list[int]]:
    """{pid: [live children]} over every process this one can see (zombies left out)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        found = _stat(name) if name.isdigit() else None
        if found is not None and found[0] not in (b"Z", b"X"):
            children.setdefault(found[1], []).append(int(name))
    return children


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, their children...), nearest first."""
    children = _children()
    return _below(children, children.get(pid, ()))


def kill_descendants(pid: int) -> int:
    """SIGKILL every process below `pid`, again until none is left (bounded); how many were killed.

    `pid` should be a child subreaper that cannot fork meanwhile (stopped, or the caller
    itself): a process whose parent dies is then handed to it, so a double fork or a new
    session cannot slip out of its tree. Each process is signalled through a pidfd after its
    parent was checked again, so that a recycled pid is never hit.
    """
    return _kill_trees(pid, lambda children: children)


def kill_strays(keep: set[int]) -> int:
    """SIGKILL every child of this process not in `keep`, and everything below it; how many.

    For a child subreaper: when a child of its own dies, the processes that child left running
    are handed to it (however they detached), and are strays to be killed, not adopted.
    Repeated until none is left (bounded): a stray's children come to us when it dies.
    """
    return _kill_trees(os.getpid(), lambda children: [child for child in children if child not in keep])


def _below(children: dict[int, list[int]], roots: Iterable[int]) -> list[int]:
    """`roots` and every process below them in `children`, nearest first."""
    found: list[int] = []
    queue = list(roots)
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def _kill_trees(parent: int, pick: Callable[[list[int]], list[int]]) -> int:
    """SIGKILL the children of `parent` that `pick` chooses, with everything below them, in rounds."""
    killed = 0
    for _ in range(_KILL_ROUNDS):
        children = _children()
        found = _below(children, pick(children.get(parent, [])))
        if not found:
            break
        tree = {parent, *found}
        for pid in found:
            killed += _kill_if_below(pid, tree)
    return killed


def _kill_if_below(child: int, tree: set[int]) -> int:
    try:
        pidfd = os.pidfd_open(child)
    except OSError:
        return 0  # already gone
    try:
        found = _stat(child)  # read after the pidfd: if it still names a process of the tree, it is ours
        if found is None or found[1] not in tree:
            return 0
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return 1
    except ProcessLookupError:
        return 0
    finally:
        os.close(pidfd)
