"""LLMPolicy against a real HTTP server (the scripted stub), through real litellm calls.

Every scenario checks the same contract: ``decide()`` returns, the expected fallback
reason is recorded, and the returned decision obeys the guard.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from support.openai_stub import OpenAIStub, Reply

from agent_strategy import Observation
from agent_strategy.llm import Budget
from agent_strategy.llm.local_server import free_port

from .llm_factories import (
    aggregate_answer,
    aggregate_obs,
    assert_obeys_guard,
    stub_policy,
    train_answer,
    train_obs,
)


def test_valid_train_answer_is_used(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=train_answer(), usage=(321, 45)))
    policy = stub_policy(openai_stub.api_base)
    obs = train_obs()

    decision = policy.decide(obs)

    assert decision.source == "llm"
    assert decision.selected == ("c1", "c2", "c4", "c6")
    assert {a.local_epochs for a in decision.allocations.values()} == {2}
    call = policy.last_call
    assert call is not None
    assert call.fallback_reason is None
    assert (call.attempts, call.prompt_tokens, call.completion_tokens) == (1, 321, 45)
    assert len(call.prompt_sha256) == 64 and len(call.response_sha256) == 64
    assert policy.budget.calls == 1 and policy.budget.tokens == 366
    assert_obeys_guard(decision, obs)


def test_valid_aggregate_answer_is_used_and_capped(openai_stub: OpenAIStub) -> None:
    weights = {"c0": 100.0, "c1": 1.0, "c2": 1.0, "c3": 1.0, "c4": 0.0}
    openai_stub.script(Reply(content=aggregate_answer(weights)))
    policy = stub_policy(openai_stub.api_base)
    obs = aggregate_obs()

    decision = policy.decide(obs)

    assert decision.source == "llm"
    assert math.isclose(sum(decision.weights.values()), 1.0)
    assert decision.weights["c0"] <= obs.limits.max_weight_share + 1e-9
    assert policy.last_call is not None
    assert any("trust region" in c for c in policy.last_call.guard_changes)
    assert_obeys_guard(decision, obs)


def test_json_object_mode_sends_the_schema_with_shown_ids(
    openai_stub: OpenAIStub,
) -> None:
    openai_stub.script(Reply(content=train_answer()))
    policy = stub_policy(openai_stub.api_base)

    policy.decide(train_obs(n=6))

    fmt = openai_stub.requests[0]["response_format"]
    assert fmt["type"] == "json_object"
    items = fmt["schema"]["properties"]["selected"]["items"]
    assert items["enum"] == [f"c{i}" for i in range(6)]
    assert openai_stub.requests[0]["temperature"] == 0.0


def test_tool_mode_reads_the_tool_call_arguments(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=train_answer(), tool_call=True))
    policy = stub_policy(openai_stub.api_base, mode="tool")
    obs = train_obs()

    decision = policy.decide(obs)

    assert decision.source == "llm"
    body = openai_stub.requests[0]
    assert body["tool_choice"]["function"]["name"] == "decide"
    assert "response_format" not in body


def _nan_weights() -> str:
    return aggregate_answer({"c0": float("nan"), "c1": 1, "c2": 1, "c3": 1, "c4": 1})


SCENARIOS: list[tuple[str, str, Reply, str]] = [
    ("prose", "train", Reply(content="I would pick the best clients."), "parse"),
    ("fenced prose", "train", Reply(content="```\nnot json\n```"), "parse"),
    (
        "schema",
        "train",
        Reply(content='{"selected": "c1", "allocations": 3}'),
        "schema",
    ),
    ("schema agg", "aggregate", Reply(content='{"flags": []}'), "schema"),
    (
        "hallucinated ids",
        "train",
        Reply(content=train_answer(["c1", "c2", "c77"])),
        "invalid",
    ),
    (
        "hallucinated reply",
        "aggregate",
        Reply(content=aggregate_answer({"c0": 1, "c1": 1, "c9": 1})),
        "invalid",
    ),
    ("empty selection", "train", Reply(content=train_answer([])), "invalid"),
    (
        "too many",
        "train",
        Reply(content=train_answer([f"c{i}" for i in range(8)])),
        "invalid",
    ),
    ("nan weight", "aggregate", Reply(content=_nan_weights()), "invalid"),
    (
        "huge weight",
        "aggregate",
        Reply(content=aggregate_answer({f"c{i}": 1e300 for i in range(5)})),
        "invalid",
    ),
    (
        "negative weight",
        "aggregate",
        Reply(content=aggregate_answer({f"c{i}": -1.0 + i for i in range(5)})),
        "invalid",
    ),
    (
        "selects every flagged client",
        "train",
        Reply(
            content=train_answer(
                ["c1", "c2"],
                flags=[
                    {"id": "c1", "kind": "malicious", "reason": "x"},
                    {"id": "c2", "kind": "faulty", "reason": "y"},
                ],
            )
        ),
        "invalid",
    ),
    (
        "flags every reply",
        "aggregate",
        Reply(
            content=aggregate_answer(
                {f"c{i}": 0.0 for i in range(5)},
                flags=[
                    {"id": f"c{i}", "kind": "malicious", "reason": "z"}
                    for i in range(5)
                ],
            )
        ),
        "invalid",
    ),
    ("http 401", "train", Reply(status=401), "auth"),
    ("http 404", "train", Reply(status=404), "not_found"),
    ("http 500 twice", "train", Reply(status=500), "server_error"),
    ("http 429 twice", "aggregate", Reply(status=429), "rate_limit"),
    ("empty text", "train", Reply(content=""), "empty"),
]


@pytest.mark.parametrize(
    ("phase", "reply", "category"),
    [s[1:] for s in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_bad_answers_fall_back(
    openai_stub: OpenAIStub, phase: str, reply: Reply, category: str
) -> None:
    openai_stub.script(reply)
    policy = stub_policy(openai_stub.api_base)
    obs: Observation = train_obs() if phase == "train" else aggregate_obs()

    decision = policy.decide(obs)

    assert decision.source == "fallback"
    call = policy.last_call
    assert call is not None and call.fallback_reason is not None
    assert call.fallback_reason.split(":", 1)[0] == category, call.fallback_reason
    assert policy.fallbacks[category] == 1
    assert_obeys_guard(decision, obs)


def test_slow_server_times_out_and_falls_back(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=train_answer(), delay_s=5.0))
    policy = stub_policy(openai_stub.api_base, timeout_s=0.5, max_attempts=1)
    obs = train_obs()

    start = time.perf_counter()
    decision = policy.decide(obs)
    elapsed = time.perf_counter() - start

    assert decision.source == "fallback"
    assert policy.last_call is not None
    assert policy.last_call.fallback_reason is not None
    assert policy.last_call.fallback_reason.startswith("timeout:")
    assert elapsed < 3.0
    assert openai_stub.count == 1
    assert_obeys_guard(decision, obs)


def test_flaky_500_is_retried_and_succeeds(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(status=500), Reply(content=train_answer()))
    policy = stub_policy(openai_stub.api_base, max_attempts=3)
    obs = train_obs()

    decision = policy.decide(obs)

    assert decision.source == "llm"
    assert openai_stub.count == 2
    assert policy.last_call is not None and policy.last_call.attempts == 2
    assert policy.budget.calls == 2


def test_401_is_not_retried(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(status=401))
    policy = stub_policy(openai_stub.api_base, max_attempts=5)

    decision = policy.decide(train_obs())

    assert decision.source == "fallback"
    assert openai_stub.count == 1
    assert policy.last_call is not None and policy.last_call.attempts == 1


def test_transient_errors_stop_after_max_attempts(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(status=503))
    policy = stub_policy(openai_stub.api_base, max_attempts=3)

    policy.decide(train_obs())

    assert openai_stub.count == 3
    assert policy.last_call is not None and policy.last_call.attempts == 3


def test_down_server_falls_back_with_connection_reason() -> None:
    policy = stub_policy(f"http://127.0.0.1:{free_port()}/v1", max_attempts=2)
    obs = aggregate_obs()

    decision = policy.decide(obs)

    assert decision.source == "fallback"
    assert policy.last_call is not None
    assert policy.last_call.fallback_reason is not None
    assert policy.last_call.fallback_reason.startswith("connection:")
    assert policy.last_call.attempts == 2
    assert_obeys_guard(decision, obs)


def test_budget_cap_on_calls_falls_back(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=train_answer()))
    policy = stub_policy(openai_stub.api_base, budget=Budget(max_calls=2))
    obs = train_obs()

    sources = [policy.decide(obs).source for _ in range(3)]

    assert sources == ["llm", "llm", "fallback"]
    assert openai_stub.count == 2
    assert policy.last_call is not None
    assert policy.last_call.fallback_reason == "budget: calls: 2 of 2 used"
    assert policy.fallbacks["budget"] == 1


def test_budget_cap_on_tokens_falls_back(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=train_answer(), usage=(900, 100)))
    policy = stub_policy(openai_stub.api_base, budget=Budget(max_tokens=1500))

    sources = [policy.decide(train_obs()).source for _ in range(3)]

    assert sources == ["llm", "llm", "fallback"]
    assert policy.last_call is not None
    assert (policy.last_call.fallback_reason or "").startswith("budget: tokens:")


def test_budget_exhausted_mid_retry_falls_back(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(status=500))
    policy = stub_policy(
        openai_stub.api_base, max_attempts=5, budget=Budget(max_calls=2)
    )

    policy.decide(train_obs())

    assert openai_stub.count == 2
    assert policy.last_call is not None
    assert (policy.last_call.fallback_reason or "").startswith("budget:")


def test_probe_ok_then_decide(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content='{"ok": true}'), Reply(content=train_answer()))
    policy = stub_policy(openai_stub.api_base)

    error = policy.probe()
    decision = policy.decide(train_obs())

    assert error is None
    assert decision.source == "llm"
    assert openai_stub.requests[0]["max_tokens"] == 8


@pytest.mark.parametrize(
    ("status", "words"), [(401, "auth"), (404, "not_found")], ids=["401", "404"]
)
def test_probe_reports_one_line_then_decide_falls_back_at_once(
    openai_stub: OpenAIStub, status: int, words: str
) -> None:
    openai_stub.script(Reply(status=status))
    policy = stub_policy(openai_stub.api_base)

    error = policy.probe()
    decision = policy.decide(train_obs())

    assert error is not None and "\n" not in error and words in error
    assert decision.source == "fallback"
    assert openai_stub.count == 1
    assert policy.last_call is not None
    assert policy.last_call.fallback_reason == f"unavailable: {error}"
    assert policy.last_call.attempts == 0


def test_probe_unreachable_api_base() -> None:
    policy = stub_policy(f"http://127.0.0.1:{free_port()}/v1")

    error = policy.probe()

    assert error is not None and "connection" in error and "127.0.0.1" in error


def test_probe_missing_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    policy = stub_policy(None, "anthropic/claude-3-5-haiku-latest", api_key=None)

    error = policy.probe()

    assert error is not None and "ANTHROPIC_API_KEY" in error
    assert policy.budget.calls == 0


def test_probe_misspelled_provider() -> None:
    policy = stub_policy(None, "opneai/gpt-4o-mini", api_key="sk-x")

    error = policy.probe()

    assert error is not None and "bad_request" in error


def test_consecutive_failures_disable_the_llm(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content="no json here"))
    policy = stub_policy(openai_stub.api_base, max_consecutive_failures=2)

    for _ in range(4):
        policy.decide(train_obs())

    assert openai_stub.count == 2
    assert policy.fallbacks["parse"] == 2 and policy.fallbacks["unavailable"] == 2
    assert policy.unavailable is not None and "2 consecutive" in policy.unavailable


def test_a_paused_llm_is_asked_again_and_recovers(openai_stub: OpenAIStub) -> None:
    openai_stub.script(
        Reply(content="no json here"),
        Reply(content="no json"),
        Reply(content=train_answer()),
    )
    policy = stub_policy(
        openai_stub.api_base, max_consecutive_failures=2, retry_after=3
    )

    sources = [policy.decide(train_obs()).source for _ in range(7)]

    # 2 failures pause it for 3 decisions, then it is asked again and answers.
    assert sources == ["fallback"] * 5 + ["llm", "llm"]
    assert openai_stub.count == 4
    assert policy.unavailable is None


def test_history_reaches_the_prompt(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=aggregate_answer()), Reply(content=train_answer()))
    policy = stub_policy(openai_stub.api_base, history_len=3)

    policy.decide(aggregate_obs())
    policy.decide(train_obs(round_=6))

    user: dict[str, Any] = json.loads(openai_stub.requests[1]["messages"][1]["content"])
    assert user["history"]["rows"][0][0] == 5
    assert len(policy.history) == 1


def test_probe_retries_a_transient_error(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(status=502), Reply(content='{"ok": true}'))
    policy = stub_policy(openai_stub.api_base, max_attempts=2)

    error = policy.probe()

    assert error is None and policy.unavailable is None
    assert openai_stub.count == 2 and policy.budget.calls == 2
