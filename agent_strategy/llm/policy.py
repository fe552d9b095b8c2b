"""``LLMPolicy``: a policy answered by an LLM through litellm, wrapping a fallback.

One decision: render the observation (:mod:`.prompt`), check the budget, send the
request (:mod:`.backend`, with bounded retries for transient errors), parse and validate
the answer (:mod:`.answer`), and pass it through :func:`agent_strategy.guard`. Any
failure on the way returns the fallback policy's decision with ``source="fallback"``;
the reason is kept in :attr:`LLMPolicy.last_call` and counted in
:attr:`LLMPolicy.fallbacks` under its category (the text before the first colon):
``unavailable``, ``budget``, ``prompt``, ``timeout``, ``connection``, ``rate_limit``,
``server_error``, ``auth``, ``not_found``, ``bad_request``, ``context_window``,
``empty``, ``backend``, ``parse``, ``schema``, ``invalid``, ``guard``.

An answer the guard had to repair is still the LLM's decision (not a fallback): the
changes are in :attr:`CallRecord.guard_changes` (and the decision log), and
:attr:`LLMPolicy.corrections` counts them (``guard``: decisions changed,
``aggregation``: a rule outside ``limits.rules`` replaced by the first allowed one,
``compression``: allocations whose codec was not allowed, replaced by the run's
default codec). An aggregate answer without a rule gets the fallback policy's rule;
a train allocation without a codec gets the fallback policy's codec for that client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ..codecs import allowed_codecs, bandwidth_codecs
from ..guard import GuardError, guard
from ..policy import Policy
from ..types import AggregationRule, Compression, Decision, Observation
from .answer import (
    AggregateAnswer,
    InvalidAnswer,
    TrainAnswer,
    parse_answer,
    to_decision,
)
from .backend import (
    Backend,
    BackendError,
    Completion,
    StructuredMode,
    call_with_retries,
)
from .budget import Budget, BudgetExhausted, Usage
from .prompt import PromptTooLarge, RoundSummary, render_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallRecord:
    """What happened in the last :meth:`LLMPolicy.decide` call."""

    round: int
    phase: str
    source: str
    fallback_reason: str | None
    latency_s: float
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    prompt_sha256: str
    response_sha256: str
    guard_changes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-serialisable dict (for decision logs)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _Fallback(Exception):
    """Internal: leave the LLM path with a categorised reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _lacks_codec(answer: TrainAnswer, obs: Observation) -> bool:
    """Whether codecs may vary and some selected client's allocation names none."""
    if len(allowed_codecs(obs)) < 2:
        return False
    named = {a.id for a in answer.allocations if a.compression is not None}
    return any(cid not in named for cid in answer.selected)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text else ""


