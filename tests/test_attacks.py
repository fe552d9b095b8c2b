"""Simulated adversaries: who attacks, and exactly what each attack sends."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from inprocess import InProcessGrid

from fl_client.attacks import (
    Attacker,
    attacker_for,
    flip_labels,
    free_ride,
    gaussian_update,
    malicious_partitions,
    scale_update,
    sign_flip,
)
from fl_client.client_app import make_client_app
from fl_client.task import build_model, load_dataset
from fl_client.task.data import ArrayDataset
from orchestration.config import RunConfig

G = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
L = [np.array([2.0, 1.0], np.float32), np.array([[0.5]], np.float32)]


def test_malicious_partitions_are_a_deterministic_share() -> None:
    a = malicious_partitions(20, 0.2, seed=0)

    assert a == malicious_partitions(20, 0.2, seed=0)
    assert len(a) == 4 and len(set(a)) == 4 and all(0 <= p < 20 for p in a)
    assert list(a) == sorted(a)
    assert len(malicious_partitions(20, 0.4, seed=0)) == 8
    assert malicious_partitions(20, 0.0, seed=0) == ()
    assert (
        malicious_partitions(20, 0.2, seed=1) != a
        or malicious_partitions(20, 0.2, seed=2) != a
    )
    with pytest.raises(ValueError, match="fraction"):
        malicious_partitions(20, 1.5, seed=0)


def test_sign_flip_and_scaling_send_the_scaled_update() -> None:
    flipped = sign_flip(G, L, scale=4.0)
    scaled = scale_update(G, L, scale=10.0)

    np.testing.assert_allclose(flipped[0], [1 - 4, 2 + 4])
    np.testing.assert_allclose(flipped[1], [[-2.0]])
    np.testing.assert_allclose(scaled[0], [1 + 10, 2 - 10])
    np.testing.assert_allclose(scaled[1], [[5.0]])
    assert all(a.dtype == np.float32 for a in flipped + scaled)


def test_noise_replaces_the_update_by_gaussian_noise() -> None:
    big = [np.zeros(100_000, np.float32)]

    sent = gaussian_update(big, std=2.0, rng=np.random.default_rng(0))

    assert sent[0].dtype == np.float32
    assert abs(float(sent[0].mean())) < 0.05
    assert float(sent[0].std()) == pytest.approx(2.0, rel=0.02)


def test_free_riding_returns_the_global_model() -> None:
    sent = free_ride(G)

    assert all(np.array_equal(a, b) for a, b in zip(sent, G, strict=True))
    assert sent[0] is not G[0]


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    d = ArrayDataset(np.zeros((3, 1, 1, 1), np.float32), np.array([0, 3, 9]), 10)

    assert flip_labels(d).y.tolist() == [9, 6, 0]


def test_stale_attacker_replays_the_first_model_it_received() -> None:
    state = RecordDict()
    att = Attacker("stale", 1, 1, 4.0, 1.0, 0, 3)
    later = [a + 5 for a in G]

    first = att.reply(G, L, state)
    second = att.reply(later, L, state)

    assert all(np.array_equal(a, b) for a, b in zip(first, G, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(second, G, strict=True))


def test_attacker_for_respects_kind_fraction_and_start_round() -> None:
    cfg = RunConfig.from_flat(
        {"attack.kind": "sign_flip", "attack.fraction": 0.2, "attack.start_round": 3}
    )
    bad = malicious_partitions(20, 0.2, 0)
    honest = next(p for p in range(20) if p not in bad)

    assert attacker_for(cfg, bad[0], 2) is None
    assert attacker_for(cfg, honest, 3) is None
    att = attacker_for(cfg, bad[1], 3)
    assert att is not None and att.kind == "sign_flip" and att.leader == bad[0]
    assert attacker_for(RunConfig(), bad[0], 5) is None  # off by default


def _train_reply(cfg: RunConfig, pid: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    d = load_dataset("digits")
    model = build_model("mlp", d.input_shape, 10)
    arrays = ArrayRecord(model.state_dict())
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)
    nid = next(n for n, p in grid.nodes.items() if p == pid)
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        message_type=MessageType.TRAIN,
        dst_node_id=nid,
    )
    reply = next(iter(grid.send_and_receive([msg])))
    sent = reply.content["arrays"].to_numpy_ndarrays()
    return arrays.to_numpy_ndarrays(), sent


def _cfg(kind: str) -> RunConfig:
    return RunConfig.from_flat(
        {
            "dataset.name": "digits",
            "model.name": "mlp",
            "num_clients": 5,
            "clients_per_round": 5,
            "attack.kind": kind,
            "attack.fraction": 0.4,
        }
    )


def test_the_client_app_sends_the_attack() -> None:
    bad = malicious_partitions(5, 0.4, 0)
    honest = next(p for p in range(5) if p not in bad)

    glob, free = _train_reply(_cfg("free_ride"), bad[0])
    _, honest_sent = _train_reply(_cfg("free_ride"), honest)
    _, c1 = _train_reply(_cfg("collude"), bad[0])
    _, c2 = _train_reply(_cfg("collude"), bad[1])

    assert all(np.array_equal(a, b) for a, b in zip(free, glob, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(honest_sent, glob, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(c1, c2, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(c1, glob, strict=True))
