from __future__ import annotations

import json

import pytest

from agent_strategy import guard
from agent_strategy.llm.answer import (
    AggregateAnswer,
    InvalidAnswer,
    TrainAnswer,
    answer_schema,
    extract_json_object,
    parse_answer,
    to_decision,
)

from .llm_factories import (
    aggregate_answer,
    aggregate_obs,
    assert_obeys_guard,
    train_answer,
    train_obs,
)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        '```json\n{"a": 1}\n```',
        'Sure! Here it is:\n{"a": 1}\nHope this helps {not json}',
        'noise {broken {"a": 1}',
    ],
)
def test_first_json_object_is_extracted(text: str) -> None:
    assert extract_json_object(text) == {"a": 1}


@pytest.mark.parametrize("text", ["", "no json", "[1, 2]", "{'a': 1}"])
def test_no_object_is_a_parse_error(text: str) -> None:
    with pytest.raises(InvalidAnswer) as e:
        extract_json_object(text)
    assert e.value.kind == "parse"


def test_valid_train_answer_becomes_an_llm_decision() -> None:
    obs = train_obs()

    decision = to_decision(parse_answer(train_answer(), obs), obs)

    assert decision.source == "llm"
    assert decision.selected == ("c1", "c2", "c4", "c6")
    assert decision.allocations["c1"].lr == 0.04
    assert decision.allocations["c1"].deadline_s == obs.limits.deadline_s
    assert_obeys_guard(decision, obs)


def test_missing_allocation_gets_defaults() -> None:
    obs = train_obs()
    text = json.dumps({"selected": ["c1", "c2"], "rationale": "r"})

    decision = to_decision(parse_answer(text, obs), obs)

    assert decision.allocations["c2"].local_epochs == obs.default_epochs
    assert decision.allocations["c2"].lr == obs.default_lr


def test_map_shapes_are_accepted() -> None:
    obs = aggregate_obs(n_replies=2)
    text = json.dumps({"weights": {"c0": 1, "c1": 3}, "flags": []})

    answer = parse_answer(text, obs)

    assert isinstance(answer, AggregateAnswer)
    assert [(w.id, w.weight) for w in answer.weights] == [("c0", 1.0), ("c1", 3.0)]
    train = parse_answer(
        json.dumps(
            {
                "selected": ["c1", "c2"],
                "allocations": {"c1": {"local_epochs": 2, "lr": 0.1}},
            }
        ),
        train_obs(),
    )
    assert isinstance(train, TrainAnswer) and train.allocations[0].id == "c1"


def test_control_characters_and_long_text_are_cleaned() -> None:
    obs = aggregate_obs(n_replies=2)
    text = json.dumps(
        {
            "weights": {"c0": 1, "c1": 0},
            "flags": [{"id": "c1", "kind": "faulty", "reason": "bad\n\x1b[31m" * 100}],
            "rationale": "x" * 5000,
        }
    )

    decision = to_decision(parse_answer(text, obs), obs)

    assert len(decision.rationale) == 2000
    assert (
        "\n" not in decision.flags[0].reason and "\x1b" not in decision.flags[0].reason
    )
    assert len(decision.flags[0].reason) <= 300
    assert "c1" not in decision.weights


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ('{"allocations": []}', "schema", "selected"),
        ('{"selected": [1, {}]}', "schema", "selected"),
        (train_answer(["c1", "c99"]), "invalid", "unknown"),
        (train_answer(["c1", "c1", "c2"]), "invalid", "twice"),
        (train_answer(["c1"]), "invalid", "allowed 2..5"),
        (
            json.dumps(
                {
                    "selected": ["c1", "c2"],
                    "allocations": [{"id": "c3", "local_epochs": 1, "lr": 0.1}],
                }
            ),
            "invalid",
            "not selected",
        ),
        (
            json.dumps(
                {
                    "selected": ["c1", "c2"],
                    "allocations": [{"id": "c1", "local_epochs": 1, "lr": 0}],
                }
            ),
            "invalid",
            "lr",
        ),
        (
            train_answer(["c1", "c2"], [{"id": "c2", "kind": "faulty", "reason": ""}]),
            "invalid",
            "both selected and flagged",
        ),
    ],
)
def test_bad_train_answers(text: str, kind: str, words: str) -> None:
    with pytest.raises(InvalidAnswer, match=words) as e:
        parse_answer(text, train_obs())
    assert e.value.kind == kind


@pytest.mark.parametrize(
    ("weights", "flags", "words"),
    [
        ({"c0": 1, "c1": 1, "c2": 1, "c3": 1, "c7": 1}, [], "did not reply"),
        ({"c0": float("inf"), "c1": 1, "c2": 1, "c3": 1, "c4": 1}, [], "finite"),
        ({"c0": 2e6, "c1": 1, "c2": 1, "c3": 1, "c4": 1}, [], "finite"),
        ({"c0": -0.1, "c1": 1, "c2": 1, "c3": 1, "c4": 1}, [], "finite"),
        ({"c0": 1, "c1": 1}, [], "no weight"),
        ({f"c{i}": 0 for i in range(5)}, [], "every weight is 0"),
        (
            {f"c{i}": 1 for i in range(5)},
            [{"id": "c0", "kind": "malicious", "reason": "r"}],
            "both weighted and flagged",
        ),
        (
            {"c0": 1, "c1": 1, "c2": 1, "c3": 1, "c4": 1},
            [{"id": "c8", "kind": "straggler", "reason": "r"}],
            "did not reply",
        ),
    ],
)
def test_bad_aggregate_answers(
    weights: dict[str, float], flags: list[dict[str, str]], words: str
) -> None:
    with pytest.raises(InvalidAnswer, match=words) as e:
        parse_answer(aggregate_answer(weights, flags), aggregate_obs())
    assert e.value.kind == "invalid"


def test_flagged_reply_with_zero_weight_is_accepted() -> None:
    obs = aggregate_obs()
    text = aggregate_answer(
        {"c0": 0, "c1": 1, "c2": 1, "c3": 1, "c4": 1},
        [{"id": "c0", "kind": "malicious", "reason": "cosine far below"}],
    )

    decision = guard(to_decision(parse_answer(text, obs), obs), obs).decision

    assert "c0" not in decision.weights
    assert [f.id for f in decision.flags] == ["c0"]


def test_schema_lists_ids_as_enum_and_limits_as_bounds() -> None:
    obs = train_obs()

    schema = answer_schema(obs, ["c1", "c2"])

    props = schema["properties"]
    assert props["selected"]["items"]["enum"] == ["c1", "c2"]
    assert (props["selected"]["minItems"], props["selected"]["maxItems"]) == (2, 5)
    alloc = props["allocations"]["items"]["properties"]
    assert alloc["local_epochs"]["maximum"] == obs.limits.max_epochs
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(props)