class LLMPolicy:
    """A :class:`~agent_strategy.Policy` answered by an LLM, never raising.

    Parameters
    ----------
    model : str
        litellm model string (``"openai/gpt-4o-mini"``, ``"openai/smollm2"``, ...).
    api_base, api_key : str or None
        Server URL and key; ``None`` uses the provider's defaults and environment.
    fallback : Policy
        Answers whenever the LLM cannot (a :class:`DeterministicPolicy`, usually).
    timeout_s : float
        Per-request timeout; one decision takes at most about
        ``max_attempts * timeout_s`` plus the backoff pauses.
    max_attempts : int
        Requests per decision, retries of transient errors included.
    budget : Budget or None
        Caps on calls, tokens and cost; ``None``: no caps (usage is still counted).
    history_len : int
        Past rounds shown in the prompt.
    max_prompt_chars : int
        Context budget of the rendered prompt (see :mod:`.prompt`).
    name : str
        The policy's name in logs.
    mode : StructuredMode or None
        Structured-output mode; ``None`` picks one per backend.
    backoff_s : float
        First retry pause; doubled per attempt.
    max_consecutive_failures : int or None
        After this many fallbacks in a row the LLM is paused (a circuit breaker);
        ``None`` never pauses it.
    retry_after : int
        Decisions a paused LLM sits out before it is asked once more; a success
        closes the breaker, a failure pauses it again.
    temperature, max_tokens
        Passed to the model.
    """

    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        fallback: Policy,
        timeout_s: float = 10.0,
        max_attempts: int = 2,
        budget: Budget | None = None,
        history_len: int = 5,
        max_prompt_chars: int = 12000,
        name: str = "llm",
        mode: StructuredMode | None = None,
        backoff_s: float = 0.5,
        max_consecutive_failures: int | None = 5,
        retry_after: int = 10,
        temperature: float = 0.0,
        max_tokens: int = 800,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if history_len < 0:
            raise ValueError(f"history_len must be >= 0, got {history_len}")
        if max_prompt_chars < 500:
            raise ValueError(f"max_prompt_chars must be >= 500, got {max_prompt_chars}")
        if max_consecutive_failures is not None and max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be >= 1 or None")
        self.name = name
        self.fallback = fallback
        self.backend = Backend(
            model,
            api_base=api_base,
            api_key=api_key,
            timeout_s=timeout_s,
            mode=mode,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.budget = budget if budget is not None else Budget()
        self.history: deque[RoundSummary] = deque(maxlen=history_len)
        self.max_prompt_chars = max_prompt_chars
        self.max_consecutive_failures = max_consecutive_failures
        self.unavailable: str | None = None
        self.last_call: CallRecord | None = None
        self.calls = 0
        self.fallbacks: Counter[str] = Counter()
        self.corrections: Counter[str] = Counter()
        self._consecutive_failures = 0
        self.retry_after = retry_after
        self._paused_until: int | None = None

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> str:
        """Return the litellm model string."""
        return self.backend.model

    def summary(self) -> None:
        """Log the policy's settings."""
        log.info(
            "LLMPolicy %s: model=%s api_base=%s mode=%s timeout_s=%g max_attempts=%d "
            "history_len=%d max_prompt_chars=%d budget=%r fallback=%s",
            self.name,
            self.backend.model,
            self.backend.api_base,
            self.backend.mode,
            self.backend.timeout_s,
            self.max_attempts,
            self.history.maxlen or 0,
            self.max_prompt_chars,
            self.budget,
            getattr(self.fallback, "name", type(self.fallback).__name__),
        )

    def probe(self) -> str | None:
        """Send one tiny request; return ``None`` or a one-line error.

        Transient errors are retried as in :meth:`decide`. After a failed probe every
        :meth:`decide` falls back at once with the reason ``"unavailable: <error>"``.
        The probe's requests count against the budget.
        """
        error: str | None = None
        if missing := self.backend.missing_keys():
            error = (
                f"{self.backend.model}: missing API key: set {', '.join(missing)} "
                "or pass api_key"
            )
        else:

            def attempt() -> Completion:
                self.budget.check()
                try:
                    completion = self.backend.probe()
                except BackendError:
                    self.budget.charge(None, 0.0)
                    raise
                self.budget.charge(completion.usage, completion.cost_usd)
                return completion

            try:
                call_with_retries(
                    attempt, max_attempts=self.max_attempts, backoff_s=self.backoff_s
                )
            except BudgetExhausted as e:
                error = f"budget: {e.reason}"
            except BackendError as e:
                error = self.backend.describe(e)
        self.unavailable = error
        if error:
            log.warning("LLM %s unavailable: %s", self.backend.model, error)
        return error

    def remember(self, summary: RoundSummary) -> None:
        """Add a past round to the history shown in later prompts."""
        self.history.append(summary)

    def stats(self) -> dict[str, Any]:
        """Return counters and budget state (JSON-serialisable)."""
        return {
            "calls": self.calls,
            "fallbacks": dict(self.fallbacks),
            "corrections": dict(self.corrections),
            "unavailable": self.unavailable,
            "budget": self.budget.state_dict(),
        }

    def decide(self, obs: Observation) -> Decision:
        """Return the LLM's guarded decision, or the fallback's; never raises."""
        self.calls += 1
        start = time.perf_counter()
        state: dict[str, Any] = {"attempts": 0, "usage": Usage(), "cost": 0.0}
        prompt_text = response_text = ""
        changes: tuple[str, ...] = ()
        reason: str | None = None
        try:
            if self._paused_until is not None and self.calls > self._paused_until:
                # Half-open breaker: one more try after the pause.
                self._paused_until = None
                self.unavailable = None
            if self.unavailable:
                raise _Fallback(f"unavailable: {self.unavailable}")
            try:
                rendered = render_prompt(obs, list(self.history), self.max_prompt_chars)
            except PromptTooLarge as e:
                raise _Fallback(f"prompt: {e}") from e
            prompt_text = json.dumps(rendered.messages, sort_keys=True)
            completion = self._request(rendered.messages, rendered.schema, state)
            response_text = completion.text
            try:
                answer = parse_answer(completion.text, obs)
            except InvalidAnswer as e:
                raise _Fallback(str(e)) from e
            default_rule = None
            if isinstance(answer, AggregateAnswer) and answer.aggregation is None:
                default_rule = self._default_rule(obs)
            default_codecs = None
            if isinstance(answer, TrainAnswer) and _lacks_codec(answer, obs):
                default_codecs = self._default_codecs(obs)
            decision = to_decision(answer, obs, default_rule, default_codecs)
            try:
                guarded = guard(decision, obs)
            except GuardError as e:
                raise _Fallback(f"guard: {e}") from e
            self._count_corrections(obs, decision, guarded.decision, guarded.changes)
            decision, changes = guarded.decision, guarded.changes
        except _Fallback as e:
            reason = e.reason
        except Exception as e:  # noqa: BLE001 - decide() never raises
            log.exception("LLM policy %s: unexpected error", self.name)
            reason = f"backend: unexpected {type(e).__name__}: {e}"
        if reason is not None:
            decision, changes = self._fallback(obs, reason)
        else:
            self._consecutive_failures = 0
        if obs.phase == "aggregate":
            try:
                self.remember(RoundSummary.from_aggregate(obs, decision))
            except Exception:  # noqa: BLE001 - history is best effort
                log.exception("could not summarise round %d", obs.round)
        usage: Usage = state["usage"]
        self.last_call = CallRecord(
            round=obs.round,
            phase=obs.phase,
            source=decision.source,
            fallback_reason=reason,
            latency_s=time.perf_counter() - start,
            attempts=state["attempts"],
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=state["cost"],
            prompt_sha256=_sha256(prompt_text),
            response_sha256=_sha256(response_text),
            guard_changes=changes,
        )
        return decision

    # ----------------------------------------------------------------- helpers
    def _request(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        state: dict[str, Any],
    ) -> Completion:
        def attempt() -> Completion:
            try:
                self.budget.check()
            except BudgetExhausted as e:
                raise _Fallback(f"budget: {e.reason}") from e
            state["attempts"] += 1
            try:
                completion = self.backend.complete(messages, schema)
            except BackendError:
                self.budget.charge(None, 0.0)
                raise
            self.budget.charge(completion.usage, completion.cost_usd)
            u: Usage = state["usage"]
            state["usage"] = Usage(
                u.prompt_tokens + completion.usage.prompt_tokens,
                u.completion_tokens + completion.usage.completion_tokens,
            )
            state["cost"] += completion.cost_usd
            return completion

        try:
            return call_with_retries(
                attempt, max_attempts=self.max_attempts, backoff_s=self.backoff_s
            )
        except BackendError as e:
            raise _Fallback(str(e)) from e

    def _default_rule(self, obs: Observation) -> AggregationRule:
        """Return the fallback policy's aggregation rule for ``obs``.

        Asked only when the LLM's aggregate answer names no rule; a fallback that
        raises gives ``limits.rules[0]`` (logged).
        """
        try:
            return self.fallback.decide(obs).aggregation
        except Exception:  # noqa: BLE001 - the LLM's weights stay usable
            log.exception(
                "round %d: fallback policy failed while choosing the aggregation "
                "rule; using %r",
                obs.round,
                obs.limits.rules[0],
            )
            return obs.limits.rules[0]

    def _default_codecs(self, obs: Observation) -> dict[str, Compression]:
        """Return the fallback policy's upload codec for each client of ``obs``.

        Asked only when codecs may vary and the LLM's train answer leaves some
        selected client's codec open. A client the fallback policy selected gets the
        codec of its allocation; any other client the codec the deterministic
        bandwidth rule gives it (:func:`~agent_strategy.codecs.bandwidth_codecs`,
        which does not depend on the selection), else the run's
        default. A fallback that raises leaves the bandwidth rule alone (logged).
        """
        try:
            allocations = self.fallback.decide(obs).allocations
        except Exception:  # noqa: BLE001 - the LLM's allocations stay usable
            log.exception(
                "round %d: fallback policy failed while choosing codecs; using the "
                "bandwidth rule",
                obs.round,
            )
            allocations = {}
        rule = bandwidth_codecs(obs)
        return {
            c.id: allocations[c.id].compression
            if c.id in allocations
            else rule.get(c.id, obs.default_compression)
            for c in obs.clients
        }

    def _count_corrections(
        self,
        obs: Observation,
        asked: Decision,
        done: Decision,
        changes: tuple[str, ...],
    ) -> None:
        """Count the guard's corrections of an LLM decision, and log them.

        ``guard`` counts every decision the guard changed; ``aggregation`` the
        aggregate answers whose rule was not among ``limits.rules`` (the guard used
        the first allowed rule instead); ``compression`` the train allocations whose
        codec was not allowed (the guard used the run's default codec instead).
        """
        if not changes:
            return
        self.corrections["guard"] += 1
        replaced = [
            f"{cid} {a.compression!r} -> {done.allocations[cid].compression!r}"
            for cid, a in asked.allocations.items()
            if cid in done.allocations
            and done.allocations[cid].compression != a.compression
        ]
        if obs.phase == "train" and replaced:
            self.corrections["compression"] += len(replaced)
            log.warning(
                "round %d train: LLM chose codecs not allowed (%s): %s",
                obs.round,
                ", ".join(allowed_codecs(obs)),
                "; ".join(replaced),
            )
        if obs.phase == "aggregate" and asked.aggregation != done.aggregation:
            self.corrections["aggregation"] += 1
            log.warning(
                "round %d aggregate: LLM chose aggregation %r, not allowed (%s); "
                "guard used %r",
                obs.round,
                asked.aggregation,
                ", ".join(obs.limits.rules),
                done.aggregation,
            )

    def _fallback(
        self, obs: Observation, reason: str
    ) -> tuple[Decision, tuple[str, ...]]:
        category = reason.split(":", 1)[0]
        self.fallbacks[category] += 1
        if category not in ("unavailable", "budget"):
            self._consecutive_failures += 1
            limit = self.max_consecutive_failures
            if limit is not None and self._consecutive_failures >= limit:
                self.unavailable = (
                    f"{self._consecutive_failures} consecutive failures, last: {reason}"
                )
                self._paused_until = self.calls + self.retry_after
                log.warning(
                    "LLM %s paused for %d decisions: %s",
                    self.backend.model,
                    self.retry_after,
                    self.unavailable,
                )
        log.info("round %d %s: LLM fallback (%s)", obs.round, obs.phase, reason[:300])
        try:
            decision = self.fallback.decide(obs)
        except Exception:  # noqa: BLE001 - last resort: the guard's repairs
            log.exception("fallback policy failed; using the guard's repairs")
            decision = Decision(rationale="")
        decision = decision.model_copy(update={"source": "fallback"})
        try:
            guarded = guard(decision, obs)
        except GuardError:
            return decision, ()
        return guarded.decision, guarded.changes
