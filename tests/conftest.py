"""Fixtures shared by the test modules (plain helpers are in helpers.py)."""

from __future__ import annotations

import pytest

from helpers import RecordingBridge
from rlm.sandbox import SANDBOXES, create_sandbox


@pytest.fixture(autouse=True)
def _no_log_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's RLM_LOG_DIR must not receive test trajectories (or change what is tested).
    monkeypatch.delenv("RLM_LOG_DIR", raising=False)


@pytest.fixture
def bridge() -> RecordingBridge:
    return RecordingBridge()


@pytest.fixture(params=sorted(SANDBOXES))
def sandbox(request: pytest.FixtureRequest, bridge: RecordingBridge):
    """A fresh session of each sandbox in turn (tests parametrizing `sandbox` by name override it)."""
    box = create_sandbox(request.param, bridge)
    yield box
    box.close()
