"""Shared test setup: offline environment, a private FLWR_HOME, factories."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Set before any test module imports Flower or litellm.
_FLWR_HOME = tempfile.mkdtemp(prefix="agentfl-flwr-home-")
os.environ["FLWR_HOME"] = _FLWR_HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from support.openai_stub import OpenAIStub  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's FLWR_HOME (Flower's apps, logs and runs live there)."""
    shutil.rmtree(_FLWR_HOME, ignore_errors=True)


@pytest.fixture
def flwr_home() -> Path:
    """The temporary FLWR_HOME every test runs with."""
    return Path(_FLWR_HOME)


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    """A scripted OpenAI-compatible server on 127.0.0.1, always stopped after."""
    stub = OpenAIStub().start()
    try:
        yield stub
    finally:
        stub.stop()
