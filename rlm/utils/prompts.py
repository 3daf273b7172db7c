"""The prompts the root model sees. All prompt text lives in this one module.

Three system prompts follow the structure of the RLM paper's appendix (Zhang, Kraska and
Khattab, arXiv 2512.24601), written in our own words:

- "default": for strong models; sub-calls are cheap, use them generously and read everything.
- "cautious": for models that fire off too many tiny sub-calls; batch ~200k characters per call.
- "small": for models with a small context window; print little, delegate reading.

Placeholders in braces are filled by `system_prompt()`; a custom prompt may use them too.
"""

from __future__ import annotations

from typing import Any, Iterable

from rlm.errors import ConfigError

__all__ = ["PROMPTS", "NO_SUB_CALLS_PROMPT", "system_prompt", "first_user_message", "turn_user_message", "context_summary",
           "answer_schema_note", "schema_refusal", "session_note", "SUMMARY_PROMPT", "compaction_note", "tools_note",
           "sub_models_note"]

_INTRO = """\
You answer a question about a context that is too large to read at once. The context is not in \
this conversation: it is loaded into a persistent Python REPL that you drive by writing code. \
The REPL gives you:"""

_TOOL_CONTEXT = (
    "`context`: the full input (its type and size are given below). Look at it through code. When it "
    "is text, `context_bytes` holds the same text as UTF-8 bytes: regular expressions over bytes "
    "(`re.finditer(rb'...', context_bytes)`) search a very large text without copying it."
)
_TOOLS_SUB_CALLS = [
    "`llm_query(prompt: str) -> str`: asks a sub-model and returns its reply. The sub-model can read "
    "about {sub_chars} characters per call, far more than you should print here. Put the text it "
    "must read inside the prompt.",
    "`llm_query_batched(prompts: list[str]) -> list[str]`: many `llm_query` calls at once, run "
    "concurrently; replies come back in the same order. Much faster than a loop of single calls.",
]
_TOOLS_RECURSION = [
    "`rlm_query(query: str, context=None) -> str`: hands a question and a large piece of text to "
    "a sub-RLM, a model with its own REPL like yours that can explore it with code and sub-calls. "
    "Without `context`, the query text itself is what it explores. Slower and dearer than "
    "`llm_query`: use it for pieces too large or too intricate for one sub-call.",
    "`rlm_query_batched(queries: list[str], contexts: list | None = None) -> list[str]`: several "
    "`rlm_query` calls at once; replies in the same order.",
]
_TOOLS_OUTPUT = [
    "`print()`: the only way to see results. Output longer than {max_output} characters is cut in "
    "the middle, so print summaries and slices, not whole documents.",
    "`SHOW_VARS()`: the variables you have made so far.",
]

_HOW_TO_RUN = """\
Variables, functions and imports persist from one code block to the next. To run code, put it \
in a fenced block tagged repl:

```repl
print(type(context), len(context))
print(context[:500])
```

Blocks in one reply run in order. You see their output in the next message."""

_STRATEGY_DEFAULT = """\
How to work:
- First learn the shape of the context: its type, size, how it is divided (lines, records, \
documents, headers). Print small samples.
- Then decide how to split it: by its natural structure where it has one, else into pieces of \
a few hundred thousand characters.
- Sub-calls are cheap and strong: use them a lot. Give each piece to `llm_query` (or all \
pieces at once to `llm_query_batched`) with a precise instruction, keep the replies in \
variables, and combine them, in code or with one more sub-call.
- Make sure you have looked through the whole context, not just a sample, before you answer.
- For exact matches (names, numbers, keys) plain Python (`re`, `str.find`, splitting) is often \
faster and surer than a sub-call; for meaning, classification or summaries use sub-calls.

For example, to collect facts from every part of a long text:

```repl
question = "..."  # the question, written out in full: the sub-model has not seen it
size = 200_000
pieces = [context[i:i + size] for i in range(0, len(context), size)]
notes = llm_query_batched([
    f"List every fact in this text that helps answer: {{question}}\\n\\nTEXT:\\n{{piece}}"
    for piece in pieces
])
for index, note in enumerate(notes):
    print(index, note[:300])
```"""

