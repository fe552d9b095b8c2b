"""Pure unit tests of the backend adapter (``mock_response``: no HTTP here)."""

from __future__ import annotations

from typing import Any

import httpx
import litellm
import openai
import pytest

from agent_strategy.llm.answer import answer_schema
from agent_strategy.llm.backend import (
    Backend,
    BackendError,
    call_with_retries,
    choose_mode,
    classify,
    structured_kwargs,
)

from .llm_factories import train_obs


@pytest.mark.parametrize(
    ("model", "api_base", "mode"),
    [
        ("openai/smollm2", "http://127.0.0.1:8080/v1", "json_object"),
        ("openai/my-model", "https://llm.example.org/v1", "json_object"),
        ("openai/gpt-4o-mini", None, "json_schema"),
        ("openai/gpt-4o-mini", "https://api.openai.com/v1", "json_schema"),
        ("gpt-4o-mini", None, "json_schema"),
        ("anthropic/claude-3-5-haiku-latest", None, "json_schema"),
        ("ollama_chat/llama3.2", "http://127.0.0.1:11434", "json_schema"),
        ("azure_ai/Phi-4", "https://x.example.org", "tool"),
        ("nonsense-provider/x", None, "json_object"),
    ],
)
def test_mode_per_backend(model: str, api_base: str | None, mode: str) -> None:
    assert choose_mode(model, api_base) == mode


def test_structured_kwargs_per_mode() -> None:
    schema = answer_schema(train_obs())

    strict = structured_kwargs("json_schema", schema, "openai")
    plain = structured_kwargs("json_schema", schema, "anthropic")
    obj = structured_kwargs("json_object", schema)
    tool = structured_kwargs("tool", schema)

    assert strict["response_format"]["json_schema"]["strict"] is True
    assert "strict" not in plain["response_format"]["json_schema"]
    assert obj == {"response_format": {"type": "json_object", "schema": schema}}
    assert tool["tools"][0]["function"]["parameters"] is schema
    assert tool["tool_choice"]["function"]["name"] == "decide"
    assert structured_kwargs("none", schema) == {}


def _req() -> Any:  # the openai SDK may type it as httpx2.Request
    return httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def _status_error(cls: type[Exception], status: int) -> Exception:
    response = httpx.Response(status, request=_req())
    return cls(message="m", response=response, body=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("exc", "kind", "retryable"),
    [
        (openai.APITimeoutError(request=_req()), "timeout", True),
        (openai.APIConnectionError(request=_req()), "connection", True),
        (ConnectionRefusedError(), "connection", True),
        (_status_error(openai.RateLimitError, 429), "rate_limit", True),
        (_status_error(openai.InternalServerError, 500), "server_error", True),
        (_status_error(openai.AuthenticationError, 401), "auth", False),
        (_status_error(openai.PermissionDeniedError, 403), "auth", False),
        (_status_error(openai.NotFoundError, 404), "not_found", False),
        (_status_error(openai.BadRequestError, 400), "bad_request", False),
        (ValueError("odd"), "backend", False),
    ],
)
def test_classify(exc: Exception, kind: str, retryable: bool) -> None:
    err = classify(exc)

    assert (err.kind, err.retryable) == (kind, retryable)


def test_classify_finds_connection_errors_in_the_cause_chain() -> None:
    try:
        try:
            raise openai.APIConnectionError(request=_req())
        except openai.APIConnectionError as inner:
            raise litellm.InternalServerError(
                message="Connection error.", llm_provider="openai", model="x"
            ) from inner
    except litellm.InternalServerError as outer:
        err = classify(outer)

    assert err.kind == "connection"


def test_retries_only_transient_errors_with_backoff() -> None:
    pauses: list[float] = []
    errors = [BackendError("server_error", "a"), BackendError("timeout", "b")]

    def call() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    result = call_with_retries(call, max_attempts=3, backoff_s=0.5, sleep=pauses.append)

    assert result == "ok"
    assert pauses == [0.5, 1.0]


def test_non_transient_error_propagates_at_once() -> None:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        raise BackendError("auth", "bad key", 401)

    with pytest.raises(BackendError, match="auth"):
        call_with_retries(call, max_attempts=5, sleep=lambda s: None)

    assert len(calls) == 1


def test_backoff_is_capped() -> None:
    pauses: list[float] = []

    def call() -> str:
        raise BackendError("rate_limit", "slow down", 429)

    with pytest.raises(BackendError):
        call_with_retries(
            call, max_attempts=6, backoff_s=1.0, max_backoff_s=4.0, sleep=pauses.append
        )

    assert pauses == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_complete_with_mock_response_returns_text_and_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = Backend("openai/gpt-4o-mini", api_key="sk-test")
    messages = [{"role": "user", "content": "hi"}]
    original = litellm.completion
    monkeypatch.setattr(
        litellm,
        "completion",
        lambda **kw: original(mock_response='{"selected": []}', **kw),
    )

    completion = backend.complete(messages, {"type": "object"})

    assert completion.text == '{"selected": []}'
    assert completion.usage.total_tokens > 0
    assert completion.cost_usd >= 0.0


def test_loopback_api_base_gets_a_placeholder_key() -> None:
    local = Backend("openai/smollm2", api_base="http://127.0.0.1:1/v1")
    remote = Backend("openai/x", api_base="https://llm.example.org/v1")

    assert local.api_key == "sk-local"
    assert remote.api_key is None


def test_invalid_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Backend("openai/x", timeout_s=0)
