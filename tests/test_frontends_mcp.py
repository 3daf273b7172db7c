"""`rlm mcp` run for real (a child process) and driven by the `mcp` SDK's own client, over stdio
and over streamable HTTP on 127.0.0.1, against the fake endpoint's scripted root model
(tests/served.py). Every run uses the default sandbox ("auto").
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import sys
import time
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from helpers import descendants
from rlm.testing import FakeOpenAIServer
from served import Served, child_env, responder, wait_for

KEY = "mcp-test-key"


@pytest.fixture(scope="module")
def endpoint():
    with FakeOpenAIServer(responder=responder) as fake:
        yield fake


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "notes.txt").write_text("a" * 40, encoding="utf-8")
    (tmp_path / "logs").mkdir()
    return tmp_path


@contextlib.asynccontextmanager
async def stdio(endpoint: FakeOpenAIServer, dirs: Path, *args: str) -> AsyncIterator[Client]:
    """A client session with `rlm mcp` started over stdio; its stderr goes to dirs/stderr.txt."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "rlm", "mcp", "--log-dir", str(dirs / "logs"), "--allow-dir", str(dirs / "allowed"), *args],
        env=child_env(RLM_API_URL=endpoint.url), cwd=dirs,
    )
    with open(dirs / "stderr.txt", "w", encoding="utf-8") as errors:
        async with Client(stdio_client(params, errlog=errors)) as client:
            yield client


def structured(result) -> dict:
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def test_a_stdio_session_lists_and_calls_rlm_ask_then_reads_the_run_back(endpoint, dirs: Path) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async def session() -> tuple[dict, dict, dict, set[str]]:
        async with stdio(endpoint, dirs) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            answer = structured(await client.call_tool(
                "rlm_ask", {"query": "[length] How long is it?", "context_text": "x" * 321},
                progress_callback=on_progress))
            runs = structured(await client.call_tool("rlm_runs", {"limit": 5}))
            outline = structured(await client.call_tool("rlm_trajectory", {"run_id": answer["run_id"]}))
        return answer, runs, outline, names

    answer, runs, outline, names = asyncio.run(session())
    assert names == {"rlm_ask", "rlm_runs", "rlm_trajectory"}
    assert answer["answer"] == "321" and answer["status"] == "final" and answer["iterations"] == 2
    assert answer["usage"]["root"]["calls"] == 2 and answer["trajectory_path"].startswith(str(dirs / "logs"))
    messages = [message for _, message in progress]
    assert messages[0].startswith("sandbox: ") and any(m.startswith("turn 2/20") for m in messages)
    assert [value for value, _ in progress] == sorted({value for value, _ in progress})  # increasing
    assert [run["run_id"] for run in runs["runs"]] == [answer["run_id"]]
    assert runs["runs"][0]["query"] == "[length] How long is it?"
    assert outline["answer"] == "321" and outline["turns"][0]["cells"][0]["code"] == "answer = str(len(context))"
    assert "Traceback" not in (dirs / "stderr.txt").read_text(encoding="utf-8")


def test_rlm_ask_reads_a_file_under_an_allowed_directory_and_refuses_others(endpoint, dirs: Path) -> None:
    (dirs / "secret.txt").write_text("not yours", encoding="utf-8")

    async def session() -> list:
        async with stdio(endpoint, dirs, "--max-time", "60") as client:
            calls = [
                {"query": "[length] How long?", "context_path": "allowed/notes.txt"},
                {"query": "[echo] What?", "context_path": str(dirs / "secret.txt")},
                {"query": "[echo] What?", "context_path": "allowed/../secret.txt"},
                {"query": "[echo] What?", "context_text": "c", "max_time": 120},
                {"query": "[echo] What?", "context_text": "c", "context_path": "allowed/notes.txt"},
                {"query": "[echo] What?"},
            ]
            results = [await client.call_tool("rlm_ask", arguments) for arguments in calls]
            results.append(await client.call_tool("rlm_trajectory", {"run_id": "../../etc/passwd"}))
        return results

    found, *refused = asyncio.run(session())
    assert structured(found)["answer"] == "40"
    expected = ["outside the directories this server reads", "outside the directories this server reads",
                "above this server's limit of 60", "either as text (context) or as a file", "either as text",
                "is not a run id"]
    for result, words in zip(refused, expected):
        assert result.is_error and words in result.content[0].text, result.content


@pytest.fixture
def http_server(endpoint: FakeOpenAIServer, dirs: Path):
    served = Served(["mcp", "--http", "0", "--log-dir", str(dirs / "logs")],
                    child_env(RLM_API_URL=endpoint.url, RLM_SERVER_KEY=KEY), dirs, dirs / "http-stderr.txt")
    yield served
    assert served.stop() == 0, served.stderr()
    assert "Traceback" not in served.stderr()


@contextlib.asynccontextmanager
async def http_client(server: Served, key: str | None = KEY) -> AsyncIterator[Client]:
    """A client session with `rlm mcp --http`, sending `key` as the bearer key."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(server.url, http_client=http)) as client:
            yield client


def test_a_streamable_http_session_with_the_key_calls_rlm_ask(http_server: Served) -> None:
    assert http_server.url.startswith("http://127.0.0.1:") and http_server.url.endswith("/mcp")

    async def session() -> dict:
        async with http_client(http_server) as client:
            return structured(await client.call_tool("rlm_ask", {"query": "[echo] What?", "context_text": "hello"}))

    assert asyncio.run(session())["answer"] == "hello"


def test_a_streamable_http_session_without_the_key_is_refused(http_server: Served) -> None:
    async def session() -> None:
        async with http_client(http_server, key=None) as client:
            await client.list_tools()

    with pytest.raises(BaseException) as caught:
        asyncio.run(session())
    assert any(isinstance(error, MCPError) for error in _leaves(caught.value))
    where = urlsplit(http_server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.request("POST", where.path, body=b"{}", headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 401 and answer.getheader("WWW-Authenticate") == "Bearer"
    connection.close()


def _leaves(error: BaseException) -> list[BaseException]:
    """The errors inside nested exception groups (anyio's task groups raise them)."""
    inner = getattr(error, "exceptions", None)
    return [leaf for each in inner for leaf in _leaves(each)] if inner else [error]


def test_a_cancelled_call_stops_its_run_and_frees_the_worker(http_server: Served) -> None:
    async def session() -> float:
        turn = anyio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            if message and message.startswith("turn 1/"):
                turn.set()

        async with http_client(http_server) as client:
            structured(await client.call_tool("rlm_ask", {"query": "[echo] First a run.", "context_text": "c"}))
            before = descendants(http_server.pid)  # a fork server, at levels that fork workers, is there now
            async with anyio.create_task_group() as group:
                async def call() -> None:
                    await client.call_tool("rlm_ask", {"query": "[slow-sub] Wait.", "context_text": "c"},
                                           progress_callback=on_progress)

                group.start_soon(call)
                await turn.wait()
                await anyio.to_thread.run_sync(wait_for, lambda: descendants(http_server.pid) - before)
                await anyio.sleep(0.3)
                worker = descendants(http_server.pid) - before
                left = time.monotonic()
                group.cancel_scope.cancel()
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: not descendants(http_server.pid) & worker))
            return time.monotonic() - left

    assert asyncio.run(session()) < 1.0
