"""Per-run caps on LLM calls, tokens and cost.

A :class:`Budget` is a small, thread-safe counter with optional caps. The LLM policy
calls :meth:`Budget.check` before every request and :meth:`Budget.charge` after it;
once a cap is reached every later decision falls back to the deterministic policy with
the reason ``"budget: ..."``. The state is a plain dict (:meth:`Budget.state_dict`) so a
checkpoint can save it and a resumed run continue with what is left.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any


class BudgetExhausted(RuntimeError):
    """A cap on calls, tokens or cost has been reached.

    Parameters
    ----------
    reason : str
        Which cap, and how much of it was used, e.g. ``"calls: 20 of 20 used"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Usage:
    """Tokens one request consumed (0 when the server did not report them)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Return prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


def _check_cap(name: str, value: float | int | None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


class Budget:
    """Caps on the LLM calls, tokens and US dollars one run may spend.

    Parameters
    ----------
    max_calls : int or None
        Requests sent to the LLM (every attempt counts, retries and the probe too).
    max_tokens : int or None
        Prompt plus completion tokens, as reported by the server.
    max_cost_usd : float or None
        Cost as computed by ``litellm.completion_cost`` (0 for local models).

    ``None`` means no cap. A cap is reached when the amount used is at least the cap,
    so ``max_calls=0`` disables the LLM entirely.
    """

    def __init__(
        self,
        max_calls: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> None:
        _check_cap("max_calls", max_calls)
        _check_cap("max_tokens", max_tokens)
        _check_cap("max_cost_usd", max_cost_usd)
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        """Return the tokens used so far."""
        return self.prompt_tokens + self.completion_tokens

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` if any cap has been reached.

        Raises
        ------
        BudgetExhausted
            With a reason naming the cap, e.g. ``"calls: 5 of 5 used"``.
        """
        with self._lock:
            if self.max_calls is not None and self.calls >= self.max_calls:
                raise BudgetExhausted(f"calls: {self.calls} of {self.max_calls} used")
            if self.max_tokens is not None and self.tokens >= self.max_tokens:
                raise BudgetExhausted(
                    f"tokens: {self.tokens} of {self.max_tokens} used"
                )
            if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
                raise BudgetExhausted(
                    f"cost: ${self.cost_usd:.4f} of ${self.max_cost_usd:.4f} used"
                )

    def charge(
        self, usage: Usage | None, cost_usd: float = 0.0, calls: int = 1
    ) -> None:
        """Add one request's consumption.

        Parameters
        ----------
        usage : Usage or None
            Tokens reported by the server; ``None`` when the request failed.
        cost_usd : float
            The request's cost; non-finite or negative values count as 0.
        calls : int
            Requests to count (1 per attempt).
        """
        cost = cost_usd if math.isfinite(cost_usd) and cost_usd > 0 else 0.0
        with self._lock:
            self.calls += calls
            if usage is not None:
                self.prompt_tokens += max(usage.prompt_tokens, 0)
                self.completion_tokens += max(usage.completion_tokens, 0)
            self.cost_usd += cost

    def remaining(self) -> dict[str, float | None]:
        """Return what is left of each cap (``None`` for no cap)."""
        with self._lock:
            return {
                "calls": None
                if self.max_calls is None
                else max(self.max_calls - self.calls, 0),
                "tokens": None
                if self.max_tokens is None
                else max(self.max_tokens - self.tokens, 0),
                "cost_usd": None
                if self.max_cost_usd is None
                else max(self.max_cost_usd - self.cost_usd, 0.0),
            }

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return caps and consumption as a JSON-serialisable dict."""
        with self._lock:
            return {
                "max_calls": self.max_calls,
                "max_tokens": self.max_tokens,
                "max_cost_usd": self.max_cost_usd,
                "calls": self.calls,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": self.cost_usd,
            }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Budget:
        """Rebuild a budget saved by :meth:`state_dict`."""
        budget = cls(
            max_calls=state.get("max_calls"),
            max_tokens=state.get("max_tokens"),
            max_cost_usd=state.get("max_cost_usd"),
        )
        budget.calls = int(state.get("calls", 0))
        budget.prompt_tokens = int(state.get("prompt_tokens", 0))
        budget.completion_tokens = int(state.get("completion_tokens", 0))
        budget.cost_usd = float(state.get("cost_usd", 0.0))
        return budget

    def __repr__(self) -> str:
        return (
            f"Budget(calls={self.calls}/{self.max_calls}, "
            f"tokens={self.tokens}/{self.max_tokens}, "
            f"cost_usd={self.cost_usd:.4f}/{self.max_cost_usd})"
        )
