"""Which reply features the strategy measures, and that skipping them is exact."""

from __future__ import annotations

import numpy as np
import pytest
from support.factories import reply

from agent_strategy import DeterministicPolicy, ReplyFeatures
from agent_strategy.detection import DetectionParams, detect
from fl_server.aggregation import coordinate_median, cosine_to, weighted_mean
from fl_server.features import update_features
from fl_server.robust import krum_scores, pairwise_sq_distances
from fl_server.server_app import uses_update_geometry


def _updates(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(9, 301)).astype(np.float32)


def test_without_geometry_only_the_norms_are_measured_and_equal() -> None:
    u = _updates()
    full = update_features(u)
    norms_only = update_features(u, geometry=False)

    assert set(norms_only) == {"update_norm"}
    np.testing.assert_allclose(norms_only["update_norm"], full["update_norm"])
    np.testing.assert_allclose(
        full["update_norm"], np.linalg.norm(u.astype(np.float64), axis=1), rtol=1e-6
    )


def test_full_features_match_their_definitions() -> None:
    u = _updates(1)
    feats = update_features(u)
    med = np.median(u.astype(np.float64), axis=0)
    expected_cos = (u @ med) / (np.linalg.norm(u, axis=1) * np.linalg.norm(med))
    np.testing.assert_allclose(feats["cosine_to_median"], expected_cos, atol=1e-5)
    scores = krum_scores(u.astype(np.float64), (9 - 3) // 2)
    np.testing.assert_allclose(
        feats["krum_ratio"], scores / np.median(scores), rtol=1e-4
    )
    assert sorted(feats["distance_rank"].tolist()) == list(range(1, 10))
    assert feats["duplicates"].tolist() == [0] * 9


def test_shared_squared_norms_give_the_same_distances() -> None:
    u = _updates(2)
    sq = np.einsum("ij,ij->i", u, u)
    np.testing.assert_array_equal(
        pairwise_sq_distances(u, sq), pairwise_sq_distances(u)
    )


def test_einsum_products_equal_numpy_matmul() -> None:
    u = _updates(3)
    w = np.arange(1.0, 10.0)
    np.testing.assert_allclose(
        weighted_mean(u, w), (w / w.sum()) @ u.astype(np.float64), rtol=1e-5, atol=1e-6
    )
    centre = coordinate_median(u)
    np.testing.assert_allclose(
        cosine_to(u, centre),
        (u @ centre) / (np.linalg.norm(u, axis=1) * np.linalg.norm(centre)),
        rtol=1e-5,
    )


def test_geometry_is_measured_exactly_when_a_policy_reads_it() -> None:
    assert not uses_update_geometry(DeterministicPolicy())
    assert uses_update_geometry(DeterministicPolicy(detection=DetectionParams()))
    assert uses_update_geometry(object())  # an LLM or router: shown the features


def test_detection_refuses_unmeasured_geometry() -> None:
    unmeasured = ReplyFeatures(
        id="c1",
        num_examples=10,
        train_loss=0.5,
        duration_s=1.0,
        update_norm=1.0,
        cosine_to_median=None,
    )
    with pytest.raises(ValueError, match="update geometry"):
        detect([reply("c0"), unmeasured, reply("c2")], DetectionParams())


def test_build_strategy_measures_geometry_only_with_defense(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fl_server.server_app import build_strategy
    from fl_server.strategy import AgentStrategy
    from orchestration.config import RunConfig

    base = {"policy.name": "deterministic", "output_dir": str(tmp_path)}
    plain = build_strategy(RunConfig.from_flat(base), tmp_path)
    defended = build_strategy(
        RunConfig.from_flat({**base, "defense.enabled": True}), tmp_path
    )
    assert isinstance(plain, AgentStrategy) and isinstance(defended, AgentStrategy)
    assert not plain.update_geometry
    assert defended.update_geometry


def test_huge_finite_updates_give_finite_features() -> None:
    # An attacker's update of norm ~1e33 (finite float32): float32 sums of squares
    # overflow, the features must not turn into inf / inf = NaN.
    u = _updates(4)
    u[0] *= np.float32(1e32)
    feats = update_features(u)
    for name, values in feats.items():
        assert np.all(np.isfinite(values)), name
    assert feats["update_norm"][0] > 1e33
    assert feats["distance_rank"][0] == 9  # the farthest
    assert np.all(np.abs(feats["cosine_to_median"]) <= 1.0)
