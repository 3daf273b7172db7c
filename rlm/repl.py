"""The REPL environment: one persistent session per `completion()`, and the host side of it.

`REPLEnv` owns a sandbox (where the model's code runs) and answers the `llm_query` /
`llm_query_batched` calls that code makes, with the sub-model, concurrently for batches,
recording the usage of each call as it comes back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from rlm._text import clean_text
from rlm.errors import ClientError, ConfigError, ContextError
from rlm.sandbox import ContextSource, ExecResult, LLMBridge, Sandbox, SubCallFailed, create_sandbox
from rlm.usage import CallRecord, UsageLedger, price_call
from rlm.utils.llm import Completion, LLMClient
from rlm.utils.tracing import CodeExec, SubCall, Tracer

__all__ = ["REPLEnv", "SandboxFactory", "context_source"]

SandboxFactory = Callable[[LLMBridge], Sandbox]


def context_source(context: Any) -> ContextSource:
    """Check a user's context value and say how the sandbox should load it.

    Accepted: a `str`; a list of strings (chunks); a dict or list of JSON-able values; a
    `pathlib.Path` to a UTF-8 text file (read by the sandbox, never by the host).
    """
    if isinstance(context, Path):
        if not context.is_file():
            raise ContextError(f"context file {str(context)!r} does not exist or is not a file")
        return ContextSource(path=context.resolve(), fmt="text")
    if isinstance(context, str):
        return ContextSource(value=context)
    if isinstance(context, (list, tuple, dict)):
        if isinstance(context, (list, tuple)) and all(isinstance(item, str) for item in context):
            return ContextSource(value=list(context))
        try:
            json.dumps(context)
        except (TypeError, ValueError) as exc:
            raise ContextError(
                f"context must be JSON-serialisable when it is a {type(context).__name__}: {exc}"
            ) from None
        return ContextSource(value=context)
    raise ContextError(
        f"context of type {type(context).__name__} is not supported; pass a str, a list of str, "
        "a dict / list of JSON values, or a pathlib.Path to a text file"
    )


class REPLEnv:
    """One REPL session: runs cells in a sandbox and serves their sub-model calls."""

    def __init__(
        self,
        *,
        sub_client: LLMClient,
        ledger: UsageLedger,
        tracer: Tracer,
        run_id: str,
        sandbox: str | SandboxFactory = "subprocess",
        depth: int = 0,
        max_concurrency: int = 16,
        exec_timeout: float = 120.0,
        max_output_length: int = 500_000,
        sub_calls: bool = True,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")
        self.sub_client = sub_client
        self.ledger = ledger
        self.tracer = tracer
        self.run_id = run_id
        self.depth = depth
        self.exec_timeout = exec_timeout
        self.max_output_length = max_output_length
        self.turn = 0
        self.sub_calls = sub_calls
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="rlm-subcall")
        self._cells = 0
        self.sandbox = create_sandbox(sandbox, self._bridge) if isinstance(sandbox, str) else sandbox(self._bridge)

    def load_context(self, context: Any) -> dict:
        """Load the context (a user value, or a checked ContextSource) into the session.

        Returns its type and lengths.
        """
        source = context if isinstance(context, ContextSource) else context_source(context)
        return self.sandbox.load_context(source)

    def run(self, code: str) -> ExecResult:
        """Run one cell of model code and record it in the trace."""
        self._cells += 1
        result = self.sandbox.run(code, timeout=self.exec_timeout, max_output=self.max_output_length)
        self.tracer.emit(
            CodeExec(
                run_id=self.run_id,
                depth=self.depth,
                turn=self.turn,
                index=self._cells,
                code=code,
                stdout=result.stdout,
                stderr=result.stderr,
                error=result.error,
                timed_out=result.timed_out,
                restarted=result.restarted,
                duration=result.duration,
            )
        )
        return result

    def get_variable(self, name: str) -> dict:
        return self.sandbox.get_variable(name)

    def close(self) -> None:
        self.sandbox.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "REPLEnv":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the host side of llm_query -------------------------------------------------------

    def _bridge(self, kind: str, prompts: list[str]) -> list[str]:
        if not self.sub_calls:
            raise SubCallFailed("sub-calls are off in this run (max_depth=0): work with code alone")
        if kind == "llm_query":
            return [self._sub_call(prompts[0], None)]
        futures = [self._pool.submit(self._sub_call_quiet, prompt, index) for index, prompt in enumerate(prompts)]
        outcomes = [future.result() for future in futures]
        failures = [(index, error) for index, (_, error) in enumerate(outcomes) if error is not None]
        if failures:
            first_index, first_error = failures[0]
            raise SubCallFailed(
                f"{len(failures)} of {len(prompts)} batched sub-calls failed; prompt {first_index}: {first_error}"
            )
        return [reply for reply, _ in outcomes]

    def _sub_call_quiet(self, prompt: str, index: int) -> tuple[str, str | None]:
        try:
            return self._sub_call(prompt, index), None
        except SubCallFailed as exc:
            return "", str(exc)

    def _sub_call(self, prompt: str, batch_index: int | None) -> str:
        client = self.sub_client
        started = time.perf_counter()
        try:
            completion = client.complete([{"role": "user", "content": clean_text(prompt)}])
        except ClientError as exc:
            self._trace_sub(prompt, "", None, None, time.perf_counter() - started, batch_index, str(exc))
            if exc.is_request_error:
                raise SubCallFailed(f"the sub-model rejected the request: {exc}") from None
            raise
        cost = price_call(client.model, client.base_url, completion.usage)
        self.ledger.add(CallRecord("sub", self.depth + 1, client.model, completion.usage, cost))
        self._trace_sub(prompt, completion.text, completion, cost, completion.latency, batch_index, None)
        return completion.text

    def _trace_sub(
        self,
        prompt: str,
        reply: str,
        completion: Completion | None,
        cost: float | None,
        latency: float,
        batch_index: int | None,
        error: str | None,
    ) -> None:
        usage = dataclasses.asdict(completion.usage) if completion is not None else {}
        self.tracer.emit(
            SubCall(
                run_id=self.run_id,
                depth=self.depth + 1,
                turn=self.turn,
                model=self.sub_client.model,
                prompt=prompt,
                reply=reply,
                usage=usage,
                cost=cost,
                latency=latency,
                batch_index=batch_index,
                error=error,
            )
        )
