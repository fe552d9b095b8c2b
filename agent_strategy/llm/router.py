"""``PolicyRouter``: one policy per decision type, composed into one Decision per phase.

The four decision types and the phase that asks for them:

=============  =========  =====================================================
type           phase      taken from the routed policy's decision
=============  =========  =====================================================
selection      train      ``selected``
allocation     train      ``allocations`` of the selected clients
weighting      aggregate  ``weights`` and ``aggregation`` (the robust rule)
detection      both       ``flags``: the union over one or more policies
=============  =========  =====================================================

Default: the LLM selects, allocates and weights; detection is the union of the
deterministic policy's flags and the LLM's. Each policy is asked at most once per
phase. When allocation is routed to another policy than selection, that policy is
asked on the observation restricted to the selected clients. The composed decision's
``source`` is that of the selection (train) or weighting (aggregate) part; the strategy
still passes it through :func:`agent_strategy.guard`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from ..policy import Policy
from ..types import Decision, Flag, Observation

log = logging.getLogger(__name__)

DecisionType = Literal["selection", "allocation", "weighting", "detection"]
_Ask = Callable[[str], Decision]


def union_flags(decisions: Sequence[Decision]) -> tuple[Flag, ...]:
    """Return the flags of ``decisions``, first occurrence of each (id, kind) kept."""
    seen: set[tuple[str, str]] = set()
    flags: list[Flag] = []
    for d in decisions:
        for f in d.flags:
            if (f.id, f.kind) not in seen:
                seen.add((f.id, f.kind))
                flags.append(f)
    return tuple(flags)


def restrict(obs: Observation, ids: Sequence[str]) -> Observation:
    """Return ``obs`` with only the clients ``ids``, all of them to be selected."""
    keep = set(ids)
    clients = tuple(c for c in obs.clients if c.id in keep)
    n = max(len(clients), 1)
    limits = obs.limits.model_copy(
        update={
            "min_clients": min(obs.limits.min_clients, n),
            "max_clients": max(obs.limits.max_clients, n),
        }
    )
    return obs.model_copy(
        update={"clients": clients, "target_clients": n, "limits": limits}
    )


class PolicyRouter:
    """Route each decision type to a named policy and compose their answers.

    Parameters
    ----------
    policies : Mapping[str, Policy]
        The policies by name, e.g. ``{"llm": LLMPolicy(...), "deterministic": ...}``.
    selection, allocation, weighting : str
        The name of the policy answering each decision type.
    detection : str or sequence of str
        The policies whose flags are united.
    name : str
        The router's name in logs.
    """

    def __init__(
        self,
        policies: Mapping[str, Policy],
        *,
        selection: str = "llm",
        allocation: str = "llm",
        weighting: str = "llm",
        detection: str | Sequence[str] = ("deterministic", "llm"),
        name: str = "router",
    ) -> None:
        self.policies = dict(policies)
        self.detection = (
            (detection,) if isinstance(detection, str) else tuple(detection)
        )
        self.routes: dict[DecisionType, str] = {
            "selection": selection,
            "allocation": allocation,
            "weighting": weighting,
        }
        if not self.detection:
            raise ValueError("detection needs at least one policy name")
        for part, pname in [
            *self.routes.items(),
            *(("detection", d) for d in self.detection),
        ]:
            if pname not in self.policies:
                raise ValueError(
                    f"{part} is routed to {pname!r}, which is not among the policies "
                    f"{sorted(self.policies)}"
                )
        self.name = name
        self.last_sources: dict[str, str] = {}

    @classmethod
    def default(cls, llm: Policy, deterministic: Policy) -> PolicyRouter:
        """Return the default routing: LLM everywhere, detection united."""
        return cls({"llm": llm, "deterministic": deterministic})

    def summary(self) -> None:
        """Log the routing."""
        log.info(
            "PolicyRouter %s: %s, detection=%s",
            self.name,
            ", ".join(f"{k}={v}" for k, v in self.routes.items()),
            "+".join(self.detection),
        )

    def decide(self, obs: Observation) -> Decision:
        """Return the composed decision for ``obs.phase``."""
        cache: dict[str, Decision] = {}

        def ask(pname: str) -> Decision:
            if pname not in cache:
                cache[pname] = self.policies[pname].decide(obs)
            return cache[pname]

        if obs.phase == "train":
            decision = self._train(obs, ask)
        else:
            decision = self._aggregate(obs, ask)
        self.last_sources = {k: v.source for k, v in cache.items()}
        return decision

    # ------------------------------------------------------------------ phases
    def _train(self, obs: Observation, ask: _Ask) -> Decision:
        sel = ask(self.routes["selection"])
        alloc_name = self.routes["allocation"]
        if alloc_name == self.routes["selection"] or not sel.selected:
            allocations = dict(sel.allocations)
            alloc_rationale = ""
        else:
            alloc = self.policies[alloc_name].decide(restrict(obs, sel.selected))
            allocations = {
                cid: alloc.allocations[cid]
                for cid in sel.selected
                if cid in alloc.allocations
            }
            alloc_rationale = f"; allocation ({alloc_name}): {alloc.rationale}"
        flags = union_flags([ask(p) for p in self.detection])
        rationale = f"selection ({self.routes['selection']}): {sel.rationale}"
        return Decision(
            selected=sel.selected,
            allocations={k: v for k, v in allocations.items() if k in sel.selected},
            flags=flags,
            rationale=(rationale + alloc_rationale)[:2000],
            source=sel.source,
        )

    def _aggregate(self, obs: Observation, ask: _Ask) -> Decision:
        weighting = ask(self.routes["weighting"])
        flags = union_flags([ask(p) for p in self.detection])
        flagged = {f.id for f in flags}
        rationale = (
            f"weighting ({self.routes['weighting']}): {weighting.rationale}; "
            f"detection ({'+'.join(self.detection)}): {len(flags)} flag(s)"
        )
        return Decision(
            weights={k: v for k, v in weighting.weights.items() if k not in flagged},
            flags=flags,
            aggregation=weighting.aggregation,
            rationale=rationale[:2000],
            source=weighting.source,
        )
