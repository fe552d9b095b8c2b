"""The brain of the agent strategy, independent of Flower.

Observations in, decisions out: :class:`Observation`, :class:`Decision`, the
:class:`Policy` protocol, the :class:`DeterministicPolicy` and :func:`guard`.
"""

from .deterministic import DeterministicPolicy
from .guard import Guarded, GuardError, cap_weights, guard
from .policy import Policy
from .types import (
    Allocation,
    ClientState,
    Decision,
    Flag,
    Limits,
    Observation,
    ReplyFeatures,
)

__all__ = [
    "Allocation",
    "ClientState",
    "Decision",
    "DeterministicPolicy",
    "Flag",
    "GuardError",
    "Guarded",
    "Limits",
    "Observation",
    "Policy",
    "ReplyFeatures",
    "cap_weights",
    "guard",
]
