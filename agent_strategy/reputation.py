"""Per-client reputation across rounds: exclusion after repeated flags, readmission.

A pure state transition on :class:`~agent_strategy.ClientState`, applied by the
strategy once per round to every client that replied:

* a *bad* round (the reply was rejected, or flagged ``malicious``)
  halves the reputation (``penalty``) and counts a consecutive flag; after
  ``exclude_after`` in a row the client is excluded (not selectable) for
  ``probation_rounds * 2 ** (times_excluded - 1)`` rounds;
* a *good* round (accepted, unflagged) recovers ``recovery`` of the lost reputation
  and resets the consecutive count.

A reply flagged ``faulty`` (a broken, not a malicious, update) is dropped from the
aggregate and the strategy applies no transition for it: neither bad nor good.

An excluded client is readmitted when its exclusion ends, on probation: its
consecutive count stays at ``exclude_after - 1``, so one more bad round excludes it
again (for twice as long), while one good round clears it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import ClientState

_MAX_EXCLUSION = 1_000_000


@dataclass(frozen=True)
class ReputationParams:
    """How fast reputation falls and recovers, and when a client is excluded."""

    exclude_after: int = 2
    probation_rounds: int = 5
    penalty: float = 0.5
    recovery: float = 0.25

    def __post_init__(self) -> None:
        if self.exclude_after < 1 or self.probation_rounds < 1:
            raise ValueError("exclude_after and probation_rounds must be >= 1")
        if not 0 < self.penalty <= 1 or not 0 <= self.recovery <= 1:
            raise ValueError("penalty must be in (0, 1], recovery in [0, 1]")


def is_excluded(state: ClientState, round_: int) -> bool:
    """Return whether the client may not be selected in ``round_``."""
    return state.excluded_until >= round_


def next_state(
    state: ClientState, *, round_: int, bad: bool, params: ReputationParams
) -> ClientState:
    """Return ``state`` after one replied round that was ``bad`` (or good).

    Parameters
    ----------
    state : ClientState
        The client before the round.
    round_ : int
        The round just finished (exclusion starts after it).
    bad : bool
        The reply was rejected or flagged malicious.
    params : ReputationParams
        The transition's constants.
    """
    if not bad:
        rep = state.reputation + params.recovery * (1.0 - state.reputation)
        return state.model_copy(
            update={"reputation": min(rep, 1.0), "consecutive_flags": 0}
        )
    rep = state.reputation * (1.0 - params.penalty)
    streak = state.consecutive_flags + 1
    update: dict[str, object] = {"reputation": rep, "consecutive_flags": streak}
    if streak >= params.exclude_after:
        times = state.times_excluded + 1
        length = min(params.probation_rounds * 2 ** (times - 1), _MAX_EXCLUSION)
        update.update(
            times_excluded=times,
            excluded_until=round_ + length,
            consecutive_flags=params.exclude_after - 1,
        )
    return state.model_copy(update=update)
