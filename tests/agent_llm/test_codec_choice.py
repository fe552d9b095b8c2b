"""The LLM chooses each client's upload codec: schema, prompt, parsing, guard, counting.

Codecs are offered only when more than one is allowed (``compression.adaptive``:
``Limits.codecs`` besides the run's default). Unit tests answer through litellm's
``mock_response`` (no HTTP); one test goes through the real HTTP path against the
scripted OpenAI-compatible stub.
"""

from __future__ import annotations

import json
import logging
from typing import Any, get_args

import pytest
from support.openai_stub import OpenAIStub, Reply

from agent_strategy import Allocation, Decision, Observation
from agent_strategy.codecs import bandwidth_codecs
from agent_strategy.llm.answer import (
    InvalidAnswer,
    TrainAnswer,
    answer_schema,
    parse_answer,
)
from agent_strategy.llm.prompt import CODEC_MEANINGS, render_prompt
from agent_strategy.types import Compression

from .llm_factories import (
    assert_obeys_guard,
    limits,
    mock_completion,
    mock_policy,
    stub_policy,
    train_obs,
)

SELECTED = ["c1", "c2", "c4", "c6"]
_MISSING = object()
# Seconds to move the dense model down and up; the measured median is 1.0, so the
# bandwidth rule gives c1 (6x slower) q4 and c6 (2.5x slower) q8.
COMM_S = {"c1": 6.0, "c6": 2.5}


def _obs(*codecs: Compression, default: Compression = "none") -> Observation:
    base = train_obs(limits=limits(codecs=codecs))
    clients = tuple(
        c.model_copy(update={"comm_s": COMM_S.get(c.id, 1.0), "epoch_s": 0.5})
        if c.last_selected_round
        else c
        for c in base.clients
    )
    return base.model_copy(update={"clients": clients, "default_compression": default})


def _answer(codecs: dict[str, Any] | None = None) -> str:
    codecs = codecs or {}
    allocations = []
    for cid in SELECTED:
        a: dict[str, Any] = {"id": cid, "local_epochs": 2, "lr": 0.04}
        if codecs.get(cid, _MISSING) is not _MISSING:
            a["compression"] = codecs[cid]
        allocations.append(a)
    return json.dumps(
        {
            "selected": SELECTED,
            "allocations": allocations,
            "flags": [],
            "rationale": "slow links compress",
        }
    )


def _codecs(decision: Decision) -> dict[str, str]:
    return {cid: a.compression for cid, a in decision.allocations.items()}


# ------------------------------------------------------------- schema and prompt
def test_every_codec_has_a_one_line_meaning() -> None:
    assert set(CODEC_MEANINGS) == set(get_args(Compression))
    assert all("\n" not in m for m in CODEC_MEANINGS.values())


def test_schema_and_prompt_offer_only_the_allowed_codecs() -> None:
    obs = _obs("q8", "q4")

    item = answer_schema(obs)["properties"]["allocations"]["items"]
    rendered = render_prompt(obs)
    system = rendered.messages[0]["content"]

    assert item["properties"]["compression"]["anyOf"] == [
        {"type": "string", "enum": ["none", "q8", "q4"]},
        {"type": "null"},
    ]
    assert "compression" in item["required"]
    for codec in ("none", "q8", "q4"):
        assert f"{codec} = {CODEC_MEANINGS[codec]}" in system
    assert "topk =" not in system and "topk_q8 =" not in system
    enum = rendered.schema["properties"]["allocations"]["items"]["properties"]
    assert enum["compression"] == item["properties"]["compression"]


def test_the_run_default_codec_is_offered_first() -> None:
    obs = _obs("none", "q4", default="q8")

    item = answer_schema(obs)["properties"]["allocations"]["items"]

    assert item["properties"]["compression"]["anyOf"][0]["enum"] == [
        "q8",
        "none",
        "q4",
    ]


def test_a_fixed_codec_is_not_offered() -> None:
    obs = _obs()  # compression.adaptive off: only the run's codec

    item = answer_schema(obs)["properties"]["allocations"]["items"]
    system = render_prompt(obs).messages[0]["content"]

    assert "compression" not in item["properties"]
    assert item["required"] == ["id", "local_epochs", "lr"]
    assert "compression (" not in system


def test_aggregate_schema_has_no_codec() -> None:
    obs = _obs("q8").model_copy(update={"phase": "aggregate"})

    assert "compression" not in json.dumps(answer_schema(obs))


# ------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("given", "parsed"),
    [("q4", "q4"), (" Q8 ", "q8"), (None, None), (_MISSING, None)],
)
def test_codec_is_parsed_or_left_open(given: Any, parsed: str | None) -> None:
    answer = parse_answer(_answer({"c1": given}), _obs("q8", "q4"))

    assert isinstance(answer, TrainAnswer)
    assert answer.allocations[0].id == "c1"
    assert answer.allocations[0].compression == parsed


@pytest.mark.parametrize("bad", ["gzip", 8, ["q8"]])
def test_unknown_codec_name_is_a_schema_error(bad: Any) -> None:
    with pytest.raises(InvalidAnswer) as e:
        parse_answer(_answer({"c1": bad}), _obs("q8"))

    assert e.value.kind == "schema"
    assert "compression" in e.value.reason


# --------------------------------------------------- LLMPolicy via mock_response
def test_allowed_codecs_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    given = {"c1": "q4", "c2": "none", "c4": "q8", "c6": "q8"}
    calls = mock_completion(monkeypatch, _answer(given))
    policy, obs = mock_policy(), _obs("q8", "q4")

    decision = policy.decide(obs)

    assert len(calls) == 1
    assert decision.source == "llm"
    assert _codecs(decision) == given
    assert "c4 q8 (llm)" in decision.rationale
    assert policy.corrections["compression"] == 0
    assert_obeys_guard(decision, obs)


