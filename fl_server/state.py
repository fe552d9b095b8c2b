"""Checkpoint parts of the server side: the agent strategy, the LLM policy, RNGs.

Each class adapts one component to the :class:`orchestration.checkpoint.Stateful`
protocol (``state_dict`` / ``load_state_dict``), so the component itself stays free
of checkpoint code. Flower node ids are not saved: they change every run, and a
resumed run's roll call binds the restored clients (``c<partition-id>``) to the new
nodes.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from agent_strategy import ClientState, Limits

from .strategy import AgentStrategy, _Client

if TYPE_CHECKING:
    from agent_strategy.llm import LLMPolicy


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Return ``arrays`` as a name -> numpy array dict (copies)."""
    return {name: np.array(a.numpy(), copy=True) for name, a in arrays.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Invert :func:`arrays_to_numpy` (same names, order, dtypes and bytes)."""
    return ArrayRecord({name: Array(np.asarray(a)) for name, a in arrays.items()})


class StrategyState:
    """Client histories, counters, plan settings and a pending rollback."""

    def __init__(self, strategy: AgentStrategy) -> None:
        self.strategy = strategy

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's state across rounds."""
        s = self.strategy
        pending = s.restore_arrays
        return {
            "clients": {cid: c.state.model_dump() for cid, c in s.clients.items()},
            "registered_examples": {
                cid: c.registered_examples for cid, c in s.clients.items()
            },
            "history": list(s.history),
            "decisions": s.decisions,
            "llm_latencies": list(s.llm_latencies),
            "fallback_reasons": dict(s.fallback_reasons),
            "total_fallbacks": s.total_fallbacks,
            "total_failures": s.total_failures,
            "last_accuracy": s._last_accuracy,
            "local_epochs": s.local_epochs,
            "lr": s.lr,
            "limits": s.limits.model_dump(),
            "plan": dict(s.plan),
            "restore_arrays": None if pending is None else arrays_to_numpy(pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state; clients wait for the roll call to get a node."""
        s = self.strategy
        registered = state.get("registered_examples", {})
        s.clients = {
            cid: _Client(
                node_id=-1,
                state=ClientState.model_validate(st),
                registered_examples=int(registered.get(cid, 0)),
            )
            for cid, st in state["clients"].items()
        }
        s.history = list(state.get("history", []))
        s.decisions = int(state["decisions"])
        s.llm_latencies = list(state["llm_latencies"])
        s.fallback_reasons = dict(state["fallback_reasons"])
        s.total_fallbacks = int(state["total_fallbacks"])
        s.total_failures = int(state["total_failures"])
        s.set_last_accuracy(state["last_accuracy"])
        s.local_epochs = int(state["local_epochs"])
        s.lr = float(state["lr"])
        s.limits = Limits.model_validate(state["limits"])
        s.plan = dict(state["plan"])
        pending = state["restore_arrays"]
        s.restore_arrays = None if pending is None else numpy_to_arrays(pending)


class LLMState:
    """The LLM policy's history shown in prompts, budget spent and breaker."""

    def __init__(self, llm: LLMPolicy) -> None:
        self.llm = llm

    def state_dict(self) -> dict[str, Any]:
        """Return history, budget and counters."""
        m = self.llm
        return {
            "history": [asdict(h) for h in m.history],
            "budget": m.budget.state_dict(),
            "calls": m.calls,
            "fallbacks": dict(m.fallbacks),
            "corrections": dict(m.corrections),
            "unavailable": m.unavailable,
            "consecutive_failures": m._consecutive_failures,
            "paused_until": m._paused_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; the budget continues with what was left."""
        from agent_strategy.llm import Budget, RoundSummary

        m = self.llm
        m.history.clear()
        for h in state["history"]:
            m.history.append(RoundSummary(**h))
        m.budget = Budget.from_state_dict(state["budget"])
        m.calls = int(state["calls"])
        m.fallbacks.clear()
        m.fallbacks.update(state["fallbacks"])
        m.corrections.clear()
        m.corrections.update(state.get("corrections", {}))
        m.unavailable = state["unavailable"]
        m._consecutive_failures = int(state["consecutive_failures"])
        m._paused_until = state["paused_until"]


class RngState:
    """The global RNGs of the server process: ``random``, numpy and torch."""

    def state_dict(self) -> dict[str, Any]:
        """Return the three generators' states."""
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state().numpy().copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the three generators' states."""
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"])))