_STRATEGY_CAUTIOUS = """\
How to work:
- First learn the shape of the context: its type, size and structure. Print small samples.
- Sub-calls cost time and money. Do NOT call `llm_query` on small strings such as a single \
line or record. Batch instead: pack about 200,000 characters into each sub-call, so that a \
context of N characters takes about N / 200,000 calls in total.
- Prefer one `llm_query_batched` over a loop of `llm_query`.
- Use plain Python (`re`, `str.find`, counting, sorting) for anything exact; keep sub-calls for \
reading and judging meaning.
- Make sure the whole context has been covered before you answer.

For example:

```repl
question = "..."  # the question, written out in full: the sub-model has not seen it
size = 200_000
pieces = [context[i:i + size] for i in range(0, len(context), size)]
print(len(pieces), "pieces")
answers = llm_query_batched([
    f"From the text below, extract what answers: {{question}}\\n\\nTEXT:\\n{{piece}}"
    for piece in pieces
])
```"""

_STRATEGY_SMALL = """\
How to work:
- Your own context window is small. Never print more than a couple of thousand characters at a \
time; print lengths, counts and short slices.
- Delegate reading to sub-calls: split the context into pieces of at most {sub_chars} \
characters and send them with `llm_query_batched`.
- Keep intermediate results in variables and print only short summaries of them.
- Combine results in code when you can; if they are long, summarise them with one more \
sub-call rather than printing them."""

_STRATEGY_NO_SUB_CALLS = """\
How to work:
- There is no sub-model in this run: you work with code alone.
- First learn the shape of the context: its type, size and structure. Print small samples.
- Search it with plain Python (`re`, `str.find`, splitting, counting) and print only what you \
need: short matches with a little surrounding text, counts, lengths.
- Keep intermediate results in variables; check your answer against the context before giving it."""

_FINISH = """\
When you are done, give your answer in one of two ways, on a line of its own, outside any code \
block:
- FINAL(your answer here) to answer with text;
- FINAL_VAR(variable_name) to answer with the value of a REPL variable you have made.
You can also call FINAL(value) or FINAL_VAR("name") from inside a repl block.

Work step by step: say briefly what you will do next, then do it in a repl block in the same \
reply. Do not just describe a plan. Do not give a final answer until you have checked it \
against the context."""

def _assemble(strategy: str, sub_calls: bool = True, recursion: bool = False) -> str:
    tools = [
        _TOOL_CONTEXT,
        *(_TOOLS_SUB_CALLS if sub_calls else []),
        *(_TOOLS_RECURSION if recursion else []),
        *_TOOLS_OUTPUT,
    ]
    listing = "\n".join(f"{number}. {tool}" for number, tool in enumerate(tools, start=1))
    return "\n\n".join([_INTRO + "\n\n" + listing, _HOW_TO_RUN, strategy, _FINISH])


_STRATEGIES = {"default": _STRATEGY_DEFAULT, "cautious": _STRATEGY_CAUTIOUS, "small": _STRATEGY_SMALL}
PROMPTS: dict[str, str] = {name: _assemble(strategy) for name, strategy in _STRATEGIES.items()}
# Used instead of any named prompt when sub-calls are off (max_depth=0).
NO_SUB_CALLS_PROMPT = _assemble(_STRATEGY_NO_SUB_CALLS, sub_calls=False)

_MAX_CHUNKS_SHOWN = 100


def system_prompt(
    name_or_text: str = "default",
    *,
    sub_chars: int = 500_000,
    max_output: int = 500_000,
    sub_calls: bool = True,
    recursion: bool = False,
) -> str:
    """The system prompt called `name_or_text` ("default", "cautious", "small"), or a custom text.

    A custom prompt is any string that is not one of those names; its `{sub_chars}` and
    `{max_output}` placeholders are filled, other braces are left alone. With
    `sub_calls=False` a named prompt is replaced by the one for runs without sub-calls; with
    `recursion=True` it also describes `rlm_query` (runs that may start child RLMs).
    """
    if name_or_text in PROMPTS:
        if not sub_calls:
            chosen = NO_SUB_CALLS_PROMPT
        else:
            chosen = _assemble(_STRATEGIES[name_or_text], recursion=True) if recursion else PROMPTS[name_or_text]
        template = chosen.replace("{{", "\0<").replace("}}", "\0>")
    elif not name_or_text or not name_or_text.strip():
        raise ConfigError(f"system_prompt must be one of {sorted(PROMPTS)} or a non-empty prompt text")
    elif len(name_or_text) < 40 and " " not in name_or_text.strip():
        raise ConfigError(f"unknown prompt name {name_or_text!r}; choose one of {sorted(PROMPTS)} or pass full text")
    else:
        template = name_or_text
    filled = template.replace("{sub_chars}", f"{sub_chars:,}").replace("{max_output}", f"{max_output:,}")
    return filled.replace("\0<", "{").replace("\0>", "}")


