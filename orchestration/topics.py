"""Typed messages that travel over the comm hub (:mod:`orchestration.hub`).

Each class is one topic: a subscriber names the class it wants, and the hub routes a
published value by its type. Values are frozen; the only mutable thing a report
carries is a reference to the round's global model (``arrays``), which nobody
modifies after the round ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

EventKind = Literal[
    "plateau",
    "divergence",
    "suspected_attack",
    "straggler_storm",
    "target_reached",
    "budget_exhausted",
]


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``results.jsonl`` (round 0 is the initial model)."""

    round: int
    accuracy: float
    loss: float
    selected: int
    accepted: int
    flagged: int
    failures: int
    source: str
    wall_s: float
    bytes_up: int
    bytes_down: int
    sim_time_s: float | None = None
    epsilon_max: float | None = None  # DP: cumulative epsilon (max / mean over
    epsilon_mean: float | None = None  # the clients that reported one); else None
    failed: bool = False  # too few usable replies: the global model was kept
    failure_reason: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # e.g. client evaluation

    def as_dict(self) -> dict[str, Any]:
        """Return the record as the JSON object written to ``results.jsonl``.

        Optional fields that are unset (``sim_time_s`` without simulated devices)
        are left out; the ``extra`` metrics are written as top-level keys.
        """
        row = {k: v for k, v in asdict(self).items() if v is not None}
        return {**row, **row.pop("extra")}


@dataclass(frozen=True)
class RoundReport:
    """Published once per round, after central evaluation.

    Parameters
    ----------
    record : RoundRecord
        The round's results line.
    num_rounds : int
        Rounds the run has in total.
    first_round : int
        First round this process ran (``> 1`` after a resume), for the ETA.
    elapsed_s : float
        Seconds since this process started its first round.
    arrays : Any
        The global model after the round (a Flower ``ArrayRecord``); read-only.
    llm_cost_usd : float
        LLM spending of the run so far (0 without an LLM).
    """

    record: RoundRecord
    num_rounds: int
    first_round: int = 1
    elapsed_s: float = 0.0
    arrays: Any = None
    llm_cost_usd: float = 0.0

    @property
    def round(self) -> int:
        """Return the round number."""
        return self.record.round

    def eta_s(self) -> float:
        """Return the estimated seconds left, from this process's mean round time."""
        done = self.record.round - self.first_round + 1
        if done <= 0:
            return 0.0
        return self.elapsed_s / done * (self.num_rounds - self.record.round)


@dataclass(frozen=True)
class MonitorEvent:
    """Something the monitor noticed in the stream of round reports."""

    round: int
    kind: EventKind
    value: float
    detail: str = ""


@dataclass(frozen=True)
class PlanChange:
    """The planner changed the plan (phase, settings, rollback or stop)."""

    round: int
    phase: str
    reason: str
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint was written."""

    round: int
    path: str
    bytes: int
    seconds: float
