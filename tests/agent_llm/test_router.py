from __future__ import annotations

import pytest
from support.openai_stub import OpenAIStub, Reply

from agent_strategy import (
    Allocation,
    Decision,
    DeterministicPolicy,
    Flag,
    Observation,
    guard,
)
from agent_strategy.llm import PolicyRouter
from agent_strategy.llm.router import restrict, union_flags

from .llm_factories import (
    aggregate_answer,
    aggregate_obs,
    assert_obeys_guard,
    limits,
    stub_policy,
    train_obs,
)


class Scripted:
    """A policy answering fixed decisions per phase and counting its calls."""

    def __init__(self, name: str, train: Decision, aggregate: Decision) -> None:
        self.name = name
        self.answers = {"train": train, "aggregate": aggregate}
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return self.answers[obs.phase]


def _alloc(epochs: int) -> Allocation:
    return Allocation(local_epochs=epochs, lr=0.02, deadline_s=10.0)


def _llm() -> Scripted:
    return Scripted(
        "llm",
        Decision(
            selected=("c1", "c2", "c6"),
            allocations={c: _alloc(3) for c in ("c1", "c2", "c6")},
            rationale="llm pick",
            source="llm",
        ),
        Decision(
            weights={f"c{i}": 1.0 for i in range(5)},
            flags=(Flag(id="c0", kind="malicious", reason="low cosine"),),
            source="llm",
        ),
    )


def test_default_routes_everything_to_the_llm_and_unites_flags() -> None:
    llm = _llm()
    det = DeterministicPolicy()
    router = PolicyRouter.default(llm, det)
    obs = aggregate_obs(limits=limits(deadline_s=2.0))  # c3, c4 are stragglers

    decision = router.decide(obs)

    assert [(f.id, f.kind) for f in decision.flags] == [
        ("c3", "straggler"),
        ("c4", "straggler"),
        ("c0", "malicious"),
    ]
    assert set(decision.weights) == {"c1", "c2"}
    assert decision.source == "llm"
    assert len(llm.seen) == 1
    assert_obeys_guard(guard(decision, obs).decision, obs)


def test_train_phase_takes_selection_and_allocation_from_the_llm() -> None:
    llm = _llm()
    router = PolicyRouter.default(llm, DeterministicPolicy())
    obs = train_obs()

    decision = router.decide(obs)

    assert decision.selected == ("c1", "c2", "c6")
    assert {a.local_epochs for a in decision.allocations.values()} == {3}
    assert len(llm.seen) == 1
    assert router.last_sources == {"llm": "llm", "deterministic": "deterministic"}


def test_allocation_routed_to_deterministic_sees_only_the_selected() -> None:
    llm = _llm()
    det = Scripted(
        "det",
        Decision(
            selected=("c1", "c2", "c6"),
            allocations={c: _alloc(1) for c in ("c1", "c2", "c6")},
        ),
        Decision(),
    )
    router = PolicyRouter({"llm": llm, "det": det}, allocation="det", detection="llm")
    obs = train_obs()

    decision = router.decide(obs)

    assert decision.selected == ("c1", "c2", "c6")
    assert {a.local_epochs for a in decision.allocations.values()} == {1}
    restricted = det.seen[0]
    assert [c.id for c in restricted.clients] == ["c1", "c2", "c6"]
    assert restricted.target_clients == 3


def test_selection_routed_to_deterministic_keeps_its_source() -> None:
    router = PolicyRouter.default(_llm(), DeterministicPolicy())
    router = PolicyRouter(
        router.policies, selection="deterministic", allocation="deterministic"
    )
    obs = train_obs()

    decision = router.decide(obs)

    assert decision.source == "deterministic"
    assert decision.selected == DeterministicPolicy().decide(obs).selected


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValueError, match="weighting is routed to 'gpt'"):
        PolicyRouter({"llm": _llm()}, weighting="gpt", detection="llm")
    with pytest.raises(ValueError, match="detection"):
        PolicyRouter({"llm": _llm()}, detection=())


def test_union_keeps_first_of_each_id_kind() -> None:
    a = Decision(flags=(Flag(id="c1", kind="faulty", reason="a"),))
    b = Decision(
        flags=(
            Flag(id="c1", kind="faulty", reason="b"),
            Flag(id="c1", kind="malicious", reason="c"),
        )
    )

    flags = union_flags([a, b])

    assert [(f.id, f.kind, f.reason) for f in flags] == [
        ("c1", "faulty", "a"),
        ("c1", "malicious", "c"),
    ]


def test_restrict_keeps_limits_satisfiable() -> None:
    obs = train_obs(limits=limits(min_clients=3))

    small = restrict(obs, ["c1"])

    assert small.limits.min_clients == 1 and small.target_clients == 1


def test_router_with_a_real_llm_policy_over_http(openai_stub: OpenAIStub) -> None:
    openai_stub.script(
        Reply(
            content=aggregate_answer(
                {"c0": 0, "c1": 2, "c2": 1, "c3": 1, "c4": 1},
                [{"id": "c0", "kind": "malicious", "reason": "cosine"}],
            )
        )
    )
    det = DeterministicPolicy()
    router = PolicyRouter.default(stub_policy(openai_stub.api_base), det)
    obs = aggregate_obs(limits=limits(deadline_s=2.4))  # c4 is a straggler

    decision = guard(router.decide(obs), obs).decision

    assert {f.id for f in decision.flags} == {"c0", "c4"}
    assert set(decision.weights) == {"c1", "c2", "c3"}
    assert decision.source == "llm"
