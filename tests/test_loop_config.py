"""RLM_REPL checks its arguments when it is made, with a message that names the fix."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import make
from rlm.errors import ConfigError
from rlm.rlm_repl import RLM_REPL
from rlm.testing import ScriptedModel
from rlm.utils.llm import Completion


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"max_iterations": 2.5}, ["max_iterations", "whole number", "2.5"]),
        ({"max_output_length": 0}, ["max_output_length", "positive", "0"]),
        ({"sandbox": 123}, ["sandbox", "'auto'", "'subprocess'", "factory", "123"]),
        ({"sandbox": "nope"}, ["'nope'", "auto", "bwrap", "strict", "subprocess", "inprocess"]),
        ({"max_depth": -1}, ["max_depth", "0", "1", "-1"]),
        ({"response_limits": {"max_body_bytes": 1024}}, ["response_limits", "rlm.ResponseLimits(", "1024"]),
    ],
    ids=["fractional_max_iterations", "zero_max_output_length", "sandbox_not_a_name", "unknown_sandbox",
         "negative_max_depth", "response_limits_not_a_ResponseLimits"],
)
def test_bad_options_are_config_errors_when_made(options: dict[str, Any], says: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        make(["FINAL(never)"], **options)
    for words in says:
        assert words in str(caught.value)


class _NoModelName:
    """A client without the `model` attribute every client has."""

    base_url = "http://127.0.0.1/nameless"

    def complete(self, messages: list[dict], *, max_tokens: int | None = None) -> Completion:
        raise AssertionError("never called")

    def context_window(self) -> int | None:
        return None


@pytest.mark.parametrize("role", ["client", "sub_client"])
def test_a_client_without_a_model_name_is_a_config_error_naming_what_is_missing(role: str) -> None:
    clients = {"client": ScriptedModel(["FINAL(x)"]), "sub_client": ScriptedModel(["s"]), role: _NoModelName()}
    with pytest.raises(ConfigError) as caught:
        RLM_REPL(sandbox="inprocess", **clients)
    assert role in str(caught.value) and ".model" in str(caught.value) and "LLMClient" in str(caught.value)
