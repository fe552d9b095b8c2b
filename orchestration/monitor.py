"""The monitor: turns the stream of round reports into events (pure logic).

:func:`detect` is a pure function of the metric history and the thresholds;
:class:`Monitor` only keeps that history (and which one-off events already fired)
and is checkpointed with the run. Events:

``divergence``
    a non-finite loss or accuracy; accuracy more than ``collapse_drop`` below the
    best so far; or the loss rising for ``divergence_window`` rounds in a row to
    more than 1.5 times its best.
``plateau``
    the best accuracy improved by less than ``plateau_delta`` over the last
    ``plateau_window`` rounds (then the window restarts).
``suspected_attack``
    at least ``attack_flag_share`` of the round's replies were flagged.
``straggler_storm``
    at least ``storm_failure_share`` of the selected clients failed or were late.
``target_reached``
    accuracy at or above ``target_accuracy`` (once).
``budget_exhausted``
    bytes, LLM cost or wall time at or above their budgets (once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .topics import EventKind, MonitorEvent, RoundReport


@dataclass(frozen=True)
class Thresholds:
    """When the monitor raises each event; 0 disables a target or budget."""

    plateau_window: int = 5
    plateau_delta: float = 0.002
    divergence_window: int = 3
    collapse_drop: float = 0.2
    attack_flag_share: float = 0.3
    storm_failure_share: float = 0.5
    target_accuracy: float = 0.0
    budget_bytes: int = 0
    budget_llm_cost_usd: float = 0.0
    budget_wall_s: float = 0.0


@dataclass
class History:
    """What the monitor remembers between rounds (checkpointed)."""

    rounds: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    bytes_total: int = 0
    wall_total_s: float = 0.0
    plateau_start: int = 0
    fired: list[str] = field(default_factory=list)


def _event(r: int, kind: EventKind, value: float, detail: str) -> MonitorEvent:
    return MonitorEvent(round=r, kind=kind, value=value, detail=detail)


def detect(h: History, rep: RoundReport, t: Thresholds) -> list[MonitorEvent]:
    """Return the events of round ``rep`` given the history *before* it (pure)."""
    rec, r = rep.record, rep.round
    events: list[MonitorEvent] = []
    finite = [a for a in h.accuracy if math.isfinite(a)]
    best_acc = max(finite, default=-math.inf)
    best_loss = min((x for x in h.loss if math.isfinite(x)), default=math.inf)
    if not (math.isfinite(rec.loss) and math.isfinite(rec.accuracy)):
        events.append(_event(r, "divergence", rec.loss, "non-finite loss/accuracy"))
    elif rec.accuracy < best_acc - t.collapse_drop:
        events.append(
            _event(
                r,
                "divergence",
                rec.accuracy,
                f"accuracy collapse: {rec.accuracy:.4f} < best {best_acc:.4f} - "
                f"{t.collapse_drop:g}",
            )
        )
    else:
        w = t.divergence_window
        losses = [*h.loss[-w:], rec.loss]
        rising = len(losses) == w + 1 and all(
            b > a for a, b in zip(losses, losses[1:], strict=False)
        )
        if rising and rec.loss > 1.5 * best_loss:
            events.append(
                _event(r, "divergence", rec.loss, f"loss rising for {w} rounds")
            )
    if not events and len(h.accuracy) - h.plateau_start >= t.plateau_window:
        before = h.accuracy[: len(h.accuracy) - t.plateau_window + 1]
        base = max((a for a in before if math.isfinite(a)), default=-math.inf)
        gain = max(rec.accuracy, best_acc) - base
        if gain < t.plateau_delta:
            events.append(
                _event(
                    r,
                    "plateau",
                    gain,
                    f"best accuracy +{gain:.4f} over {t.plateau_window} rounds",
                )
            )
    replies = rec.accepted + rec.flagged
    if replies and rec.flagged / replies >= t.attack_flag_share:
        share = rec.flagged / replies
        events.append(_event(r, "suspected_attack", share, "flagged share"))
    if rec.selected and rec.failures / rec.selected >= t.storm_failure_share:
        share = rec.failures / rec.selected
        events.append(_event(r, "straggler_storm", share, "failed share"))
    if (
        t.target_accuracy > 0
        and "target_reached" not in h.fired
        and rec.accuracy >= t.target_accuracy
    ):
        events.append(_event(r, "target_reached", rec.accuracy, "accuracy target"))
    if "budget_exhausted" not in h.fired:
        used = {
            "bytes": (h.bytes_total + rec.bytes_up + rec.bytes_down, t.budget_bytes),
            "llm_cost_usd": (rep.llm_cost_usd, t.budget_llm_cost_usd),
            "wall_s": (h.wall_total_s + rec.wall_s, t.budget_wall_s),
        }
        for name, (value, cap) in used.items():
            if cap > 0 and value >= cap:
                events.append(
                    _event(r, "budget_exhausted", float(value), f"{name} budget")
                )
                break
    return events


class Monitor:
    """Keeps the metric history and returns each round's events."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.history = History()
        self.counts: dict[str, int] = {}

    def observe(self, rep: RoundReport) -> list[MonitorEvent]:
        """Return the events of ``rep`` and add it to the history."""
        if rep.round == 0:
            events: list[MonitorEvent] = []
        else:
            events = detect(self.history, rep, self.thresholds)
        h, rec = self.history, rep.record
        h.rounds.append(rec.round)
        h.accuracy.append(rec.accuracy)
        h.loss.append(rec.loss)
        h.bytes_total += rec.bytes_up + rec.bytes_down
        h.wall_total_s += rec.wall_s
        for e in events:
            self.counts[e.kind] = self.counts.get(e.kind, 0) + 1
            if e.kind in ("target_reached", "budget_exhausted"):
                h.fired.append(e.kind)
            if e.kind in ("plateau", "divergence"):
                h.plateau_start = len(h.accuracy) - 1
        return events

    def state_dict(self) -> dict[str, Any]:
        """Return the history and counters (checkpoint part ``monitor``)."""
        h = self.history
        return {
            "rounds": list(h.rounds),
            "accuracy": list(h.accuracy),
            "loss": list(h.loss),
            "bytes_total": h.bytes_total,
            "wall_total_s": h.wall_total_s,
            "plateau_start": h.plateau_start,
            "fired": list(h.fired),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        s = dict(state)
        self.counts = dict(s.pop("counts", {}))
        self.history = History(**s)
