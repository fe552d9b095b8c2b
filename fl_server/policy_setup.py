"""Build the agent strategy's policy from the run config, and tear it down.

``policy.name=deterministic`` gives the :class:`DeterministicPolicy`.
``policy.name=llm`` gives a :class:`PolicyRouter` over an :class:`LLMPolicy` (reached
through litellm) and the deterministic policy, which answers whatever the LLM cannot.
``agent.model=local`` first starts SmolLM2 on a loopback port (stopped when the run
ends, also on errors); if the local model is not installed, or the LLM does not answer
a probe, one clear line says so and the deterministic policy answers instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent_strategy import (
    Decision,
    DetectionParams,
    DeterministicPolicy,
    Observation,
    Policy,
    ReputationParams,
)
from orchestration.config import RunConfig

if TYPE_CHECKING:
    from agent_strategy.llm import LLMPolicy

log = logging.getLogger("agentfl.policy")


class LLMTelemetry:
    """What the strategy logs about LLM calls, and the history it feeds back."""

    def __init__(self, llm: LLMPolicy) -> None:
        self.llm = llm

    def record(self, obs: Observation) -> dict[str, Any] | None:
        """Return the LLM call made for ``obs`` (None if the LLM was not asked)."""
        call = self.llm.last_call
        if call is None or call.round != obs.round or call.phase != obs.phase:
            return None
        return call.as_dict()

    def after_aggregate(self, obs: Observation, decision: Decision) -> None:
        """Add the finished round to the history shown in later prompts.

        When the LLM answered this aggregate phase itself it has already remembered
        the round; otherwise (weighting routed elsewhere) it is added here.
        """
        from agent_strategy.llm import RoundSummary

        if self.record(obs) is None:
            self.llm.remember(RoundSummary.from_aggregate(obs, decision))


@dataclass(frozen=True)
class PolicySetup:
    """The policy to use, its fallback, and (for an LLM) its telemetry."""

    policy: Policy
    fallback: DeterministicPolicy
    telemetry: LLMTelemetry | None = None
    notice: str | None = None


def resolve_route(cfg: RunConfig) -> tuple[str, tuple[str, ...]]:
    """Return the weighting policy and the detection policies, ``auto`` resolved."""
    route, local = cfg.agent.route, cfg.agent.model == "local"
    weighting: str = route.weighting
    if weighting == "auto":
        weighting = "deterministic" if local else "llm"
    detection: str = route.detection
    if detection == "auto":
        detection = "deterministic" if local else "union"
    if detection == "union":
        return weighting, ("deterministic", "llm")
    return weighting, (detection,)


def detection_params(cfg: RunConfig) -> DetectionParams | None:
    """Return the deterministic detectors' thresholds, or None if defense is off."""
    d = cfg.defense
    if not d.enabled:
        return None
    return DetectionParams(
        z_threshold=d.z_threshold,
        min_cosine=d.min_cosine,
        norm_examples_exponent=d.norm_examples_exponent,
        record_below=d.record_below,
    )


def reputation_params(cfg: RunConfig) -> ReputationParams:
    """Return the reputation's constants (``defense.*``; used with defense on)."""
    d = cfg.defense
    return ReputationParams(
        exclude_after=d.exclude_after, probation_rounds=d.probation_rounds
    )


def deterministic_policy(cfg: RunConfig) -> DeterministicPolicy:
    """Return the run's deterministic policy (the fallback of every other one)."""
    return DeterministicPolicy(
        seed=cfg.seed,
        exploration=cfg.policy.exploration,
        duration_quantile=cfg.policy.duration_quantile,
        detection=detection_params(cfg),
    )


@contextmanager
def open_policy(cfg: RunConfig) -> Iterator[PolicySetup]:
    """Yield the configured policy; stop whatever it started on exit."""
    det = deterministic_policy(cfg)
    if cfg.policy.name == "deterministic":
        yield PolicySetup(det, det)
        return
    from agent_strategy.llm import (  # sets litellm's offline variables first
        Budget,
        LLMPolicy,
        LocalModelServer,
        LocalServerError,
        PolicyRouter,
        local_model_available,
    )

    a = cfg.agent
    with ExitStack() as stack:
        model, api_base, max_chars = a.model, a.api_base or None, a.max_prompt_chars
        notice: str | None = None
        if a.model == "local":
            ok, why = local_model_available()
            server = None
            if ok:
                try:
                    server = stack.enter_context(LocalModelServer())
                except LocalServerError as e:
                    why = f"the local model server did not start: {e}"
            if server is None:
                notice = (
                    f"agent.model=local: {why}; install it with `make setup` (see "
                    "README). The deterministic policy answers this run."
                )
                log.warning("%s", notice)
                yield PolicySetup(det, det, notice=notice)
                return
            model, api_base = server.model, server.api_base
            max_chars = min(max_chars, server.max_prompt_chars)
        api_key = None
        if a.api_key_env:
            api_key = os.environ.get(a.api_key_env)
            if not api_key:
                notice = f"agent.api_key_env={a.api_key_env} is not set"
        llm = LLMPolicy(
            model,
            api_base=api_base,
            api_key=api_key,
            fallback=det,
            timeout_s=a.timeout_s,
            max_attempts=a.max_attempts,
            budget=Budget(
                max_calls=a.max_calls or None,
                max_tokens=a.max_tokens or None,
                max_cost_usd=a.max_cost_usd or None,
            ),
            history_len=a.history_len,
            max_prompt_chars=max_chars,
            mode=None if a.structured == "auto" else a.structured,
            temperature=a.temperature,
            max_tokens=a.max_answer_tokens,
        )
        error = llm.probe()
        if error:
            notice = f"{notice}; {error}" if notice else error
            log.warning(
                "agent: LLM unavailable (%s); the deterministic policy answers this "
                "run, every round logged as a fallback",
                notice,
            )
        else:
            log.info("agent: LLM %s ready at %s", model, api_base or "its default")
        weighting, detection = resolve_route(cfg)
        router = PolicyRouter(
            {"llm": llm, "deterministic": det},
            selection=a.route.selection,
            allocation=a.route.allocation,
            weighting=weighting,
            detection=detection,
        )
        yield PolicySetup(router, det, LLMTelemetry(llm), notice)
