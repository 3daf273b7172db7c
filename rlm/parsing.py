"""Reading a root-model reply: its ```repl code blocks and its FINAL / FINAL_VAR line.

The rules (also in the README):
- Code runs only from fences whose info string is `repl`; every such block runs, in order.
- A final answer is a line that starts (after indentation) with `FINAL(` or `FINAL_VAR(`,
  outside every code fence. When the `)` closing `FINAL(` is the last `)` of its line, the
  answer ends there (prose after it is not part of the answer); otherwise it runs to the last
  `)` before the next fence or the end of the reply, so it may span lines and contain
  parentheses. A quoted Python string literal is unquoted. FINAL_VAR names one variable.
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
    closed: bool


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
    other_code_blocks: int = 0


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
        parsed.other_code_blocks += 1
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
        closed = False
        while index < len(lines):
            stripped = lines[index].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                closed = True
                index += 1
                break
            body.append(lines[index])
            index += 1
        segments.append(CodeBlock(lang=lang, code="\n".join(body), closed=closed))
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
        if _closes_on_its_line(rest[0]):
            return _final(match.group(1), rest[0])
        for following in segments[position + 1 :]:
            if isinstance(following, CodeBlock):
                break
            rest.append(following)
        return _final(match.group(1), "\n".join(rest))
    return None, None


def _closes_on_its_line(rest: str) -> bool:
    """True when the `(` of `FINAL(` is closed by the last `)` of its own line."""
    depth = 1
    for position, char in enumerate(rest):
        depth += 1 if char == "(" else -1 if char == ")" else 0
        if depth == 0:
            return ")" not in rest[position + 1 :]
    return False


def _final(kind: str, rest: str) -> tuple[FinalLine | None, str | None]:
    close = rest.rfind(")")
    if close < 0:
        return None, f"Your {kind}( has no closing parenthesis; write the whole answer as {kind}(answer)."
    answer = _unquote(rest[:close].strip())
    if not answer.strip():
        return None, "Your FINAL() was empty. Put the answer inside the parentheses: FINAL(your answer)."
    return FinalLine(kind="FINAL", answer=answer), None


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
