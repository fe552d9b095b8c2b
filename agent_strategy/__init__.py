"""The brain of the agent strategy, independent of Flower.

Observations in, decisions out: :class:`Observation`, :class:`Decision`, the
:class:`Policy` protocol, the :class:`DeterministicPolicy` and :func:`guard`.
"""

from .detection import DetectionParams, detect
from .deterministic import DeterministicPolicy
from .guard import Guarded, GuardError, cap_weights, guard
from .policy import Policy
from .reputation import ReputationParams, is_excluded, next_state
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
    "DetectionParams",
    "DeterministicPolicy",
    "Flag",
    "GuardError",
    "Guarded",
    "Limits",
    "Observation",
    "Policy",
    "ReplyFeatures",
    "ReputationParams",
    "cap_weights",
    "detect",
    "guard",
    "is_excluded",
    "next_state",
]