def test_disallowed_codecs_are_replaced_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    given = {"c1": "topk", "c2": "none", "c4": "q4", "c6": "q8"}
    mock_completion(monkeypatch, _answer(given))
    policy, obs = mock_policy(), _obs("q8")  # allowed: none, q8

    with caplog.at_level(logging.WARNING, logger="agent_strategy.llm.policy"):
        decision = policy.decide(obs)
        decision_again = policy.decide(obs)

    expected = {"c1": "none", "c2": "none", "c4": "none", "c6": "q8"}
    assert decision.source == "llm"  # selection and epochs are still the LLM's
    assert _codecs(decision) == expected
    assert _codecs(decision_again) == expected
    assert {a.local_epochs for a in decision.allocations.values()} == {2}
    assert policy.corrections["compression"] == 4  # two per decision
    assert policy.stats()["corrections"]["compression"] == 4
    assert dict(policy.fallbacks) == {}
    assert policy.last_call is not None
    assert any(
        "codec 'topk' of c1 not allowed" in c for c in policy.last_call.guard_changes
    )
    logged = [r.getMessage() for r in caplog.records]
    assert sum("chose codecs not allowed (none, q8)" in m for m in logged) == 2
    assert any("c1 'topk' -> 'none'; c4 'q4' -> 'none'" in m for m in logged)
    assert_obeys_guard(decision, obs)


def test_a_codec_named_when_codecs_are_fixed_is_replaced_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_completion(monkeypatch, _answer({"c1": "q8"}))
    policy, obs = mock_policy(), _obs()

    decision = policy.decide(obs)

    assert set(_codecs(decision).values()) == {"none"}
    assert policy.corrections["compression"] == 1


@pytest.mark.parametrize("given", [_MISSING, None])
def test_missing_codecs_take_the_deterministic_choice(
    monkeypatch: pytest.MonkeyPatch, given: Any
) -> None:
    obs = _obs("q8", "q4")
    rule = bandwidth_codecs(obs)
    assert (rule["c1"], rule["c6"], rule["c2"]) == ("q4", "q8", "none")  # premise
    mock_completion(
        monkeypatch, _answer({"c1": given, "c2": given, "c4": "q8", "c6": given})
    )
    policy = mock_policy()

    decision = policy.decide(obs)

    assert _codecs(decision) == {"c1": "q4", "c2": "none", "c4": "q8", "c6": "q8"}
    assert "c1 q4 (default)" in decision.rationale
    assert "c4 q8 (llm)" in decision.rationale
    assert policy.corrections["compression"] == 0


class _Fixed:
    """A fallback that selects c2 with 4-bit uploads."""

    name = "fixed"

    def decide(self, obs: Observation) -> Decision:
        alloc = Allocation(local_epochs=1, lr=0.01, compression="q4", deadline_s=5.0)
        return Decision(selected=("c2", "c3"), allocations={"c2": alloc})


def test_the_fallbacks_own_allocation_codec_comes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_completion(monkeypatch, _answer())
    policy, obs = mock_policy(_Fixed()), _obs("q8", "q4")

    decision = policy.decide(obs)

    # c2: the fallback's allocation; the others: the bandwidth rule.
    assert _codecs(decision) == {"c1": "q4", "c2": "q4", "c4": "none", "c6": "q8"}


@pytest.mark.parametrize(("fraction", "want"), [(0.01, "topk"), (0.3, "q8")])
def test_the_bandwidth_rule_ranks_topk_with_the_runs_fraction(
    monkeypatch: pytest.MonkeyPatch, fraction: float, want: Compression
) -> None:
    # c1's link is 6x the median's: top-k at 1% (2% of the bytes) fits, at 30%
    # (60%) nothing does and q8 (25%) is the strongest allowed.
    mock_completion(monkeypatch, _answer())
    policy = mock_policy(_Fixed())
    obs = _obs("q8", "topk").model_copy(update={"topk_fraction": fraction})

    decision = policy.decide(obs)

    assert _codecs(decision)["c1"] == want


def test_a_failing_fallback_leaves_the_bandwidth_rule(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "broken"

        def decide(self, obs: Observation) -> Decision:
            raise RuntimeError("no")

    mock_completion(monkeypatch, _answer())
    policy, obs = mock_policy(Broken()), _obs("q8", "q4")

    with caplog.at_level(logging.ERROR, logger="agent_strategy.llm.policy"):
        decision = policy.decide(obs)

    assert decision.source == "llm"
    assert _codecs(decision) == {"c1": "q4", "c2": "none", "c4": "none", "c6": "q8"}
    assert any("while choosing codecs" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ real HTTP
def test_codec_choice_through_http(openai_stub: OpenAIStub) -> None:
    openai_stub.script(
        Reply(content=_answer({"c1": "q4", "c2": None, "c4": "topk", "c6": "q8"}))
    )
    policy = stub_policy(openai_stub.api_base)
    obs = _obs("q8", "q4")

    decision = policy.decide(obs)

    items = openai_stub.requests[0]["response_format"]["schema"]["properties"][
        "allocations"
    ]["items"]
    assert items["properties"]["compression"]["anyOf"][0]["enum"] == [
        "none",
        "q8",
        "q4",
    ]
    assert "q4 = 4-bit" in openai_stub.requests[0]["messages"][0]["content"]
    assert decision.source == "llm"
    # c2: the fallback's (bandwidth) choice; c4: topk not allowed -> the default.
    assert _codecs(decision) == {"c1": "q4", "c2": "none", "c4": "none", "c6": "q8"}
    assert policy.corrections["compression"] == 1
    assert_obeys_guard(decision, obs)
