"""The model client against hostile servers on 127.0.0.1 (rlm.testing.HostileServer).

Each fault of `FAULTS`, met with the client's default retries, must end within 2x the
request timeout, with host memory growth under 64 MiB and an error of our own types saying
what was wrong (or the right answer). Memory is measured where it can be told apart: each
case's client runs in a throwaway process whose peak RSS (VmHWM, reset once everything is
imported) is read around the call.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlm.errors import BudgetExceeded, ClientError, EndpointUnreachable, MalformedResponse, ResponseLimitExceeded, SandboxUnavailable
from rlm.rlm_repl import RLM_REPL
from rlm.sandbox import SANDBOXES, check_available
from rlm.testing import FAULTS, Fault, HostileServer, ScriptedModel, chat_body, redirect
from rlm.usage import Usage, price_call
from rlm.utils.limits import ResponseLimits
from rlm.utils.llm import OpenAICompatibleClient

MESSAGES = [{"role": "user", "content": "What is 6 x 7?"}]
TIMEOUT = 1.0
MIB = 1024 * 1024
FENCE = "```"

# fault -> (error type name, text the message must hold), or (None, the reply's text)
OUTCOMES = {
    "gzip_bomb": ("ResponseLimitExceeded", "ResponseLimits.max_compression_ratio"),
    "deflate_bomb": ("ResponseLimitExceeded", "ResponseLimits.max_compression_ratio"),
    "huge_body": ("ResponseLimitExceeded", "ResponseLimits.max_body_bytes"),
    "huge_announced_body": ("ResponseLimitExceeded", "ResponseLimits.max_body_bytes"),
    "huge_content": ("ResponseLimitExceeded", "ResponseLimits.max_body_bytes"),
    "header_flood": ("ResponseLimitExceeded", "ResponseLimits.max_header_bytes"),
    "unknown_encoding": ("ResponseLimitExceeded", "'br' encoding"),
    "trickled_body": ("ResponseLimitExceeded", "did not finish sending its answer within the request timeout"),
    "trickled_head": ("EndpointUnreachable", "did not answer in time"),
    "silent": ("EndpointUnreachable", "did not answer in time"),
    "retry_after_huge": ("ClientError", "HTTP 503"),
    "not_json": ("MalformedResponse", "not JSON"),
    "html": ("MalformedResponse", "HTML page"),
    "sse": ("MalformedResponse", "server-sent event stream, though the request did not ask to stream"),
    "deep_json": ("MalformedResponse", "nested too deeply"),
    "empty_choices": ("MalformedResponse", "empty choices list"),
    "content_number": ("MalformedResponse", "content is a number"),
    "content_object": ("MalformedResponse", "content is an object"),
    "content_null": (None, ""),
    "content_parts": (None, "forty-two"),
    **{name: (None, "fine") for name in FAULTS if name.startswith("usage_")},
}

_MEASURE = textwrap.dedent("""
    import json, sys, time
    from rlm.utils.llm import OpenAICompatibleClient

    def status():
        with open("/proc/self/status") as file:
            fields = dict(line.split(":", 1) for line in file)
        return {key: int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS")}

    base, timeout, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    messages = [{"role": "user", "content": "hi"}]
    def client(name, timeout=timeout):  # the default retries, as a user meets them
        return OpenAICompatibleClient("m", api_url=f"{base}/{name}/v1", timeout=timeout)
    client("content_parts", 60).complete(messages)  # everything a call imports is loaded before measuring
    print("ready", flush=True)
    sys.stdin.readline()  # measured when told to, once every case is loaded
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # the peak RSS starts again from the current RSS
    before = status()["VmRSS"]
    started = time.monotonic()
    try:
        text, error = client(name).complete(messages).text, None
    except Exception as exc:
        text, error = "", exc
    print(json.dumps({
        "name": name, "seconds": time.monotonic() - started, "growth_kib": status()["VmHWM"] - before,
        "type": type(error).__name__ if error else None, "message": str(error) if error else text,
    }), flush=True)
""")


def by_path(request) -> Fault:
    """The fault named by the first path segment: /gzip_bomb/v1/chat/completions."""
    return FAULTS[request.path.split("/")[1]]


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured through Linux's /proc/self/clear_refs")
    cases = {}
    with HostileServer(by_path) as server:
        base = server.url.removesuffix("/v1")
        # A fresh process per case: memory freed by an earlier case would hide growth. They are
        # loaded side by side, then measured one at a time: a case's time is its own, not that
        # of a machine busy with the others.
        running = [
            subprocess.Popen([sys.executable, "-c", _MEASURE, base, str(TIMEOUT), name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in FAULTS
        ]
        try:
            for process in running:
                assert process.stdout.readline() == "ready\n", process.communicate(timeout=60)[1]
            for process in running:
                out, err = process.communicate("go\n", timeout=60)
                assert process.returncode == 0, err
                case = json.loads(out)
                cases[case["name"]] = case
        finally:
            for process in running:
                if process.poll() is None:  # left waiting by a failure above
                    process.kill()
                    process.communicate()
    return cases


def test_every_fault_has_its_outcome_stated():
    assert sorted(OUTCOMES) == sorted(FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_hostile_answer_costs_little_memory_and_time_and_says_what_was_wrong(measured, fault):
    case = measured[fault]
    kind, text = OUTCOMES[fault]
    assert case["type"] == kind, case["message"]
    assert text in case["message"]
    if kind is not None:
        assert "127.0.0.1:" in case["message"]  # the server is named
    assert case["growth_kib"] < 64 * 1024, f"{fault}: peak RSS grew {case['growth_kib'] / 1024:.0f} MiB"
    assert case["seconds"] <= 2 * TIMEOUT, f"{fault}: {case['seconds']:.2f} s"


def client_for(server: HostileServer, **options) -> OpenAICompatibleClient:
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("max_retries", 0)
    return OpenAICompatibleClient("m", api_url=server.url, **options)


# -- what the body says ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [name for name, (kind, _) in OUTCOMES.items() if kind == "MalformedResponse"])
def test_an_unusable_answer_is_one_error_naming_the_server_and_the_fault(fault):
    text = OUTCOMES[fault][1]
    with HostileServer(fault) as server:
        with pytest.raises(MalformedResponse) as caught:
            client_for(server).complete(MESSAGES)
    assert not isinstance(caught.value, ResponseLimitExceeded)
    assert text in str(caught.value)
    assert server.url in str(caught.value)


def test_content_as_a_list_of_text_parts_yields_its_text():
    with HostileServer("content_parts") as server:
        completion = client_for(server).complete(MESSAGES)
    assert (completion.text, completion.content_missing) == ("forty-two", False)


@pytest.mark.parametrize("fault", ["usage_negative", "usage_absurd", "usage_float", "usage_boolean", "usage_text"])
def test_usage_that_cannot_be_true_is_estimated_and_flagged(fault):
    with HostileServer(fault) as server:
        usage = client_for(server).complete(MESSAGES).usage
    assert usage.estimated
    assert 0 < usage.input_tokens < 100 and 0 <= usage.output_tokens < 100


def test_a_price_table_failure_makes_the_cost_unknown_not_an_error():
    # genai-prices refuses negative counts with ValueError; the clients never report one, but a
    # failure of the table must not end a run.
    assert price_call("gpt-4o-mini", "https://api.openai.com/v1", Usage(input_tokens=-5)) is None


# -- time: retries and Retry-After ----------------------------------------------------------------


def test_an_unreasonable_retry_after_is_not_waited_for():
    with HostileServer("retry_after_huge") as server:
        started = time.monotonic()
        with pytest.raises(ClientError, match="HTTP 503"):
            client_for(server, max_retries=1).complete(MESSAGES)
    assert time.monotonic() - started < 2 * TIMEOUT
    assert len(server.requests) == 2


def test_headers_past_the_cap_are_refused():
    fault = Fault(headers=tuple((f"X-Many-{i}", "z" * 100) for i in range(100)), body=lambda: (chat_body(),))
    with HostileServer(fault) as server:
        with pytest.raises(ResponseLimitExceeded, match="ResponseLimits.max_header_bytes") as caught:
            client_for(server, limits=ResponseLimits(max_header_bytes=4096)).complete(MESSAGES)
    assert caught.value.limit == "max_header_bytes"


def test_a_retry_after_past_the_cap_is_not_waited_for():
    fault = Fault(status=429, headers=(("Retry-After", "20"),), body=lambda: (b"slow down",))
    with HostileServer(fault) as server:
        started = time.monotonic()
        with pytest.raises(ClientError, match="HTTP 429"):
            client_for(server, max_retries=1, limits=ResponseLimits(max_retry_wait=1.0)).complete(MESSAGES)
    assert time.monotonic() - started < 2 * TIMEOUT


# -- redirects -------------------------------------------------------------------------------------


def test_a_redirect_to_another_origin_is_refused_and_nothing_is_sent_there():
    with HostileServer(lambda request: Fault(body=lambda: (chat_body("elsewhere"),))) as elsewhere:
        with HostileServer(redirect(elsewhere.url + "/chat/completions")) as server:
            with pytest.raises(ClientError, match="another origin") as caught:
                client_for(server).complete(MESSAGES)
    assert elsewhere.requests == []
    assert caught.value.status == 307
    assert "RLM_API_URL" in str(caught.value)


def test_a_redirect_to_another_scheme_on_the_same_host_and_port_is_refused():
    served: dict[str, str] = {}

    def answer(request) -> Fault:
        return redirect(served["url"].replace("http://", "https://", 1) + "/chat/completions")

    with HostileServer(answer) as server:
        served["url"] = server.url
        with pytest.raises(ClientError, match="another origin"):
            client_for(server).complete(MESSAGES)
    assert len(server.requests) == 1


def test_a_redirect_within_the_origin_is_followed_with_the_same_request():
    def answer(request) -> Fault:
        if request.path == "/v1/chat/completions":
            return redirect("/v1/moved/chat/completions", status=308)
        return Fault(body=lambda: (chat_body("moved"),))

    with HostileServer(answer) as server:
        assert client_for(server).complete(MESSAGES).text == "moved"
    first, second = server.requests
    assert second.method == "POST" and second.body == first.body


def test_a_redirect_that_would_drop_the_request_body_is_refused():
    with HostileServer(redirect("/v1/elsewhere", status=302)) as server:
        with pytest.raises(ClientError, match="drop the request body"):
            client_for(server).complete(MESSAGES)


# -- TLS -------------------------------------------------------------------------------------------


def untrusted_tls() -> ssl.SSLContext:
    """A server context with the test certificate, which no client trusts by default."""
    tls = Path(__file__).parent / "data" / "tls"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    return context


def test_an_untrusted_certificate_is_reported_as_such_not_as_unreachable():
    with HostileServer("content_parts", tls=untrusted_tls()) as server:
        with pytest.raises(ClientError) as caught:
            client_for(server, max_retries=2).complete(MESSAGES)
    assert not isinstance(caught.value, EndpointUnreachable)
    assert "TLS certificate" in str(caught.value) and "SSL_CERT_FILE" in str(caught.value)


# -- in a run: a failing sub-call fails that call; a failing root call ends the run cleanly ------


def available_levels() -> list[str]:
    levels = []
    for name in sorted(SANDBOXES):
        try:
            check_available(name)
        except SandboxUnavailable:
            continue
        levels.append(name)
    return levels


def peak_growth_kib(work) -> tuple[object, int]:
    """`work()`'s result and how far this process's peak RSS rose above its RSS before it."""
    def field(name: str) -> int:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) for line in file if line.startswith(name + ":"))

    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = field("VmRSS")
    result = work()
    return result, field("VmHWM") - before


@pytest.mark.parametrize("level", available_levels())
def test_at_every_level_a_sub_call_past_a_cap_fails_that_call_and_a_silent_server_ends_the_run_in_time(level):
    faults = {"a": "huge_content", "b": "empty_choices", "n": "content_null", "s": "silent"}

    def answer(request) -> Fault:  # by the prompt: a retry meets the same fault
        name = faults.get(json.loads(request.body)["messages"][-1]["content"])
        return FAULTS[name] if name else Fault(body=lambda: (chat_body("fine"),))

    code = "\n".join([
        "caught = []",
        "for prompt in ('a', 'b', 'n'):",
        "    try:",
        "        llm_query(prompt)",
        "    except Exception as exc:",
        "        caught.append(type(exc).__name__)",
        "print(llm_query('c') + ' after ' + str(len(caught)))",
        "FINAL(llm_query('s'))",
    ])
    root = ScriptedModel([f"{FENCE}repl\n{code}\n{FENCE}"])

    def run() -> None:
        with pytest.raises(EndpointUnreachable, match="did not answer in time"):  # unusable: it ends the run
            rlm.completion("some context", "go")

    with HostileServer(answer) as server:
        rlm = RLM_REPL(client=root, sub_client=client_for(server, max_retries=3), sandbox=level)
        _, growth = peak_growth_kib(run)
    calls = [event for event in rlm.trace if event.type == "sub_call"]
    assert [event.prompt for event in calls] == ["a", "b", "n", "c", "s"]
    errors = [event.error for event in calls]
    assert "ResponseLimits.max_body_bytes" in errors[0] and "empty choices" in errors[1]
    assert "sent no text" in errors[2] and errors[3] is None
    assert "did not answer in time" in errors[4] and calls[4].latency <= 2 * TIMEOUT, f"{calls[4].latency:.2f} s"
    assert growth < 64 * 1024


def test_a_child_run_whose_model_call_fails_fails_its_rlm_query_only():
    code = "\n".join([
        "try:",
        "    rlm_query('look deeper')",
        "except Exception as exc:",
        "    FINAL('child failed: ' + type(exc).__name__)",
    ])
    root = ScriptedModel([f"{FENCE}repl\n{code}\n{FENCE}"])
    with HostileServer("empty_choices") as server:
        rlm = RLM_REPL(client=root, sub_client=client_for(server), sandbox="inprocess", max_depth=2)
        assert rlm.completion("some context", "go").startswith("child failed")
    assert len(server.requests) == 1  # the child's first turn; nothing retried, nothing else sent
    assert rlm.trace[-1].status == "answered"


def test_a_failing_root_call_ends_the_run_with_its_trajectory_kept():
    replies = iter([Fault(body=lambda: (chat_body(f"{FENCE}repl\nx = 1\n{FENCE}"),)), FAULTS["empty_choices"]])

    def answer(request) -> Fault:
        if request.method == "GET":  # the model listing (asked for the context window)
            return Fault(body=lambda: (json.dumps({"data": [{"id": "m"}]}).encode(),))
        return next(replies)

    with HostileServer(answer) as server:
        rlm = RLM_REPL(client=client_for(server), sub_client=ScriptedModel(["unused"]), sandbox="inprocess")
        with pytest.raises(MalformedResponse, match="empty choices"):
            rlm.completion("some context", "go")
    kinds = [event.type for event in rlm.trace]
    assert kinds[:3] == ["run_start", "llm_call", "exec"]
    assert kinds[-2:] == ["error", "run_end"] and rlm.trace[-1].status == "error"


def test_response_limits_are_public_and_given_to_rlm_repl_reach_its_root_and_sub_clients():
    import rlm

    assert rlm.ResponseLimits is ResponseLimits and {"ResponseLimits", "ResponseLimitExceeded"} <= set(rlm.__all__)
    code = "try:\n    llm_query('big')\nexcept Exception as exc:\n    FINAL(str(exc))"

    def answer(request) -> Fault:
        if json.loads(request.body)["messages"][-1]["content"] == "big":
            return Fault(body=lambda: (chat_body("x" * 4096),))
        return Fault(body=lambda: (chat_body(f"{FENCE}repl\n{code}\n{FENCE}"),))

    with HostileServer(answer) as server:
        def run(max_body_bytes: int) -> str | None:
            limits = rlm.ResponseLimits(max_body_bytes=max_body_bytes)
            with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", response_limits=limits,
                          context_window=100_000) as made:
                return made.completion("some context", "go")

        assert "ResponseLimits.max_body_bytes" in run(2048)  # the root's reply fits, the sub-call's does not
        with pytest.raises(ResponseLimitExceeded, match="max_body_bytes"):
            run(128)  # the root's reply does not fit either


def test_usage_a_server_reports_negative_cannot_get_a_run_past_its_token_budget():
    code = "\n".join(["for i in range(30):", "    llm_query(f'question {i}')", "FINAL('done')"])

    def run(max_tokens: int | None) -> tuple[RLM_REPL, int]:
        root = ScriptedModel([f"{FENCE}repl\n{code}\n{FENCE}"])
        with HostileServer("usage_negative") as server:
            rlm = RLM_REPL(client=root, sub_client=client_for(server), sandbox="inprocess", max_tokens=max_tokens)
            try:
                rlm.completion("some context", "go")
            except BudgetExceeded:
                pass
        return rlm, len(server.requests)

    unlimited, calls = run(None)
    assert calls == 30
    summary = unlimited.cost_summary()
    assert summary["usage_estimated"] and summary["sub"]["input_tokens"] > 0
    per_call = (summary["sub"]["input_tokens"] + summary["sub"]["output_tokens"]) // 30
    budget = summary["root"]["input_tokens"] + summary["root"]["output_tokens"] + 8 * per_call  # room for 8
    limited, calls = run(budget)
    assert limited.trace[-2].kind == "BudgetExceeded"
    assert 6 <= calls <= 10


# -- the Anthropic client reads under the same caps and the same deadline ---------------------------


def anthropic_complete(server: HostileServer, *, asynchronous: bool, **options) -> None:
    """One call of an Anthropic client to `server`, blocking or awaited."""
    anthropic_client = pytest.importorskip("rlm.utils.anthropic_client")
    client = anthropic_client.AnthropicClient(
        "claude-x", api_url=server.url.removesuffix("/v1"), api_key="k", timeout=TIMEOUT, **options
    )

    async def call() -> None:
        try:
            await client.acomplete(MESSAGES)
        finally:
            await client.aclose()

    try:
        if asynchronous:
            asyncio.run(call())
        else:
            client.complete(MESSAGES)
    finally:
        client.close()


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("fault", ["gzip_bomb", "huge_content"])
def test_the_anthropic_client_refuses_an_answer_past_a_cap(fault, asynchronous):
    with HostileServer(fault) as server:
        started = time.monotonic()
        with pytest.raises(ResponseLimitExceeded):
            anthropic_complete(server, asynchronous=asynchronous, max_retries=0)
    assert time.monotonic() - started < 2 * TIMEOUT


@pytest.mark.parametrize(("fault", "asynchronous"), [
    ("trickled_head", False), ("trickled_head", True), ("silent", True), ("trickled_body", False),
])
def test_the_anthropic_client_ends_within_twice_its_timeout_with_its_default_retries(fault, asynchronous):
    kind, text = OUTCOMES[fault]
    with HostileServer(fault) as server:
        started = time.monotonic()
        with pytest.raises(ClientError, match=text) as caught:
            anthropic_complete(server, asynchronous=asynchronous)
        elapsed = time.monotonic() - started
    assert type(caught.value).__name__ == kind
    assert elapsed <= 2 * TIMEOUT, f"{elapsed:.2f} s"


def test_the_anthropic_client_follows_no_redirect():
    with HostileServer(lambda request: Fault(body=lambda: (b"{}",))) as elsewhere:
        with HostileServer(redirect(elsewhere.url + "/messages")) as server:
            with pytest.raises(ClientError) as caught:
                anthropic_complete(server, asynchronous=False, max_retries=0)
    assert caught.value.status == 307 and elsewhere.requests == []
