from __future__ import annotations

import math

import numpy as np
import pytest
from support.factories import limits, plain_aggregate_obs, plain_train_obs, reply

from agent_strategy import (
    Allocation,
    Decision,
    Flag,
    GuardError,
    cap_weights,
    guard,
)
from agent_strategy.guard import cap_flags


def _alloc(epochs: int = 1, lr: float = 0.05, deadline: float = 10.0) -> Allocation:
    return Allocation.model_construct(
        local_epochs=epochs, lr=lr, compression="none", deadline_s=deadline
    )


@pytest.mark.parametrize(
    ("selected", "expected_len", "change"),
    [
        (("c0", "c0", "c1"), 2, "duplicate"),
        (("c0", "c99", "c1"), 2, "ineligible"),
        (("c0", "c1", "c2", "c3", "c4", "c5", "c6"), 5, "truncated"),
        ((), 2, "topped up"),
        (("c3",), 2, "topped up"),
    ],
)
def test_selection_is_repaired(
    selected: tuple[str, ...], expected_len: int, change: str
) -> None:
    obs = plain_train_obs(n=10, target=5)
    d = Decision(selected=selected, allocations={c: _alloc() for c in selected})

    g = guard(d, obs)

    assert len(g.decision.selected) == expected_len
    assert len(set(g.decision.selected)) == expected_len
    assert set(g.decision.selected) <= {c.id for c in obs.clients}
    assert any(change in c for c in g.changes)


def test_selected_and_flagged_is_dropped() -> None:
    obs = plain_train_obs(n=10, target=5)
    d = Decision(
        selected=("c0", "c1", "c2"),
        allocations={c: _alloc() for c in ("c0", "c1", "c2")},
        flags=(Flag(id="c1", kind="malicious", reason="x"),),
    )

    g = guard(d, obs)

    assert "c1" not in g.decision.selected
    assert any("both selected and flagged" in c for c in g.changes)


@pytest.mark.parametrize(
    ("alloc", "epochs", "lr", "deadline"),
    [
        (_alloc(epochs=1000), 5, 0.05, 10.0),
        (_alloc(lr=float("nan")), 1, 0.05, 10.0),
        (_alloc(lr=1e9), 1, 0.5, 10.0),
        (_alloc(lr=1e-12), 1, 1e-4, 10.0),
        (_alloc(deadline=1e9), 1, 0.05, 10.0),
        (_alloc(deadline=float("inf")), 1, 0.05, 10.0),
    ],
)
def test_allocations_are_clamped(
    alloc: Allocation, epochs: int, lr: float, deadline: float
) -> None:
    obs = plain_train_obs(n=4, target=2)
    d = Decision.model_construct(
        selected=("c0", "c1"),
        allocations={"c0": alloc, "c1": _alloc()},
        weights={},
        flags=(),
        rationale="",
        source="llm",
    )

    a = guard(d, obs).decision.allocations["c0"]

    assert (a.local_epochs, a.lr, a.deadline_s) == (epochs, pytest.approx(lr), deadline)


def test_missing_allocation_gets_the_default() -> None:
    obs = plain_train_obs(n=4, target=2)

    g = guard(Decision(selected=("c0", "c1")), obs)

    assert g.decision.allocations["c0"].local_epochs == obs.default_epochs
    assert g.decision.allocations["c0"].lr == obs.default_lr


def test_too_few_eligible_clients_is_an_error() -> None:
    obs = plain_train_obs(n=1, target=1, limits=limits(min_clients=2, max_clients=2))

    with pytest.raises(GuardError, match="fewer than the minimum"):
        guard(Decision(), obs)


@pytest.mark.parametrize(
    "weights",
    [
        {"c0": float("nan"), "c1": 1.0, "c2": 1.0},
        {"c0": -5.0, "c1": 1.0, "c2": 1.0},
        {"c0": float("inf"), "c1": 1.0, "c2": 1.0},
        {"c0": 1e300, "c1": 1.0, "c2": 1.0},
        {"c0": 0.0, "c1": 0.0, "c2": 0.0},
        {"c7": 1.0},
    ],
)
def test_bad_weights_become_a_safe_distribution(weights: dict[str, float]) -> None:
    obs = plain_aggregate_obs([reply("c0"), reply("c1"), reply("c2")])
    d = Decision.model_construct(
        selected=(),
        allocations={},
        weights=weights,
        flags=(),
        rationale="",
        source="llm",
    )

    g = guard(d, obs).decision

    values = list(g.weights.values())
    assert set(g.weights) == {"c0", "c1", "c2"} or set(g.weights) <= {"c1", "c2"}
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert sum(values) == pytest.approx(1.0)
    assert max(values) <= 0.5 + 1e-9


