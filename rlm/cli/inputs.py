"""The context a command is given (`--context FILE`, or `-` for stdin), checked before any work.

A file is passed on as a `Path` (the REPL worker maps it; the host keeps no copy), after one
streaming pass that refuses what is not UTF-8 text: a byte sequence UTF-8 does not allow, or a
NUL byte (no text file has one; binary files nearly always do). The message names the byte
offset, as the model would otherwise read replacement characters without knowing why.
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

from rlm.cli.exits import BadInput
from rlm.cli.output import say

__all__ = ["read_context", "read_schema", "check_text_file"]

_PIECE = 16 * 1024 * 1024  # bytes read at a time: memory stays flat for a file of any size
_CONVERT = "convert it first (for example iconv -f LATIN1 -t UTF-8 FILE > FILE.txt), or extract its text"


def read_context(option: str, *, quiet: bool) -> str | Path:
    """A Path for a file (the sandbox reads it, never the host); the text itself for '-' (stdin)."""
    if option != "-":
        path = Path(option)
        check_text_file(path)
        return path
    if sys.stdin is None:
        raise BadInput("--context - needs a standard input; pipe the context in, or pass a file")
    if sys.stdin.isatty() and not quiet:
        say("reading the context from stdin; end it with Ctrl-D")
    raw = sys.stdin.buffer.read()
    problem = _not_text(raw, 0, final=True)
    if problem is not None:
        raise BadInput(f"the context on stdin is not UTF-8 text ({problem}); {_CONVERT}")
    text = raw.decode("utf-8")
    if not text.strip():
        raise BadInput("the context read from stdin is empty; pipe it in, e.g. rlm ask QUERY --context - < file.txt")
    return text


def read_schema(path: Path) -> dict:
    """The JSON schema of `--schema FILE` (checked against what the validator supports when the run starts)."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInput(f"cannot read the schema file {path}: {exc.strerror}; check the path") from None
    except ValueError as exc:
        raise BadInput(f"the schema file {path} is not JSON ({exc}); give a JSON schema object") from None
    if not isinstance(schema, dict):
        raise BadInput(f"the schema file {path} holds a {type(schema).__name__}, not a JSON schema object")
    return schema


def check_text_file(path: Path) -> None:
    """BadInput unless `path` is a readable file of UTF-8 text (see the module's docstring)."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise BadInput(f"the context file {str(path)!r} given with --context {what}; pass a text file, or - for stdin")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as handle:
            while True:
                piece = handle.read(_PIECE)
                problem = _not_text(piece, offset, final=not piece, decoder=decoder)
                if problem is not None:
                    raise BadInput(f"the context file {str(path)!r} is not UTF-8 text ({problem}); {_CONVERT}")
                if not piece:
                    return
                offset += len(piece)
    except OSError as exc:
        raise BadInput(
            f"cannot read the context file {str(path)!r} ({exc.strerror}); check the path and its rights"
        ) from None


def _not_text(
    piece: bytes, offset: int, *, final: bool, decoder: codecs.IncrementalDecoder | None = None
) -> str | None:
    """What makes `piece` (at `offset` in the input) not UTF-8 text, or None."""
    nul = piece.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at byte {offset + nul:,}: it looks like a binary file"
    if piece.isascii() and (decoder is None or not decoder.getstate()[0]):
        return None  # the common case, checked at memory speed
    decoder = decoder or codecs.getincrementaldecoder("utf-8")()
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(piece, final)
    except UnicodeDecodeError as exc:
        return f"byte {offset - pending + exc.start:,} cannot be decoded: {exc.reason}"
    return None
