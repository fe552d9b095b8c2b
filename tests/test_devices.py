"""Pure functions of the simulated devices: profiles, dropout, timings, round clock."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support.factories import limits, plain_train_obs

from agent_strategy import ClientState, DeterministicPolicy
from agent_strategy.deterministic import (
    expected_durations,
    preferred_duration,
    utilities,
)
from fl_server.devices import (
    DeviceProfile,
    Timing,
    client_timing,
    draw_profile,
    drops_out,
    epochs_within,
    round_duration,
)
from orchestration.config import ConfigError, RunConfig


def _profile(seed: int, pid: int, sigma: float = 1.0) -> DeviceProfile:
    return draw_profile(
        seed,
        pid,
        speed_sigma=sigma,
        bandwidth_median_bps=1e6,
        bandwidth_sigma=0.5,
    )


def test_zero_sigma_gives_the_median_device() -> None:
    p = draw_profile(
        3, 7, speed_sigma=0.0, bandwidth_median_bps=2.5e6, bandwidth_sigma=0.0
    )

    assert p == DeviceProfile(speed=1.0, bandwidth_bps=2.5e6)


def test_profiles_are_fixed_by_seed_and_id_and_log_normal() -> None:
    speeds = np.array([_profile(0, pid).speed for pid in range(4000)])
    bws = np.array([_profile(0, pid).bandwidth_bps for pid in range(4000)])

    assert _profile(0, 5) == _profile(0, 5)
    assert _profile(0, 5) != _profile(1, 5)
    assert abs(np.std(np.log(speeds)) - 1.0) < 0.05
    assert abs(np.median(np.log(speeds))) < 0.07
    assert abs(np.std(np.log(bws / 1e6)) - 0.5) < 0.03


@pytest.mark.parametrize(
    "kw",
    [
        {"speed_sigma": -0.1},
        {"bandwidth_sigma": -1.0},
        {"bandwidth_median_bps": 0.0},
    ],
)
def test_bad_profile_parameters_are_refused(kw: dict[str, float]) -> None:
    args: dict[str, float] = dict(
        speed_sigma=1.0, bandwidth_median_bps=1e6, bandwidth_sigma=0.5
    )
    args.update(kw)
    with pytest.raises(ValueError, match="must be"):
        draw_profile(0, 0, **args)


def test_dropout_rate_and_determinism() -> None:
    draws = [drops_out(0, r, pid, 0.1) for r in range(1, 51) for pid in range(100)]

    assert abs(np.mean(draws) - 0.1) < 0.015
    assert drops_out(0, 3, 4, 0.5) == drops_out(0, 3, 4, 0.5)
    assert not any(drops_out(0, r, 1, 0.0) for r in range(100))
    assert all(drops_out(0, r, 1, 1.0) for r in range(100))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drops_out(0, 1, 1, 1.5)


def test_client_timing_known_answer() -> None:
    t = client_timing(
        DeviceProfile(speed=2.0, bandwidth_bps=5e5),
        examples=100,
        epochs=2,
        bytes_down=500_000,
        example_cost_s=0.01,
    )

    assert math.isclose(t.compute_s, 1.0)
    assert math.isclose(t.comm_s, 2.0)  # 500 kB down and, not measured, dense up
    assert t.upload_s is None
    assert math.isclose(t.transfer_s, 2.0)
    assert math.isclose(t.total_s, 3.0)
    assert math.isclose(t.epoch_s, 0.5)


def test_client_timing_with_the_real_upload() -> None:
    t = client_timing(
        DeviceProfile(speed=2.0, bandwidth_bps=5e5),
        examples=100,
        epochs=2,
        bytes_down=500_000,
        bytes_up=125_000,  # an 8-bit update: a quarter of the model
        example_cost_s=0.01,
    )

    assert math.isclose(t.comm_s, 2.0)  # the link: the dense model down and up
    assert math.isclose(t.download_s, 1.0)
    assert t.upload_s is not None and math.isclose(t.upload_s, 0.25)
    assert math.isclose(t.total_s, 1.0 + 1.0 + 0.25)
    with pytest.raises(ValueError, match="bytes_up=-1"):
        client_timing(
            DeviceProfile(speed=1.0, bandwidth_bps=1.0),
            examples=1,
            epochs=1,
            bytes_down=1,
            bytes_up=-1,
            example_cost_s=0.01,
        )


def test_epochs_within_the_deadline() -> None:
    t = Timing(compute_s=1.0, comm_s=0.5, epochs=2)  # 0.5 s per epoch

    assert epochs_within(2.5, t, max_epochs=10) == 4
    assert epochs_within(2.5, t, max_epochs=3) == 3
    assert epochs_within(0.9, t, max_epochs=3) == 0
    assert epochs_within(0.4, t, max_epochs=3) == 0
    # A measured upload of 0.05 s instead of the dense 0.25 s leaves more room.
    small = Timing(compute_s=1.0, comm_s=0.5, epochs=2, upload_s=0.05)
    assert epochs_within(2.5, small, max_epochs=10) == 4  # (2.5 - 0.3) / 0.5 = 4.4
    assert epochs_within(0.8, small, max_epochs=3) == 1  # 0.5 fits in 0.5 of room


def test_round_duration() -> None:
    assert round_duration([1.0, 3.0, 2.0]) == 3.0
    assert round_duration([1.0, 3.0], [5.0]) == 5.0  # waited for a late client
    assert round_duration([6.0], [5.0, 4.0]) == 6.0
    assert round_duration([], [4.0]) == 4.0
    assert round_duration([]) == 0.0


def test_devices_config_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"devices\.dropout"):
        RunConfig.from_flat({"devices.dropout": 1.5})
    with pytest.raises(ConfigError, match=r"devices\.speed_sigma"):
        RunConfig.from_flat({"devices.speed_sigma": -1.0})
    assert RunConfig().devices.enabled is False


# ---------------------------------------------------------------- the policy side
def _timed(cid: str, epoch_s: float, comm_s: float = 0.5) -> ClientState:
    return ClientState(
        id=cid,
        num_examples=100,
        last_loss=1.0,
        last_selected_round=1,
        last_duration_s=comm_s + 2 * epoch_s,
        epoch_s=epoch_s,
        comm_s=comm_s,
    )


def test_allocation_gives_slow_clients_the_epochs_that_fit() -> None:
    clients = (_timed("c0", 1.0), _timed("c1", 4.0), _timed("c2", 20.0))
    obs = plain_train_obs(
        target=3, clients=clients, limits=limits(max_clients=3, deadline_s=10.0)
    ).model_copy(update={"default_epochs": 3})

    d = DeterministicPolicy(exploration=0.0).decide(obs)

    # 0.5 + 3 x 1 fits; (10 - 0.5) // 4 = 2 epochs; not even one fits -> min_epochs.
    assert {c: a.local_epochs for c, a in d.allocations.items()} == {
        "c0": 3,
        "c1": 2,
        "c2": 1,
    }


def test_system_utility_prefers_fast_clients_below_the_preferred_time() -> None:
    clients = tuple(_timed(f"c{i}", 1.0 + i) for i in range(5))
    obs = plain_train_obs(
        round_=2, target=2, clients=clients, limits=limits(deadline_s=100.0)
    )

    durations = expected_durations(obs)  # 0.5 + 1 x epoch_s at default_epochs=1
    pref = preferred_duration(obs, quantile=0.5)
    util = utilities(obs, quantile=0.5)

    assert durations.tolist() == [1.5, 2.5, 3.5, 4.5, 5.5]
    assert pref == 3.5
    assert preferred_duration(obs) == 100.0
    assert util[0] == util[2]  # same stats, both within T
    assert math.isclose(util[4] / util[0], (3.5 / 5.5) ** 2)
    assert np.all(np.diff(util[2:]) < 0)


def test_a_client_that_never_replied_is_not_unseen_forever() -> None:
    clients = (
        ClientState(id="c0", num_examples=100, last_loss=1.0, last_selected_round=1),
        ClientState(
            id="c1", num_examples=100, rounds_selected=3, last_selected_round=3
        ),
        ClientState(id="c2", num_examples=100),
    )
    obs = plain_train_obs(round_=4, target=1, clients=clients)

    util = utilities(obs)

    assert np.isinf(util[2])  # never selected: explored first
    assert np.isfinite(util[1]) and util[1] < util[0]  # tried, no loss: stat 0


def test_exploration_puts_clients_too_slow_for_any_epochs_last() -> None:
    clients = (
        _timed("c0", 20.0).model_copy(update={"last_selected_round": 1}),
        _timed("c1", 2.0).model_copy(update={"last_selected_round": 2}),
        _timed("c2", 1.0).model_copy(update={"last_selected_round": 3}),
    )
    obs = plain_train_obs(
        round_=4, target=2, clients=clients, limits=limits(deadline_s=10.0)
    )

    d = DeterministicPolicy(exploration=0.5).decide(obs)

    # One exploration slot: the stalest client that can meet the deadline (c1),
    # not c0, whose one epoch (20 s) misses the 10 s deadline.
    assert d.selected[0] == "c1"


def test_config_reaches_the_policy_and_the_agents_deadline(tmp_path: Path) -> None:
    from fl_server.policy_setup import open_policy
    from fl_server.server_app import build_strategy
    from fl_server.strategy import AgentStrategy

    cfg = RunConfig.from_flat(
        {
            "policy.name": "deterministic",
            "policy.duration_quantile": 0.3,
            "devices.enabled": True,
            "devices.deadline_s": 12.0,
        }
    )

    with open_policy(cfg) as setup:
        strategy = build_strategy(cfg, tmp_path, setup)

    assert isinstance(strategy, AgentStrategy)
    assert isinstance(strategy.policy, DeterministicPolicy)
    assert strategy.policy.duration_quantile == 0.3
    assert strategy.limits.deadline_s == 12.0


def test_allocation_targets_the_preferred_round_time() -> None:
    clients = tuple(_timed(f"c{i}", 1.0 + i) for i in range(5))
    obs = plain_train_obs(
        target=5, clients=clients, limits=limits(max_clients=5, deadline_s=100.0)
    ).model_copy(update={"default_epochs": 2})

    d = DeterministicPolicy(exploration=0.0, duration_quantile=0.5).decide(obs)

    # Expected at 2 epochs: 2.5, 4.5, 6.5, 8.5, 10.5 s; T = median = 6.5 s. The most
    # epochs that fit T: 6 (capped at max_epochs 5), 3, 2, 1, 0 (-> min_epochs 1).
    assert {c: a.local_epochs for c, a in d.allocations.items()} == {
        "c0": 5,
        "c1": 3,
        "c2": 2,
        "c3": 1,
        "c4": 1,
    }


def test_never_timed_clients_wait_as_long_as_the_round_when_enough_are_measured() -> (
    None
):
    clients = (*(_timed(f"c{i}", 1.0 + i) for i in range(4)), ClientState(id="c4"))
    obs = plain_train_obs(
        round_=2, target=5, clients=clients, limits=limits(deadline_s=100.0)
    )

    d = DeterministicPolicy(exploration=0.0, duration_quantile=0.5).decide(obs)
    plain = DeterministicPolicy(exploration=0.0).decide(obs)

    # Expected at 1 epoch: 1.5, 2.5, 3.5, 4.5 s; T = median = 3.0 s. Four measured
    # clients >= min_clients (2): c4 waits until the slowest of them (4.5 s), the
    # time the round lasts anyway, not the whole deadline.
    assert d.allocations["c4"].deadline_s == 4.5
    assert all(d.allocations[f"c{i}"].deadline_s == 100.0 for i in range(4))
    assert plain.allocations["c4"].deadline_s == 100.0
