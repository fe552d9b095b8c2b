"""The planner: an experiment plan of phases that re-plans on monitor events.

Phases, by round: ``warmup`` (the first ``warmup_rounds``: broad exploration),
``exploit`` (agent selection as configured), ``finetune`` (the last
``finetune_rounds``: half the learning rate). The plan is a frozen :class:`Plan` of
numbers and names that the server applies to the strategy (default epochs and lr,
the guard's lr range and weight limits) and shows to the policy in every
``Observation`` (``plan`` and ``plan_reason``). Re-planning on events:

=================== ============================================================
``plateau``         one more default local epoch (up to the guard's maximum);
                    at the maximum, the learning rate times ``lr_backoff``
``divergence``      roll back to the last good checkpoint (the best accuracy so
                    far), learning rate (and its guard range) times
                    ``lr_backoff``, no client above the default learning rate
                    (``lr_cap``), ``max_weight_share`` times 0.75; at most
                    ``max_rollbacks`` rollbacks, then only the tightening
``suspected_attack`` ``weight_trust`` and ``max_weight_share`` times 0.75
``straggler_storm`` one default local epoch fewer
``target_reached``  stop early
``budget_exhausted`` stop early
=================== ============================================================

Everything here is plain Python over numbers; the planner is checkpointed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from agent_strategy.types import PlanReason

from .topics import MonitorEvent, PlanChange, RoundReport

PhaseName = Literal["warmup", "exploit", "finetune"]


@dataclass(frozen=True)
class PlannerSettings:
    """Phases, bounds and re-planning factors (from ``planner.*`` config keys)."""

    num_rounds: int
    base_epochs: int
    min_epochs: int
    max_epochs: int
    base_max_weight_share: float
    base_weight_trust: float
    base_exploration: float
    warmup_rounds: int = 0
    finetune_rounds: int = 0
    warmup_exploration: float = 0.5
    lr_backoff: float = 0.5
    max_rollbacks: int = 3
    min_weight_share: float = 0.05


@dataclass(frozen=True)
class Plan:
    """The current plan: what the strategy applies and the policy sees."""

    phase: PhaseName = "exploit"
    reason: PlanReason = "start"
    since_round: int = 0
    replans: int = 0
    local_epochs: int = 1
    lr_scale: float = 1.0
    lr_cap: float | None = None
    max_weight_share: float = 0.5
    weight_trust: float = 3.0
    exploration: float = 0.2
    rollback_to: int | None = None
    stop: bool = False

    def label(self) -> str:
        """Return the short plan name shown to the policy (``[a-z0-9_-]``)."""
        return f"{self.phase}-{self.reason}".replace("_", "-")


def phase_of(server_round: int, s: PlannerSettings) -> PhaseName:
    """Return the phase round ``server_round`` belongs to."""
    if server_round <= s.warmup_rounds:
        return "warmup"
    if server_round > s.num_rounds - s.finetune_rounds:
        return "finetune"
    return "exploit"


def replan(plan: Plan, event: MonitorEvent, s: PlannerSettings, good: int) -> Plan:
    """Return the plan after ``event`` (pure); ``good`` is the last good round."""
    p, r = plan, event.round
    upd: dict[str, Any] = {"reason": event.kind, "since_round": r}
    if event.kind == "plateau":
        if p.local_epochs < s.max_epochs:
            upd["local_epochs"] = p.local_epochs + 1
        else:
            upd["lr_scale"] = p.lr_scale * s.lr_backoff
    elif event.kind == "divergence":
        if 0 <= good < r:
            upd["rollback_to"] = good
        upd["lr_scale"] = p.lr_scale * s.lr_backoff
        upd["lr_cap"] = 1.0
        upd["max_weight_share"] = max(s.min_weight_share, p.max_weight_share * 0.75)
    elif event.kind == "suspected_attack":
        upd["weight_trust"] = max(1.0, p.weight_trust * 0.75)
        upd["max_weight_share"] = max(s.min_weight_share, p.max_weight_share * 0.75)
    elif event.kind == "straggler_storm":
        upd["local_epochs"] = max(s.min_epochs, p.local_epochs - 1)
    elif event.kind in ("target_reached", "budget_exhausted"):
        upd["stop"] = True
    upd["replans"] = p.replans + 1
    return dataclasses.replace(p, **upd)


class Planner:
    """Holds the plan; re-plans on events and moves between phases.

    Call :meth:`on_event` for each monitor event of a round, then :meth:`on_round`
    with the round's report; :meth:`take_changes` returns the :class:`PlanChange`
    values to publish. A pending rollback is read (and cleared) with
    :meth:`take_rollback`.
    """

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = s = settings
        self.plan = Plan(
            phase=phase_of(1, s),
            local_epochs=s.base_epochs,
            max_weight_share=s.base_max_weight_share,
            weight_trust=s.base_weight_trust,
            exploration=s.warmup_exploration
            if phase_of(1, s) == "warmup"
            else s.base_exploration,
        )
        self.best_round = -1
        self.best_accuracy = -math.inf
        self.rollbacks = 0
        self.diverged_round = -1
        self.log: list[dict[str, Any]] = []
        self._changes: list[PlanChange] = []

    @property
    def stop_requested(self) -> bool:
        """Return True once the plan says the run should end."""
        return self.plan.stop

    def pinned_rounds(self) -> list[int]:
        """Return the checkpoint rounds a rollback may need."""
        return [self.best_round] if self.best_round >= 0 else []

    def on_event(self, event: MonitorEvent) -> None:
        """Re-plan after one monitor event."""
        if event.kind == "divergence":
            self.diverged_round = event.round
        before = self.plan
        can_roll = self.rollbacks < self.settings.max_rollbacks
        plan = replan(
            dataclasses.replace(before, rollback_to=None),
            event,
            self.settings,
            self.best_round if can_roll else -1,
        )
        if plan.rollback_to is not None:
            self.rollbacks += 1
        self._set(plan, event.round, f"{event.kind}: {event.detail}")

    def on_round(self, report: RoundReport) -> None:
        """Track the last good round and move to the round's next phase."""
        r, acc = report.round, report.record.accuracy
        if (
            r != self.diverged_round
            and math.isfinite(acc)
            and math.isfinite(report.record.loss)
            and acc > self.best_accuracy
        ):
            self.best_round, self.best_accuracy = r, acc
        nxt = phase_of(r + 1, self.settings)
        if nxt != self.plan.phase and r < self.settings.num_rounds:
            s = self.settings
            upd: dict[str, Any] = {
                "phase": nxt,
                "reason": "phase",
                "since_round": r,
                "replans": self.plan.replans + 1,
                "exploration": s.warmup_exploration
                if nxt == "warmup"
                else s.base_exploration,
            }
            if nxt == "finetune":
                upd["lr_scale"] = self.plan.lr_scale * 0.5
            self._set(dataclasses.replace(self.plan, **upd), r, f"phase {nxt}")

    def take_rollback(self) -> int | None:
        """Return the round to roll back to (once), or None."""
        target = self.plan.rollback_to
        if target is not None:
            self.plan = dataclasses.replace(self.plan, rollback_to=None)
        return target

    def take_changes(self) -> list[PlanChange]:
        """Return the plan changes since the last call."""
        out, self._changes = self._changes, []
        return out

    def _set(self, plan: Plan, server_round: int, why: str) -> None:
        old = dataclasses.asdict(self.plan)
        self.plan = plan
        diff = {
            k: v
            for k, v in dataclasses.asdict(plan).items()
            if old.get(k) != v and k not in ("reason", "since_round", "replans")
        }
        change = PlanChange(
            round=server_round, phase=plan.phase, reason=why, changes=diff
        )
        self.log.append(dataclasses.asdict(change))
        self._changes.append(change)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Return the plan and bookkeeping (checkpoint part ``planner``)."""
        return {
            "plan": dataclasses.asdict(self.plan),
            "best_round": self.best_round,
            "best_accuracy": self.best_accuracy,
            "rollbacks": self.rollbacks,
            "diverged_round": self.diverged_round,
            "log": list(self.log),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.plan = Plan(**state["plan"])
        self.best_round = int(state["best_round"])
        self.best_accuracy = float(state["best_accuracy"])
        self.rollbacks = int(state["rollbacks"])
        self.diverged_round = int(state["diverged_round"])
        self.log = list(state["log"])
