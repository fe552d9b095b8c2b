"""The LLM's answer per phase: JSON schema, parsing, semantic validation, conversion.

The LLM answers one JSON object. Its schema (:func:`answer_schema`) lists client ids as
an ``enum`` where the backend can enforce it, but grammars do not enforce numeric
bounds and many servers enforce nothing, so :func:`parse_answer` checks everything
again and raises :class:`InvalidAnswer` with a short reason. Ids, weights and flags are
lists of objects rather than maps: every provider's structured-output mode accepts that
shape (OpenAI's strict mode forbids free-form maps). A map shape
(``{"c1": 0.5}``) is still accepted when parsing, for lenient models.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..codecs import allowed_codecs
from ..types import (
    AggregationRule,
    Allocation,
    Compression,
    Decision,
    Flag,
    Observation,
)

AnswerKind = Literal["parse", "schema", "invalid"]
MAX_WEIGHT = 1e6
"""Largest raw weight accepted; weights are shares once normalised."""
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class InvalidAnswer(ValueError):
    """The LLM's answer cannot be used.

    Parameters
    ----------
    reason : str
        What is wrong, short enough for one log line.
    kind : {"parse", "schema", "invalid"}
        ``parse``: no JSON object found; ``schema``: the JSON does not have the answer's
        shape; ``invalid``: well-formed but semantically wrong (unknown ids, bad
        counts, non-finite weights, ...).
    """

    def __init__(self, reason: str, kind: AnswerKind = "invalid") -> None:
        super().__init__(f"{kind}: {reason}")
        self.reason = reason
        self.kind: AnswerKind = kind


# ---------------------------------------------------------------------- models
class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AllocationAnswer(_Answer):
    """Local epochs, learning rate and optionally the upload codec of one client.

    ``compression`` is one of the codec names (case and surrounding blanks ignored);
    ``None`` (absent or ``null``) leaves the codec to the fallback policy. Whether the
    codec is *allowed* (:func:`~agent_strategy.codecs.allowed_codecs`) is the guard's
    check, not the parser's.
    """

    id: str
    local_epochs: int
    lr: float
    compression: Compression | None = None

    @field_validator("compression", mode="before")
    @classmethod
    def _codec_name(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


class FlagAnswer(_Answer):
    """A client the LLM marks as late, faulty or malicious."""

    id: str
    kind: Literal["straggler", "faulty", "malicious"]
    reason: str = ""


class WeightAnswer(_Answer):
    """The aggregation weight of one reply (normalised later)."""

    id: str
    weight: float


def _from_map(value: Any, key: str) -> Any:
    """Turn ``{"c1": x}`` into ``[{"id": "c1", key: x}]`` (or merge a dict ``x``)."""
    if not isinstance(value, dict):
        return value
    items = []
    for cid, v in value.items():
        items.append({"id": cid, **v} if isinstance(v, dict) else {"id": cid, key: v})
    return items


class TrainAnswer(_Answer):
    """The train-phase answer: whom to train, with which epochs and learning rate."""

    selected: list[str]
    allocations: list[AllocationAnswer] = Field(default_factory=list)
    flags: list[FlagAnswer] = Field(default_factory=list)
    rationale: str = ""

    @field_validator("allocations", mode="before")
    @classmethod
    def _allocations_map(cls, v: Any) -> Any:
        return _from_map(v, "local_epochs")


class AggregateAnswer(_Answer):
    """The aggregate-phase answer: weights, flags and optionally the robust rule.

    ``aggregation`` is one of the rule names (case and surrounding blanks ignored);
    ``None`` (absent or ``null``) leaves the rule to the fallback policy. Whether the
    rule is *allowed* (``limits.rules``) is the guard's check, not the parser's.
    """

    weights: list[WeightAnswer]
    flags: list[FlagAnswer] = Field(default_factory=list)
    aggregation: AggregationRule | None = None
    rationale: str = ""

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_map(cls, v: Any) -> Any:
        return _from_map(v, "weight")

    @field_validator("aggregation", mode="before")
    @classmethod
    def _rule_name(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v


# ---------------------------------------------------------------------- schema
def _id_schema(ids: list[str] | None) -> dict[str, Any]:
    if ids is None:
        return {"type": "string", "pattern": "^c[0-9]+$"}
    return {"type": "string", "enum": list(ids)}


def _flag_schema(ids: list[str] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": _id_schema(ids),
            "kind": {"type": "string", "enum": ["straggler", "faulty", "malicious"]},
            "reason": {"type": "string", "maxLength": 200},
        },
        "required": ["id", "kind", "reason"],
        "additionalProperties": False,
    }


def answer_schema(obs: Observation, ids: list[str] | None = None) -> dict[str, Any]:
    """Return the JSON schema of the answer for ``obs.phase``.

    The aggregate answer has an ``aggregation`` property (one of ``limits.rules``, or
    ``null``) only when the limits allow more than one rule; likewise each train
    allocation has a ``compression`` property (one of
    :func:`~agent_strategy.codecs.allowed_codecs`, or ``null``) only when more than
    one codec is allowed (``compression.adaptive``).

    Parameters
    ----------
    obs : Observation
        Supplies the phase and the limits (selection size, epochs, learning rate).
    ids : list of str or None
        Client ids the answer may name, rendered as an ``enum``; ``None`` renders the
        id pattern instead (shorter, for the prompt text).

    Returns
    -------
    dict
        A schema in the subset every structured-output backend accepts: every
        property required, no additional properties.
    """
    lim = obs.limits
    rationale = {"type": "string", "maxLength": 500}
    if obs.phase == "train":
        alloc: dict[str, Any] = {
            "id": _id_schema(ids),
            "local_epochs": {
                "type": "integer",
                "minimum": lim.min_epochs,
                "maximum": lim.max_epochs,
            },
            "lr": {"type": "number", "minimum": lim.lr_min, "maximum": lim.lr_max},
        }
        codecs = allowed_codecs(obs)
        if len(codecs) > 1:
            # Required but nullable, as the aggregation rule: null keeps the
            # fallback policy's codec. Only the allowed codecs are offered.
            alloc["compression"] = {
                "anyOf": [{"type": "string", "enum": list(codecs)}, {"type": "null"}]
            }
        return {
            "type": "object",
            "properties": {
                "selected": {
                    "type": "array",
                    "items": _id_schema(ids),
                    "minItems": lim.min_clients,
                    "maxItems": lim.max_clients,
                },
                "allocations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": alloc,
                        "required": list(alloc),
                        "additionalProperties": False,
                    },
                },
                "flags": {"type": "array", "items": _flag_schema(ids)},
                "rationale": rationale,
            },
            "required": ["selected", "allocations", "flags", "rationale"],
            "additionalProperties": False,
        }
    properties: dict[str, Any] = {
        "weights": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": _id_schema(ids),
                    "weight": {"type": "number", "minimum": 0},
                },
                "required": ["id", "weight"],
                "additionalProperties": False,
            },
        },
        "flags": {"type": "array", "items": _flag_schema(ids)},
    }
    if len(lim.rules) > 1:
        # Required but nullable (strict modes require every property): null keeps
        # the fallback policy's rule. Only the allowed rules are offered.
        properties["aggregation"] = {
            "anyOf": [{"type": "string", "enum": list(lim.rules)}, {"type": "null"}]
        }
    properties["rationale"] = rationale
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


# ---------------------------------------------------------------------- parsing
def extract_json_object(text: str) -> dict[str, Any]:
    """Return the first JSON object in ``text`` (code fences and prose around it ok).

    Raises
    ------
    InvalidAnswer
        ``kind="parse"`` if no JSON object can be decoded.
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for chunk in candidates:
        start = chunk.find("{")
        while start != -1:
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                start = chunk.find("{", start + 1)
                continue
            if isinstance(obj, dict):
                return obj
            start = chunk.find("{", start + 1)
    snippet = _CONTROL.sub(" ", text[:60])
    raise InvalidAnswer(f"no JSON object in the answer ({snippet!r}...)", "parse")


