from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

from fl_server.robust import krum_scores, multikrum_select, pairwise_sq_distances


def as_contents(updates: np.ndarray) -> list[RecordDict]:
    """One reply content per row, split into two arrays like a small model."""
    half = updates.shape[1] // 2
    return [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {"w": Array(row[:half].copy()), "b": Array(row[half:].copy())}
                ),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        for row in updates
    ]


def flower_indices(updates: np.ndarray, f: int, m: int) -> list[int]:
    contents = as_contents(updates)
    chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
    return [next(i for i, c in enumerate(contents) if c is x) for x in chosen]


@pytest.mark.parametrize(
    ("seed", "n", "f", "m"),
    [(0, 10, 2, 6), (1, 10, 0, 1), (2, 7, 3, 3), (3, 20, 4, 10), (4, 3, 1, 2)],
)
def test_selects_the_same_indices_as_flower(seed: int, n: int, f: int, m: int) -> None:
    updates = np.random.default_rng(seed).normal(size=(n, 64))

    ours = multikrum_select(updates, num_malicious=f, num_keep=m)

    assert ours.tolist() == flower_indices(updates, f, m)


def test_distances_match_flower_and_are_clean() -> None:
    updates = np.random.default_rng(5).normal(size=(8, 32))
    records = [c.array_records["arrays"] for c in as_contents(updates)]

    ours = pairwise_sq_distances(updates)

    np.testing.assert_allclose(ours, compute_distances(records), atol=1e-9)
    assert np.all(np.diag(ours) == 0.0) and np.all(ours >= 0)
    np.testing.assert_allclose(ours, ours.T)


def test_drops_planted_outliers() -> None:
    rng = np.random.default_rng(7)
    honest = rng.normal(scale=0.1, size=(10, 100))
    outliers = rng.normal(loc=5.0, scale=0.1, size=(3, 100))
    updates = np.vstack([honest[:4], outliers, honest[4:]])  # rows 4, 5, 6 are bad

    kept = multikrum_select(updates, num_malicious=3, num_keep=7)

    assert len(kept) == 7
    assert not {4, 5, 6} & set(kept.tolist())


def test_krum_scores_known_values() -> None:
    # Points on a line at 0, 1, 3: n - f - 2 = 1 nearest neighbour with f = 0.
    updates = np.array([[0.0], [1.0], [3.0]])

    scores = krum_scores(updates, num_malicious=0)

    np.testing.assert_allclose(scores, [1.0, 1.0, 4.0])
    assert multikrum_select(updates, 0, 1).tolist() == [0]


def test_single_update_is_kept() -> None:
    assert multikrum_select(np.ones((1, 4)), 0, 1).tolist() == [0]


@pytest.mark.parametrize(
    ("shape", "f", "m"),
    [((4,), 0, 1), ((0, 3), 0, 1), ((4, 3), -1, 1), ((4, 3), 0, 0), ((4, 3), 0, 5)],
)
def test_bad_arguments_are_refused(shape: tuple[int, ...], f: int, m: int) -> None:
    with pytest.raises(ValueError):
        multikrum_select(np.ones(shape), f, m)
