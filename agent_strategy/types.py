"""Frozen, typed values that cross the policy boundary: observations and decisions.

A policy (deterministic, or an LLM through litellm) sees an :class:`Observation` and
answers a :class:`Decision`. Both are pydantic models so the LLM can be shown the exact
JSON schema and its answer parsed and validated against it. Client ids are opaque
(``c0``, ``c1``, ...): the server maps them to Flower node ids, and no string a client
sends ever reaches an observation.

One round asks the policy twice:

* ``phase="train"``: before training, choose ``selected`` clients and an
  ``allocations`` entry for each (local epochs, learning rate, compression, deadline);
* ``phase="aggregate"``: after the replies arrive, with one :class:`ReplyFeatures` per
  accepted reply, choose ``weights`` and ``flags`` (stragglers, faulty, malicious).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["train", "aggregate"]
FlagKind = Literal["straggler", "faulty", "malicious"]
# Compression and AggregationRule are repeated in orchestration.config (the
# ClientApp imports that, never this package); tests/test_config.py keeps them equal.
Compression = Literal["none", "q8", "q4", "topk", "topk_q8"]
DecisionSource = Literal["deterministic", "llm", "fallback"]
PlanReason = Literal[
    "start",
    "phase",
    "plateau",
    "divergence",
    "suspected_attack",
    "straggler_storm",
    "target_reached",
    "budget_exhausted",
]

AggregationRule = Literal["weighted", "trimmed", "median", "krum"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClientState(_Frozen):
    """What the server knows about one client, in numbers only."""

    id: str = Field(pattern=r"^c\d+$")
    num_examples: int = Field(0, ge=0, description="training examples last reported")
    rounds_selected: int = Field(0, ge=0)
    rounds_accepted: int = Field(0, ge=0)
    last_selected_round: int = Field(0, ge=0, description="0 = never selected")
    last_loss: float | None = Field(None, description="last reported training loss")
    last_duration_s: float | None = Field(None, ge=0)
    epoch_s: float | None = Field(
        None, ge=0, description="compute seconds per local epoch, last measured"
    )
    comm_s: float | None = Field(
        None, ge=0, description="seconds to download and upload the model"
    )
    failures: int = Field(0, ge=0, description="error or rejected replies so far")
    times_flagged: int = Field(0, ge=0)
    reputation: float = Field(
        1.0, ge=0, le=1, description="1 = trusted; falls with flags and rejections"
    )
    consecutive_flags: int = Field(0, ge=0, description="flags or rejections in a row")
    excluded_until: int = Field(
        0, ge=0, description="not selectable up to this round; 0 = never excluded"
    )
    times_excluded: int = Field(0, ge=0)


class ReplyFeatures(_Frozen):
    """Server-measured features of one accepted reply (aggregate phase only)."""

    id: str = Field(pattern=r"^c\d+$")
    num_examples: int = Field(ge=1)
    registered_examples: int | None = Field(
        None,
        ge=1,
        description="training examples the client registered at roll call (not "
        "this reply's report); None: unknown, the reported count stands in",
    )
    train_loss: float
    duration_s: float = Field(ge=0)
    update_norm: float = Field(ge=0, description="L2 norm of (new - global)")
    cosine_to_median: float | None = Field(
        ge=-1.0,
        le=1.0,
        description="cosine of the update to the coordinate median; None: not "
        "measured (no policy of the run uses it)",
    )
    krum_ratio: float | None = Field(
        1.0,
        ge=0,
        description="Krum score / the round's median Krum score; None: not measured",
    )
    distance_rank: int | None = Field(
        1, ge=1, description="1 = most central update (lowest Krum score)"
    )
    duplicates: int | None = Field(
        0, ge=0, description="other replies of this round with an identical update"
    )
    checked_loss: float | None = Field(
        None,
        ge=0,
        description="cross-entropy of global + this update on the server's own "
        "validation set; None: not checked (defense.loss_check_examples=0)",
    )
    checked_accuracy: float | None = Field(
        None, ge=0, le=1, description="accuracy of global + this update there"
    )
    checked_top_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of the server's validation examples that global + this "
        "update assigns to its most-predicted class (near 1: a collapsed model)",
    )
    loss_gap: float | None = Field(
        None, description="checked_loss - train_loss (server's minus reported)"
    )


class Limits(_Frozen):
    """Hard limits shown to the policy and enforced by :func:`guard`."""

    min_clients: int = Field(ge=1)
    max_clients: int = Field(ge=1)
    min_epochs: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    lr_min: float = Field(gt=0)
    lr_max: float = Field(gt=0)
    max_weight_share: float = Field(gt=0, le=1)
    deadline_s: float = Field(gt=0)
    weight_trust: float = Field(
        3.0, ge=1, description="a weight is at most this times its examples share"
    )
    max_staleness: int = Field(
        0, ge=0, description="clients unselected for more rounds are added; 0 = off"
    )
    max_flag_share: float = Field(
        1.0, gt=0, le=1, description="largest share of a round's replies flagged"
    )
    rules: tuple[AggregationRule, ...] = Field(
        ("weighted", "trimmed", "median", "krum"),
        min_length=1,
        description="aggregation rules allowed; any other choice becomes the first",
    )
    codecs: tuple[Compression, ...] = Field(
        (),
        description="upload codecs allowed besides the run's default "
        "(Observation.default_compression); any other choice becomes the default",
    )


class Observation(_Frozen):
    """Everything a policy may base a decision on."""

    phase: Phase
    round: int = Field(ge=1)
    num_rounds: int = Field(ge=1)
    target_clients: int = Field(ge=1, description="clients wanted this round")
    default_epochs: int = Field(ge=1)
    default_lr: float = Field(gt=0)
    default_compression: Compression = Field(
        "none", description="upload codec of the run's default allocation"
    )
    topk_fraction: float = Field(
        0.01,
        gt=0,
        le=1,
        description="share of entries the top-k codecs keep (their upload size)",
    )
    limits: Limits
    clients: tuple[ClientState, ...]
    replies: tuple[ReplyFeatures, ...] = ()
    plan: str = Field("default", description="the current phase of the plan")
    plan_reason: PlanReason | None = Field(
        None, description="why the plan last changed (orchestration.planner)"
    )
    plan_since_round: int | None = Field(None, ge=0, description="when it changed")
    last_accuracy: float | None = None


class Allocation(_Frozen):
    """Resources given to one selected client for this round."""

    local_epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    compression: Compression = "none"
    deadline_s: float = Field(gt=0)


class Flag(_Frozen):
    """A client marked as late, faulty or malicious, with the reason why."""

    id: str = Field(pattern=r"^c\d+$")
    kind: FlagKind
    reason: str = Field(max_length=300)


class Decision(_Frozen):
    """A policy's answer; which fields matter depends on the observation's phase."""

    selected: tuple[str, ...] = ()
    allocations: dict[str, Allocation] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)
    flags: tuple[Flag, ...] = ()
    aggregation: AggregationRule = Field(
        "weighted", description="robust rule combined with the weights (aggregate)"
    )
    rationale: str = Field("", max_length=2000)
    source: DecisionSource = "deterministic"
