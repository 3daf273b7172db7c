"""`--ray [ADDRESS]`, the option of `rlm batch` and `rlm bench run` that sends the runs to Ray.

Given alone it means a Ray instance started on this machine for the command ("local"); with
an address, that cluster. Click takes an option's value from the next word, so a bare `--ray`
is told apart here: followed by nothing, by another option or by a file that exists (the
questions file: an address is never one), it is `--ray=local`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand

__all__ = ["RAY_OPTION", "TASK_CPUS", "TASK_MEMORY", "TASK_RETRIES", "OptionalRayValue", "resources"]

_RAY = "--ray"

RAY_OPTION = typer.Option(
    _RAY, metavar="[ADDRESS]",
    help="Run on Ray (pip install 'rlm[ray]'): alone, a Ray instance on this machine for this command; or a "
         "cluster's address: auto (the cluster ray start runs here), host:port, ray://host:10001.",
)


class OptionalRayValue(TyperCommand):
    """A command whose `--ray` may be given without a value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from rlm.batch.cluster import LOCAL

        given = list(args)
        for index, word in enumerate(given):
            if word == "--":
                break
            if word == _RAY and (index + 1 == len(given) or _not_an_address(given[index + 1])):
                given[index] = f"{_RAY}={LOCAL}"
        return super().parse_args(ctx, given)


def _not_an_address(word: str) -> bool:
    return word.startswith("-") or os.path.exists(word)


TASK_CPUS = Annotated[
    float, typer.Option(min=0.01, metavar="N", help="CPUs each Ray task declares (an RLM run mostly waits on its "
                        "model).")
]
TASK_MEMORY = Annotated[str, typer.Option(metavar="SIZE", help="Memory each Ray task declares, e.g. 1G.")]
TASK_RETRIES = Annotated[
    int, typer.Option(min=0, max=100, metavar="N", help="Times Ray runs a task again whose worker died.")
]


def resources(cpus: float, memory: str, retries: int) -> Any:
    """The `TaskResources` of the --task-* options."""
    from rlm.batch.cluster import TaskResources
    from rlm.cli.exits import BadInput
    from rlm.sandbox import parse_size

    size = parse_size(memory)
    if size is None:
        raise BadInput("--task-memory needs a size such as 1G or 512M (a Ray task declares how much it needs)")
    return TaskResources(cpus=cpus, memory=size, retries=retries)
