"""Reading a root-model reply: its ```repl code blocks and its FINAL / FINAL_VAR line.

The rules (also in the README):
- Code runs only from fences whose info string is `repl`; every such block runs, in order.
- A final answer is a line that starts (after indentation) with `FINAL(` or `FINAL_VAR(`,
  outside every code fence. FINAL's answer may span lines (up to the next fence) and contain
  parentheses: it ends at the first `)` that closes every parenthesis opened since `FINAL(`
  and is the last character of its line; failing that, at the first `)` that closes them
  all. A quoted Python string (`FINAL("a) b")`) is taken whole and unquoted. FINAL_VAR names
  one variable.
- A FINAL line inside a fence other than ```repl is not an answer; the model is told.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

__all__ = ["CodeBlock", "FinalLine", "ParsedReply", "parse_reply"]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")
_FINAL_START = re.compile(r"^\s*(FINAL_VAR|FINAL)\(")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE_LANGS = {"python", "py", "python3", "ipython", "code", ""}


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its info string (lower-cased) and its code."""

    lang: str
    code: str


@dataclass(frozen=True)
class FinalLine:
    """A FINAL / FINAL_VAR found in the reply text: `answer` for FINAL, `variable` for FINAL_VAR."""

    kind: str
    answer: str | None = None
    variable: str | None = None


@dataclass
class ParsedReply:
    """What a reply asks for: code to run, an answer to give, and problems to tell the model."""

    repl_blocks: list[str] = field(default_factory=list)
    final: FinalLine | None = None
    problems: list[str] = field(default_factory=list)


def parse_reply(text: str | None) -> ParsedReply:
    """Split a reply into runnable ```repl blocks, a final answer, and problems to report."""
    parsed = ParsedReply()
    segments = _segments(text or "")
    for segment in segments:
        if isinstance(segment, CodeBlock):
            _take_block(segment, parsed)
    parsed.final, problem = _find_final(segments)
    if problem:
        parsed.problems.append(problem)
    return parsed


def _take_block(block: CodeBlock, parsed: ParsedReply) -> None:
    if block.lang == "repl":
        if block.code.strip():
            parsed.repl_blocks.append(block.code)
        return
    if any(_FINAL_START.match(line) for line in block.code.splitlines()):
        parsed.problems.append(
            f"Your FINAL(...) / FINAL_VAR(...) was inside a ```{block.lang or ''} code block, so it was not "
            "taken as your answer. Write it on its own line outside any code block, or call it from a ```repl block."
        )
    elif block.lang in _CODE_LANGS:
        fence = f"```{block.lang} block" if block.lang else "code block fenced with a bare ```"
        parsed.problems.append(f"A {fence} was not run: only blocks fenced as ```repl are executed.")


def _segments(text: str) -> list[str | CodeBlock]:
    """The reply as alternating prose (str, one per line) and CodeBlock items."""
    segments: list[str | CodeBlock] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            segments.append(lines[index])
            index += 1
            continue
        fence, lang = opening.group(1), opening.group(2).lower()
        body: list[str] = []
        index += 1
        while index < len(lines):  # an unclosed fence runs to the end of the reply
            stripped = lines[index].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                index += 1
                break
            body.append(lines[index])
            index += 1
        segments.append(CodeBlock(lang=lang, code="\n".join(body)))
    return segments


def _find_final(segments: list[str | CodeBlock]) -> tuple[FinalLine | None, str | None]:
    for position, segment in enumerate(segments):
        if isinstance(segment, CodeBlock):
            continue
        match = _FINAL_START.match(segment)
        if not match:
            continue
        rest = [segment[match.end() :]]
        if match.group(1) == "FINAL_VAR":
            return _final_var(rest[0])
        for following in segments[position + 1 :]:
            if isinstance(following, CodeBlock):
                break
            rest.append(following)
        return _final("\n".join(rest))
    return None, None


def _final(rest: str) -> tuple[FinalLine | None, str | None]:
    end = _string_literal_end(rest)
    if end is None:
        end = _closing_paren(rest)
    if end is None:
        return None, "Your FINAL( has no closing parenthesis; write the whole answer as FINAL(answer)."
    answer = _unquote(rest[:end].strip())
    if not answer.strip():
        return None, "Your FINAL() was empty. Put the answer inside the parentheses: FINAL(your answer)."
    return FinalLine(kind="FINAL", answer=answer), None


def _string_literal_end(rest: str) -> int | None:
    """Where `)` follows a quoted Python string that opens the argument, as in FINAL("a)b")."""
    if rest.lstrip()[:1] not in ("'", '"'):
        return None
    for seen, match in enumerate(re.finditer(r"\)", rest)):
        if seen >= 64:
            break
        try:
            value = ast.literal_eval(rest[: match.start()].strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str):
            return match.start()
    return None


def _closing_paren(rest: str) -> int | None:
    """The `)` that ends FINAL's argument.

    The first `)` that closes every parenthesis opened since `FINAL(` and ends its line; if no
    such `)` ends a line, the first one that closes them all (text after it is prose).
    """
    depth = 1
    first_close = None
    for position, char in enumerate(rest):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth > 0:
                continue
            if first_close is None:
                first_close = position
            line_end = rest.find("\n", position)
            if not rest[position + 1 : None if line_end < 0 else line_end].strip():
                return position
    return first_close


def _final_var(rest: str) -> tuple[FinalLine | None, str | None]:
    close = rest.rfind(")")
    if close < 0:
        return None, "Your FINAL_VAR( has no closing parenthesis; write FINAL_VAR(variable_name)."
    name = rest[:close].strip().strip("'\"").strip()
    if not _IDENTIFIER.match(name):
        return None, (
            f"FINAL_VAR takes the name of one REPL variable, e.g. FINAL_VAR(answer); {name!r} is not a "
            "variable name. To answer with text, use FINAL(your answer)."
        )
    return FinalLine(kind="FINAL_VAR", variable=name), None


def _unquote(answer: str) -> str:
    if len(answer) >= 2 and answer[0] in "'\"" and answer[-1] == answer[0]:
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, str):
            return value
    return answer