def context_summary(info: dict) -> str:
    """One paragraph telling the model what `context` is, without any of its content."""
    lengths = info.get("chunk_lengths", [])
    count = info.get("chunk_count", len(lengths))
    shown = ", ".join(f"{n:,}" for n in lengths[:_MAX_CHUNKS_SHOWN])
    more = f", ... and {count - _MAX_CHUNKS_SHOWN:,} more" if count > _MAX_CHUNKS_SHOWN else ""
    noun = "chunk" if count == 1 else "chunks"
    return (
        f"Your context is a {info.get('type', 'value')} with {info.get('total_length', 0):,} total characters, "
        f"in {count:,} {noun} of lengths [{shown}{more}]."
    )


def first_user_message(query: str, info: dict) -> str:
    """The first user turn: what the context is, the question, and a nudge to look first."""
    return (
        f"{context_summary(info)}\n\n"
        f"Question: {query}\n\n"
        "You have not looked at the context yet. Start by exploring it in the REPL; do not give a "
        "final answer in this reply."
    )


def turn_user_message(query: str, observations: str) -> str:
    """A later user turn: what the REPL printed, then the question again."""
    return (
        f"{observations}\n\n"
        f"Reminder of the question: {query}\n\n"
        "Continue with more repl code, or, if you are sure, answer with FINAL(...) or FINAL_VAR(name)."
    )


def answer_schema_note(schema_json: str) -> str:
    """Added to the first user turn when the caller wants a typed answer (`schema=`)."""
    return (
        "The final answer must be JSON matching this JSON schema (FINAL with the JSON text, or "
        f"FINAL_VAR with a dict or list that matches it):\n{schema_json}"
    )


def schema_refusal(problem: str) -> str:
    """Feedback when a final answer does not match the schema: the run goes on."""
    return (
        f"Your final answer was not accepted: it does not match the required JSON schema.\n{problem}\n"
        "Fix it and answer again with FINAL(json) or FINAL_VAR(name)."
    )


def session_note(index: int, variables: bool = True) -> str:
    """Added to the first user turn of a session's later completion (`index` >= 1); `variables`:
    those of the earlier questions are still defined."""
    earlier = "context_0" if index == 1 else f"context_0 ... context_{index - 1}"
    kept = "are still defined" if variables else "are gone (the session was continued without them)"
    return (
        f"This is question {index + 1} of a session. Its context is `context_{index}` (the description above); "
        f"`context` is still the first one, and the earlier contexts are `{earlier}`. Variables from the earlier "
        f"questions {kept}; `history` lists the earlier questions and your answers "
        "(dicts with 'role', 'content' and 'completion')."
    )


SUMMARY_PROMPT = """You are compacting the transcript of a Python REPL session in which an assistant works on a question about a large context. Summarise the transcript below for the assistant, who will continue without it: what has been learned about the context, the variables made and what they hold, which steps worked and which failed, and what remains to do. Keep exact names, numbers and partial results. Write only the summary."""


def compaction_note(turns: str, summary: str) -> str:
    """What stands in for turns the root model summarised (compaction)."""
    return (
        f"(Note: to fit your context window, {turns} of this conversation were replaced by this summary. "
        "Their full text is in the REPL variable `history` (dicts with 'role', 'content' and 'turn').)\n\n"
        f"Summary of {turns}:\n{summary}"
    )


def tools_note(tools: Iterable[Any]) -> str:
    """Added to the system prompt when the caller gives host tools (`RLM_REPL(tools=...)`):
    each function's signature and first docstring line, each value's name. Empty without tools."""
    tools = list(tools)
    if not tools:
        return ""
    lines = ["", "", "The REPL also has these tools of the user's, ready to use:"]
    for tool in tools:
        if tool.is_function:
            lines.append(f"- `{tool.signature()}`" + (f": {tool.description}" if tool.description else ""))
        else:
            lines.append(f"- `{tool.name}`: a read-only value" + (f" ({tool.description})" if tool.description else ""))
    if any(tool.is_function for tool in tools):
        lines.append(
            "A tool runs outside the REPL: pass it JSON values (str, numbers, bool, None, lists, dicts) and it "
            "returns one; if it fails, the call raises ToolError, which you can catch."
        )
    return "\n".join(lines)


def sub_models_note(default: str, others: list[str]) -> str:
    """Added to the first user turn when the user allowed more sub-models (`sub_models=`)."""
    names = ", ".join(repr(name) for name in others)
    return (
        f"llm_query and llm_query_batched use the sub-model {default!r}; pass model=NAME to use another "
        f"one of: {names}."
    )
