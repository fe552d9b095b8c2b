from __future__ import annotations

from support.factories import plain_aggregate_obs, plain_train_obs, reply

from agent_strategy import ClientState, DeterministicPolicy, guard


def test_selects_target_count_of_unique_eligible_clients() -> None:
    obs = plain_train_obs(n=20, target=10)

    d = DeterministicPolicy(seed=0).decide(obs)

    assert len(d.selected) == 10
    assert len(set(d.selected)) == 10
    assert set(d.selected) <= {c.id for c in obs.clients}
    assert set(d.allocations) == set(d.selected)
    assert guard(d, obs).changes == ()


def test_same_observation_same_decision_and_seed_matters() -> None:
    obs = plain_train_obs(n=30, target=5)

    a = DeterministicPolicy(seed=1).decide(obs)
    b = DeterministicPolicy(seed=1).decide(obs)
    others = {DeterministicPolicy(seed=s).decide(obs).selected for s in range(2, 8)}

    assert a == b
    assert len(others | {a.selected}) > 1


def test_exploration_prefers_never_selected_clients() -> None:
    clients = tuple(
        ClientState(
            id=f"c{i}",
            num_examples=100,
            last_loss=5.0 if i < 5 else 0.1,
            last_selected_round=0 if i == 9 else 3,
            rounds_selected=0 if i == 9 else 1,
        )
        for i in range(10)
    )
    obs = plain_train_obs(target=5, round_=4, clients=clients)

    d = DeterministicPolicy(seed=0, exploration=0.2).decide(obs)

    assert "c9" in d.selected  # the one never selected gets the exploration slot


def test_high_loss_clients_are_preferred_over_many_draws() -> None:
    clients = tuple(
        ClientState(
            id=f"c{i}",
            num_examples=100,
            last_loss=3.0 if i < 5 else 0.01,
            last_selected_round=2,
        )
        for i in range(20)
    )
    obs = plain_train_obs(target=5, round_=3, clients=clients)
    counts = {f"c{i}": 0 for i in range(20)}

    for seed in range(40):
        for cid in DeterministicPolicy(seed=seed, exploration=0.0).decide(obs).selected:
            counts[cid] += 1

    high = sum(counts[f"c{i}"] for i in range(5))
    low = sum(counts[f"c{i}"] for i in range(5, 20))
    assert high > 3 * low


def test_slow_clients_get_fewer_epochs() -> None:
    clients = (
        ClientState(id="c0", num_examples=100, last_loss=1.0, last_duration_s=40.0),
        ClientState(id="c1", num_examples=100, last_loss=1.0, last_duration_s=1.0),
    )
    obs = plain_train_obs(target=2, clients=clients).model_copy(
        update={"default_epochs": 4}
    )

    d = DeterministicPolicy().decide(obs)

    assert d.allocations["c0"].local_epochs < d.allocations["c1"].local_epochs
    assert d.allocations["c1"].local_epochs == 4


def test_aggregate_weights_by_examples_and_flags_stragglers() -> None:
    obs = plain_aggregate_obs(
        [reply("c0", 100), reply("c1", 300), reply("c2", 50, 99.0)]
    )

    d = DeterministicPolicy().decide(obs)

    assert d.weights == {"c0": 100.0, "c1": 300.0}
    assert [(f.id, f.kind) for f in d.flags] == [("c2", "straggler")]
    g = guard(d, obs).decision
    assert abs(g.weights["c1"] - 0.5) < 1e-9  # 0.75 capped at the 0.5 trust region
