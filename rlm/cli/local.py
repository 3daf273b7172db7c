"""`rlm serve` and `rlm demo` (the local model, extra `local`), and `--model local` for other commands.

`--model local` starts llama.cpp's server with the bundled SmolLM2-135M weights on a free
loopback port for the length of one command, and stops it after.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer

from rlm.cli.exits import BadInput, Failure, failure_for
from rlm.cli.output import echo, isolation_warning_held, json_text, say, warn_if_unisolated
from rlm.cli.progress import Progress
from rlm.local import REPLY_TOKENS
from rlm.sandbox import AUTO

__all__ = ["register", "local_endpoint", "serve", "demo"]

LOCAL = "local"
_HONEST_NOTE = (
    "A 135M-parameter model shows that the machinery works end to end (a real llama.cpp server, "
    "the REPL, usage and trajectory); it is far too small to do RLM tasks, so expect no right answer. "
    "For real answers point rlm at a capable model: rlm demo --api-url URL --model NAME, or "
    "RLM_API_URL=URL rlm ask ... (any OpenAI-compatible server)."
)


def register(app: typer.Typer) -> None:
    """Add `serve` and `demo` to the `rlm` app."""
    app.command()(serve)
    app.command()(demo)


@contextlib.contextmanager
def local_endpoint(
    model: str, sub_model: str, api_url: str | None, *, quiet: bool, gguf: Path | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """(model, sub_model, api_url) to use: unchanged, or for `--model local` a local server's
    URL with "auto" models, the server running until the block ends."""
    if model != LOCAL:
        yield model, sub_model, api_url
        return
    if api_url:
        raise BadInput("--model local runs its own server on this machine; leave out --api-url")
    if sub_model not in ("auto", LOCAL):
        raise BadInput("--model local serves the sub-calls too; leave out --sub-model (or pass --sub-model local)")
    from rlm.local import LocalModelError, LocalServer, ServerSettings

    try:
        settings = ServerSettings(port=0, gguf=str(gguf) if gguf else None).resolved()
        if not quiet:
            say(f"starting the local model {settings.alias} (llama.cpp, CPU)")
        with LocalServer(settings) as server:
            if not quiet:
                say(f"local model ready at {server.url} in {server.start_seconds:.1f} s")
            yield "auto", "auto", server.url
    except LocalModelError as exc:
        raise BadInput(str(exc)) from None


def serve(
    gguf: Annotated[
        Path | None, typer.Option(metavar="PATH", help="A GGUF model file (default: the bundled SmolLM2-135M).")
    ] = None,
    port: Annotated[
        int, typer.Option(min=0, max=65535, metavar="N", help="Port to listen on (0: any free port).")
    ] = 8080,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address to listen on; keep the loopback unless you mean to share.")
    ] = "127.0.0.1",
    ctx: Annotated[
        int, typer.Option(min=256, metavar="TOKENS", help="Context window in tokens, shared by the parallel slots.")
    ] = 8192,
    parallel: Annotated[int, typer.Option(min=1, metavar="N", help="Requests decoded at once.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, metavar="N", help="CPU threads (default: all cores).")] = None,
    max_reply_tokens: Annotated[
        int, typer.Option(min=1, metavar="N", help="Cap on a reply when the request sets none (the same as "
                          "--model local's).")
    ] = REPLY_TOKENS,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show llama.cpp's own log on stderr.")] = False,
) -> None:
    """Serve a local model (llama.cpp) at http://HOST:PORT/v1 until Ctrl-C; prints the URL on stdout."""
    from rlm.local import LocalServerError, ServerSettings, serve_forever
    from rlm.utils.endpoint import is_loopback

    started = time.perf_counter()

    def ready(url: str) -> None:
        typer.echo(url)
        say(f"serving {settings.alias} at {url} (ready in {time.perf_counter() - started:.1f} s); Ctrl-C to stop")
        if not is_loopback(host):
            say(f"warning: {host} is reachable from other machines, and the server asks for no API key")

    try:
        settings = ServerSettings(
            gguf=str(gguf) if gguf else None, host=host, port=port, n_ctx=ctx, parallel=parallel,
            threads=threads, max_reply_tokens=max_reply_tokens, verbose=verbose,
        ).resolved()
        serve_forever(settings, ready)
    except LocalServerError as exc:
        _fail(failure_for(exc))
    except Exception as exc:  # one line and an exit code, never a traceback
        _fail(_local_failure(exc))
    say("stopped")


