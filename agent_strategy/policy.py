"""The one protocol every policy implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .types import Decision, Observation


@runtime_checkable
class Policy(Protocol):
    """Map an :class:`Observation` to a :class:`Decision`.

    Implementations must be deterministic given the observation (and their own
    construction-time seed) so that a run can be replayed, and must never raise for a
    well-formed observation: a policy that can fail (an LLM) wraps a fallback policy.
    """

    name: str

    def decide(self, obs: Observation) -> Decision:
        """Return the decision for ``obs`` (see ``Observation.phase``)."""
        ...
