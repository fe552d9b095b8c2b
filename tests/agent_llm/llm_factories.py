"""Factories shared by the LLM policy tests (observations, answers, policies)."""

from __future__ import annotations

import json
from typing import Any

import litellm
import pytest
from support.factories import limits, plain_train_obs

from agent_strategy import (
    ClientState,
    Decision,
    DeterministicPolicy,
    Observation,
    ReplyFeatures,
    guard,
)
from agent_strategy.llm import Budget, LLMPolicy

STUB_MODEL = "openai/stub-model"
MOCK_MODEL = "openai/gpt-4o-mini"  # litellm mock_response only: no request is sent


def mock_completion(monkeypatch: pytest.MonkeyPatch, text: str) -> list[dict[str, Any]]:
    """Answer every ``litellm.completion`` with ``text``; return the calls' kwargs."""
    calls: list[dict[str, Any]] = []
    original = litellm.completion

    def fake(**kw: Any) -> Any:
        calls.append(kw)
        return original(mock_response=text, **kw)

    monkeypatch.setattr(litellm, "completion", fake)
    return calls


def mock_policy(fallback: DeterministicPolicy | None = None) -> LLMPolicy:
    """Return an LLM policy for ``mock_completion`` answers (one attempt)."""
    return LLMPolicy(
        MOCK_MODEL,
        api_key="sk-test",
        fallback=fallback or DeterministicPolicy(seed=0),
        max_attempts=1,
    )


def client(i: int, seen: bool = True) -> ClientState:
    if not seen:
        return ClientState(id=f"c{i}", num_examples=100 + 7 * i)
    return ClientState(
        id=f"c{i}",
        num_examples=100 + 7 * i,
        rounds_selected=1 + i % 3,
        rounds_accepted=1 + i % 3,
        last_selected_round=1 + i % 4,
        last_loss=0.3 + 0.05 * i,
        last_duration_s=2.0 + 0.5 * i,
        failures=i % 2,
        times_flagged=int(i == 3),
    )


def train_obs(n: int = 10, target: int = 4, round_: int = 5, **kw: Any) -> Observation:
    return plain_train_obs(
        n,
        target,
        round_,
        limits=kw.pop("limits", None) or limits(),
        clients=tuple(client(i, seen=i % 5 != 0) for i in range(n)),
        last_accuracy=0.8125,
        **kw,
    )


def replies(n: int = 5) -> tuple[ReplyFeatures, ...]:
    return tuple(
        ReplyFeatures(
            id=f"c{i}",
            num_examples=100 + 7 * i,
            train_loss=0.4 + 0.01 * i,
            duration_s=1.5 + 0.25 * i,
            update_norm=1.0 + 0.1 * i,
            cosine_to_median=0.9 - 0.05 * i,
        )
        for i in range(n)
    )


def aggregate_obs(n_clients: int = 10, n_replies: int = 5, **kw: Any) -> Observation:
    return train_obs(n=n_clients).model_copy(
        update={"phase": "aggregate", "replies": replies(n_replies), **kw}
    )


def train_answer(
    selected: list[str] | None = None, flags: list[dict[str, str]] | None = None
) -> str:
    selected = ["c1", "c2", "c4", "c6"] if selected is None else selected
    return json.dumps(
        {
            "selected": selected,
            "allocations": [
                {"id": cid, "local_epochs": 2, "lr": 0.04} for cid in selected
            ],
            "flags": flags or [],
            "rationale": "high loss, many examples",
        }
    )


def aggregate_answer(
    weights: dict[str, Any] | None = None, flags: list[dict[str, str]] | None = None
) -> str:
    weights = weights or {f"c{i}": 1.0 + i for i in range(5)}
    return json.dumps(
        {
            "weights": [{"id": k, "weight": v} for k, v in weights.items()],
            "flags": flags or [],
            "rationale": "by examples",
        }
    )


def stub_policy(api_base: str | None, model: str = STUB_MODEL, **kw: Any) -> LLMPolicy:
    base: dict[str, Any] = dict(
        api_base=api_base,
        api_key="sk-test",
        fallback=DeterministicPolicy(seed=0),
        timeout_s=5.0,
        max_attempts=2,
        backoff_s=0.01,
        budget=Budget(),
    )
    base.update(kw)
    return LLMPolicy(model, **base)


def assert_obeys_guard(decision: Decision, obs: Observation) -> None:
    g = guard(decision, obs)
    assert g.changes == () or g.decision == decision, g.changes