def demo(
    gguf: Annotated[
        Path | None, typer.Option(metavar="PATH", help="A GGUF model file (default: the bundled SmolLM2-135M).")
    ] = None,
    api_url: Annotated[
        str | None, typer.Option(metavar="URL", help="Use this OpenAI-compatible endpoint instead of the local model.")
    ] = None,
    model: Annotated[str, typer.Option(metavar="NAME", help="Model at --api-url (default: its first model).")] = "auto",
    tokens: Annotated[str, typer.Option(metavar="SIZE", help="Haystack size in tokens (e.g. 1k, 8k).")] = "1k",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the generated haystack.")] = 0,
    max_iterations: Annotated[int, typer.Option(min=1, metavar="N", help="Root turns before giving up.")] = 3,
    max_reply_tokens: Annotated[int, typer.Option(min=1, metavar="N", help="Cap on each model reply.")] = 192,
    log_dir: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Where the trajectory goes (default: $RLM_LOG_DIR, else the "
                                  "runs directory of rlm runs and rlm view).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Run the whole RLM loop on a generated haystack and question, offline on the local model."""
    from rlm.bench.sniah import generate
    from rlm.bench.tasks import parse_length

    try:
        task = generate(parse_length(tokens), seed, 0)
    except Exception as exc:  # a bad --tokens value
        _fail(failure_for(exc))
    if not quiet:
        say(f"demo: a {len(task.context):,}-character haystack with one needle; question: {task.question}")
    from rlm.trajectory import cli_log_dir

    options = {
        "max_iterations": max_iterations, "max_reply_tokens": max_reply_tokens, "log_dir": str(cli_log_dir(log_dir)),
    }
    report, failure = _demo_run(task, gguf, api_url, model, options, quiet=quiet)
    if json_output:
        typer.echo(json_text({**report, "error": failure.message if failure else None}))
    elif report.get("turns"):
        _print_report(report)
    if failure is not None:
        _fail(failure)


def _demo_run(
    task: Any, gguf: Path | None, api_url: str | None, model: str, options: dict[str, Any], *, quiet: bool
) -> tuple[dict[str, Any], Failure | None]:
    from rlm.rlm_repl import RLM_REPL

    progress = Progress.for_stderr(options["max_iterations"], quiet=quiet)
    report: dict[str, Any] = {"question": task.question, "expected": task.answer}
    try:
        with _demo_endpoint(api_url, model, gguf, quiet=quiet, report=report) as (model, url):
            # The "small" prompt is the one for small-window models such as the bundled one.
            prompt = "default" if api_url else "small"
            with isolation_warning_held():
                engine = RLM_REPL(model, model, api_url=url, exec_timeout=30, on_event=progress, system_prompt=prompt,
                                  **options)
            warn_if_unisolated(AUTO)  # RLM_REPL's default
            with engine:
                with progress:
                    answer = engine.completion(context=task.context, query=task.question)
                report.update(_outcome(engine, answer, task.answer))
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code, never a traceback
        return report, _local_failure(exc, api_url)
    return report, None


@contextlib.contextmanager
def _demo_endpoint(
    api_url: str | None, model: str, gguf: Path | None, *, quiet: bool, report: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    if api_url:
        yield model, api_url
        return
    with local_endpoint(LOCAL, "auto", None, quiet=quiet, gguf=gguf) as (model, _, url):
        report["server"] = {"url": url}
        yield model, url


def _outcome(engine: Any, answer: str | None, expected: str) -> dict[str, Any]:
    usage = engine.cost_summary()
    ends = [event for event in engine.trace if event.type == "run_end"]
    return {
        "answer": answer,
        "correct": answer is not None and expected in answer,
        "model": engine.client.model,
        "turns": ends[-1].turns if ends else 0,
        "duration": ends[-1].duration if ends else None,
        "root_calls": usage["root"]["calls"],
        "sub_calls": usage["sub"]["calls"],
        "input_tokens": usage["total_input_tokens"],
        "cached_tokens": usage["root"]["cached_tokens"] + usage["sub"]["cached_tokens"],
        "output_tokens": usage["total_output_tokens"],
        "cost": usage["total_cost"],
        "trajectory": str(engine.tracer.path) if engine.tracer.path else None,
        "note": _HONEST_NOTE,
    }


def _print_report(report: dict[str, Any]) -> None:
    answer = report["answer"]
    if answer is None:
        answer = f"(no final answer within {report['turns']} turns)"
    lines = [
        f"question:   {report['question']}",
        f"expected:   {report['expected']}",
        f"answer:     {answer}",
        f"correct:    {'yes' if report['correct'] else 'no'}",
        f"model:      {report['model']}",
        f"work:       {report['turns']} turn(s), {report['root_calls']} root call(s), {report['sub_calls']} sub-call(s), "
        f"{report['input_tokens']:,} input tokens ({report['cached_tokens']:,} from the prompt cache), "
        f"{report['output_tokens']:,} output tokens, {report['duration']:.1f} s",
        f"trajectory: {report['trajectory']}",
        "",
        report["note"],
    ]
    echo("\n".join(lines))


def _local_failure(exc: BaseException, api_url: str | None = None) -> Failure:
    from rlm.local import LocalModelError

    if isinstance(exc, LocalModelError):
        exc = BadInput(str(exc))
    return failure_for(exc, api_url=api_url)


def _fail(failure: Failure) -> None:
    say(failure.message)
    raise typer.Exit(int(failure.code))