def test_flags_only_on_replies_and_flagged_get_no_weight() -> None:
    obs = plain_aggregate_obs([reply("c0"), reply("c1"), reply("c2")])
    d = Decision(
        weights={"c0": 1.0, "c1": 1.0, "c2": 1.0},
        flags=(
            Flag(id="c0", kind="malicious", reason="r"),
            Flag(id="c9", kind="faulty", reason="r"),
        ),
    )

    g = guard(d, obs)

    assert [f.id for f in g.decision.flags] == ["c0"]
    assert set(g.decision.weights) == {"c1", "c2"}


def test_cap_weights_water_filling() -> None:
    w = cap_weights(np.array([8.0, 1.0, 1.0]), 0.5)

    assert w == pytest.approx([0.5, 0.25, 0.25])


def test_cap_weights_infeasible_cap_gives_uniform() -> None:
    w = cap_weights(np.array([5.0, 1.0]), 0.3)

    assert w == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [float("nan")], [0.0, 0.0]])
def test_cap_weights_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        cap_weights(np.array(bad), 0.5)


def test_clients_left_out_too_long_are_added() -> None:
    from agent_strategy import ClientState

    clients = tuple(
        ClientState(id=f"c{i}", num_examples=100, last_selected_round=9 if i < 3 else 0)
        for i in range(6)
    )
    obs = plain_train_obs(
        target=4,
        round_=10,
        clients=clients,
        limits=limits(min_clients=2, max_clients=4, max_staleness=5),
    )
    d = Decision(selected=("c0", "c1", "c2"))

    g = guard(d, obs)

    # Up to half the slots (2 of 4) go to the stalest overdue clients.
    assert g.decision.selected == ("c0", "c1", "c3", "c4")
    assert any("unselected for over 5 rounds" in c for c in g.changes)


def test_flags_must_leave_min_clients_accepted() -> None:
    obs = plain_aggregate_obs([reply(f"c{i}") for i in range(4)])  # min_clients = 2
    d = Decision(
        weights={"c0": 1.0},
        flags=tuple(
            Flag(id=f"c{i}", kind="malicious", reason="r") for i in range(1, 4)
        ),
    )

    g = guard(d, obs)

    assert len(g.decision.flags) == 2
    assert len(g.decision.weights) == 2
    assert any("must stay accepted" in c for c in g.changes)


def test_weight_trust_region_is_relative_to_examples() -> None:
    obs = plain_aggregate_obs(
        [reply("c0", 10), reply("c1", 100), reply("c2", 100), reply("c3", 100)],
        limits=limits(weight_trust=2.0, max_weight_share=0.9),
    )
    d = Decision(weights={"c0": 1.0, "c1": 0.0, "c2": 0.0, "c3": 0.0})

    w = guard(d, obs).decision.weights

    assert w["c0"] == pytest.approx(2.0 * 10 / 310)
    assert sum(w.values()) == pytest.approx(1.0)


def test_cap_weights_per_entry_caps() -> None:
    w = cap_weights(np.array([1.0, 0.0, 0.0]), np.array([0.2, 0.5, 0.5]))

    assert w == pytest.approx([0.2, 0.4, 0.4])


def test_flag_share_caps_how_many_replies_can_be_dropped() -> None:
    obs = plain_aggregate_obs(
        [reply(f"c{i}") for i in range(6)], limits=limits(max_flag_share=0.5)
    )
    d = Decision(
        weights={"c0": 1.0},
        flags=tuple(
            Flag(id=f"c{i}", kind="malicious", reason="r") for i in range(1, 6)
        ),
    )

    g = guard(d, obs)

    assert len(g.decision.flags) == 3
    assert len(g.decision.weights) == 3


def test_cap_flags_keeps_the_first_clients_and_their_later_flags() -> None:
    flags = [
        Flag(id="c1", kind="malicious", reason="worst"),
        Flag(id="c2", kind="faulty", reason="second"),
        Flag(id="c1", kind="straggler", reason="c1 again"),
        Flag(id="c3", kind="malicious", reason="third"),
    ]

    # 10 replies: min(10 - 2, int(0.2 * 10)) = 2 clients may stay flagged
    kept = cap_flags(flags, 10, limits(max_flag_share=0.2))
    assert [(f.id, f.reason) for f in kept] == [
        ("c1", "worst"),
        ("c2", "second"),
        ("c1", "c1 again"),
    ]
    # 3 replies, min_clients 2: one client
    assert [f.id for f in cap_flags(flags, 3, limits(max_flag_share=1.0))] == [
        "c1",
        "c1",
    ]
    assert cap_flags(flags, 2, limits()) == []