def parse_answer(text: str, obs: Observation) -> TrainAnswer | AggregateAnswer:
    """Parse and validate the raw answer ``text`` for ``obs``.

    Raises
    ------
    InvalidAnswer
        If the text holds no JSON object, the object has the wrong shape, or the
        answer breaks a rule (see :func:`validate_train`, :func:`validate_aggregate`).
    """
    obj = extract_json_object(text)
    model: type[TrainAnswer] | type[AggregateAnswer] = (
        TrainAnswer if obs.phase == "train" else AggregateAnswer
    )
    try:
        answer = model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidAnswer(
            f"{e.error_count()} schema error(s), first at {where or '<root>'}: "
            f"{first['msg']}",
            "schema",
        ) from e
    if isinstance(answer, TrainAnswer):
        validate_train(answer, obs)
    else:
        validate_aggregate(answer, obs)
    return answer


def _unknown(ids: list[str], known: set[str]) -> list[str]:
    return sorted({i for i in ids if i not in known})[:5]


def _duplicates(ids: list[str]) -> list[str]:
    return sorted(i for i, n in Counter(ids).items() if n > 1)[:5]


def validate_train(answer: TrainAnswer, obs: Observation) -> None:
    """Check a train answer against ``obs``; raise :class:`InvalidAnswer` if wrong.

    Rules: selected ids are known, unique, not flagged, and their number lies within
    ``limits.min_clients..limits.max_clients`` (and at most the eligible clients);
    allocations name selected clients only, once each, with a finite positive ``lr``;
    flags name known clients.
    """
    lim = obs.limits
    known = {c.id for c in obs.clients}
    if bad := _unknown(answer.selected, known):
        raise InvalidAnswer(f"selected unknown client ids {bad}")
    if dup := _duplicates(answer.selected):
        raise InvalidAnswer(f"selected the same clients twice {dup}")
    lo, hi = lim.min_clients, min(lim.max_clients, len(known))
    if not lo <= len(answer.selected) <= hi:
        raise InvalidAnswer(
            f"selected {len(answer.selected)} clients, allowed {lo}..{hi}"
        )
    if bad := _unknown([f.id for f in answer.flags], known):
        raise InvalidAnswer(f"flagged unknown client ids {bad}")
    both = sorted({f.id for f in answer.flags} & set(answer.selected))
    if both:
        raise InvalidAnswer(f"clients both selected and flagged {both[:5]}")
    alloc_ids = [a.id for a in answer.allocations]
    if bad := _unknown(alloc_ids, set(answer.selected)):
        raise InvalidAnswer(f"allocations for clients not selected {bad}")
    if dup := _duplicates(alloc_ids):
        raise InvalidAnswer(f"two allocations for {dup}")
    for a in answer.allocations:
        if not math.isfinite(a.lr) or a.lr <= 0:
            raise InvalidAnswer(f"lr of {a.id} is {a.lr}; must be finite and > 0")


