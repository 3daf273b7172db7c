"""What the `rlm` command prints, made safe: text from models and servers reaches a terminal
without the escape sequences and control characters in it, and JSON keeps them as escapes.

Every command prints through these functions, so a model's answer cannot clear the screen,
move the cursor, rewrite a line or write the clipboard (OSC 52) of the person reading it.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from typing import Any, Iterator

import typer
from typer.core import TyperGroup

from rlm._text import TERMINAL_UNSAFE, terminal_safe
from rlm.errors import IsolationWarning
from rlm.sandbox import AUTO, SANDBOXES

__all__ = [
    "SANDBOX_HELP", "SANDBOX_METAVAR", "command_app", "echo", "isolation_warning_held", "json_text", "sandbox_line",
    "say", "warn_if_unisolated",
]

SANDBOX_METAVAR = "|".join([AUTO, *SANDBOXES])
SANDBOX_HELP = "Where model code runs. auto: the strongest isolation this machine has (bwrap, else strict)."


# Help as git, pip and llm show it: -h or --help; plain text wrapped to the terminal's width
# (never cut); flags that take no value shown bare; defaults as they are typed.
_HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 200}
_WHOLE = 1_000  # characters: a command's first sentence, never cut


class _Group(TyperGroup):
    """A command group whose list of commands shows each one's first sentence whole, wrapped
    (click cuts it to the width left on the line)."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:  # typer's own click types
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=_WHOLE)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def command_app(**options: Any) -> typer.Typer:
    """A Typer app (the `rlm` command, or a group of its subcommands) with those help conventions."""
    return typer.Typer(
        cls=_Group, rich_markup_mode=None, context_settings=dict(_HELP_SETTINGS), add_completion=False, **options
    )


def echo(text: str, *, err: bool = False) -> None:
    """Print `text` (and a newline) on stdout, or stderr with `err`, as plain text."""
    typer.echo(terminal_safe(text), err=err)


def say(line: str) -> None:
    """One line of progress or error on stderr: "rlm: <line>"."""
    echo(f"rlm: {line}", err=True)


def json_text(value: Any, *, indent: int | None = None) -> str:
    """`value` as JSON, non-ASCII text kept readable, every control character escaped.

    `json.dumps` escapes only C0 controls; C1 controls (U+0080-U+009F, which some terminals
    obey), bidirectional overrides, invisible format characters and lone surrogates
    (`TERMINAL_UNSAFE`) are escaped here too. Outside strings JSON is ASCII, so they can only
    be inside one, where the escape (a surrogate pair past U+FFFF) means the same character.
    """
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return TERMINAL_UNSAFE.sub(lambda found: json.dumps(found.group())[1:-1], text)


@contextlib.contextmanager
def isolation_warning_held() -> Iterator[None]:
    """Hold back the IsolationWarning of a first `sandbox="auto"`: `warn_if_unisolated` says it
    as one line instead of Python's warning format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IsolationWarning)
        yield


def sandbox_line(level: str, asked: str | None) -> str:
    """The status line naming where model code runs: "sandbox: bwrap (auto)"."""
    return f"sandbox: {level}" + (" (auto)" if asked == AUTO else "")


def warn_if_unisolated(asked: str) -> None:
    """Say on stderr, as one line, the warning of a `sandbox="auto"` that found no isolation.

    Said even with --quiet: it is not progress. Call it once the level has been chosen.
    """
    from rlm.sandbox.auto import auto_choice

    if asked == AUTO and not auto_choice().isolated:
        say(f"warning: {auto_choice().warning()}")