def validate_aggregate(answer: AggregateAnswer, obs: Observation) -> None:
    """Check an aggregate answer against ``obs``; raise :class:`InvalidAnswer` if wrong.

    Rules: weights and flags name replying clients only; weights are unique, finite,
    in ``[0, MAX_WEIGHT]``; every unflagged reply has a weight, no flagged reply has a
    positive one; at least one unflagged reply has a positive weight.
    """
    replies = {r.id for r in obs.replies}
    weight_ids = [w.id for w in answer.weights]
    if bad := _unknown(weight_ids, replies):
        raise InvalidAnswer(f"weights for clients that did not reply {bad}")
    if dup := _duplicates(weight_ids):
        raise InvalidAnswer(f"two weights for {dup}")
    if bad := _unknown([f.id for f in answer.flags], replies):
        raise InvalidAnswer(f"flagged clients that did not reply {bad}")
    for w in answer.weights:
        if not math.isfinite(w.weight) or not 0 <= w.weight <= MAX_WEIGHT:
            raise InvalidAnswer(
                f"weight of {w.id} is {w.weight}; must be finite, "
                f"in [0, {MAX_WEIGHT:g}]"
            )
    flagged = {f.id for f in answer.flags}
    given = {w.id: w.weight for w in answer.weights}
    if both := sorted(i for i in flagged if given.get(i, 0.0) > 0):
        raise InvalidAnswer(f"clients both weighted and flagged {both[:5]}")
    accepted = replies - flagged
    if missing := sorted(accepted - given.keys())[:5]:
        raise InvalidAnswer(f"no weight for unflagged replies {missing}")
    if replies and not accepted:
        raise InvalidAnswer(f"flagged all {len(replies)} replies; nothing to aggregate")
    if accepted and sum(given[i] for i in accepted) <= 0:
        raise InvalidAnswer("every weight is 0")


# ---------------------------------------------------------------------- decision
def clean_text(text: str, limit: int) -> str:
    """Return ``text`` without control characters, cut to ``limit`` characters."""
    return _CONTROL.sub(" ", text).strip()[:limit]


def to_decision(
    answer: TrainAnswer | AggregateAnswer,
    obs: Observation,
    default_rule: AggregationRule | None = None,
    default_codecs: Mapping[str, Compression] | None = None,
) -> Decision:
    """Convert a validated answer into a ``Decision(source="llm")``.

    Selected clients without an allocation get the observation's defaults; every
    allocation gets ``limits.deadline_s``, and the codec the answer gives it, else
    its ``default_codecs`` entry, else the run's default compression. Text is
    stripped of control characters and cut to the decision's length limits.

    Parameters
    ----------
    answer : TrainAnswer or AggregateAnswer
        A validated answer (:func:`parse_answer`).
    obs : Observation
        The observation it answers.
    default_rule : AggregationRule or None
        The aggregation rule when an aggregate answer names none (the fallback
        policy's choice); ``None``: ``limits.rules[0]``. The rationale ends with the
        rule and where it came from (``llm`` or ``default``).
    default_codecs : Mapping or None
        The codec of each client whose allocation names none (the fallback policy's
        choice). When more than one codec is allowed, or the answer names one, the
        train rationale ends with each selected client's codec and where it came
        from (``llm`` or ``default``).
    """
    flags = tuple(
        Flag(id=f.id, kind=f.kind, reason=clean_text(f.reason, 300) or "llm")
        for f in answer.flags
    )
    rationale = clean_text(answer.rationale, 2000)
    if isinstance(answer, TrainAnswer):
        given = {a.id: a for a in answer.allocations}
        defaults = default_codecs or {}
        allocations = {}
        origins: list[str] = []
        for cid in answer.selected:
            a = given.get(cid)
            if a is not None and a.compression is not None:
                codec, origin = a.compression, "llm"
            else:
                codec, origin = defaults.get(cid, obs.default_compression), "default"
            origins.append(f"{cid} {codec} ({origin})")
            allocations[cid] = Allocation(
                local_epochs=max(a.local_epochs, 1) if a else obs.default_epochs,
                lr=a.lr if a else obs.default_lr,
                compression=codec,
                deadline_s=obs.limits.deadline_s,
            )
        named = any(a.compression is not None for a in answer.allocations)
        if len(allowed_codecs(obs)) > 1 or named:
            note = f" [codecs {', '.join(origins)}]"
            rationale = rationale[: max(2000 - len(note), 0)] + note[:2000]
        return Decision(
            selected=tuple(answer.selected),
            allocations=allocations,
            flags=flags,
            rationale=rationale,
            source="llm",
        )
    flagged = {f.id for f in flags}
    weights = {w.id: float(w.weight) for w in answer.weights if w.id not in flagged}
    if answer.aggregation is not None:
        rule, origin = answer.aggregation, "llm"
    else:
        rule, origin = default_rule or obs.limits.rules[0], "default"
    note = f" [rule {rule} ({origin})]"
    return Decision(
        weights=weights,
        flags=flags,
        aggregation=rule,
        rationale=rationale[: 2000 - len(note)] + note,
        source="llm",
    )
