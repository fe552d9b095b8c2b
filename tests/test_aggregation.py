from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean

from fl_server.aggregation import (
    NETWORK_MAX_ROWS,
    coordinate_median,
    cosine_to,
    flatten_arrays,
    l2_norms,
    sort_columns,
    sorting_network,
    trimmed_mean,
    unflatten_vector,
    weighted_mean,
)


def test_weighted_mean_known_values() -> None:
    u = np.array([[1.0, 0.0], [3.0, 4.0]])

    assert weighted_mean(u, np.array([1.0, 3.0])) == pytest.approx([2.5, 3.0])


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0]]
)
def test_weighted_mean_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        weighted_mean(np.ones((2, 3)), np.array(weights))


def test_trimmed_mean_matches_flower() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(10, 50))

    assert trimmed_mean(u, 0.2) == pytest.approx(flower_trim_mean(u, 0.2))


def test_trimmed_mean_ignores_outliers_and_median_too() -> None:
    u = np.array([[1.0], [1.0], [1.0], [1.0], [1000.0]])

    assert trimmed_mean(u, 0.2)[0] == pytest.approx(1.0)
    assert coordinate_median(u)[0] == pytest.approx(1.0)


def test_norms_and_cosines() -> None:
    u = np.array([[3.0, 4.0], [-3.0, -4.0], [0.0, 0.0]])

    assert l2_norms(u) == pytest.approx([5.0, 5.0, 0.0])
    assert cosine_to(u, np.array([3.0, 4.0])) == pytest.approx([1.0, -1.0, 0.0])
    assert cosine_to(u, np.zeros(2)) == pytest.approx([0.0, 0.0, 0.0])
    norms = np.linalg.norm(u, axis=1)
    assert cosine_to(u, np.array([3.0, 4.0]), norms) == pytest.approx([1.0, -1.0, 0.0])


def test_flatten_unflatten_roundtrip() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.0], np.float32)]

    v = flatten_arrays(arrays)
    back = unflatten_vector(v, [a.shape for a in arrays], [a.dtype for a in arrays])

    assert v.shape == (7,)
    for a, b in zip(arrays, back, strict=True):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        unflatten_vector(v[:-1], [a.shape for a in arrays], [a.dtype for a in arrays])


@pytest.mark.parametrize("rows", [1, 2, 5, 10])
def test_coordinate_median_matches_numpy(rows: int) -> None:
    u = np.random.default_rng(rows).normal(size=(rows, 33))

    np.testing.assert_allclose(
        coordinate_median(u), np.median(u, axis=0), rtol=0, atol=0
    )


@pytest.mark.parametrize("rows", range(NETWORK_MAX_ROWS + 3))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sort_columns_equals_numpy_sort_with_ties(rows: int, dtype: type) -> None:
    u = np.random.default_rng(rows).normal(size=(rows, 50)).astype(dtype)
    u[:, :10] = np.round(u[:, :10])  # ties
    u[: rows // 2, 10] = -0.0  # signed zeros compare equal

    out = sort_columns(u)

    assert out.dtype == u.dtype
    np.testing.assert_array_equal(out, np.sort(u, axis=0))
    if rows:
        np.testing.assert_array_equal(coordinate_median(u), np.median(u, axis=0))


@pytest.mark.parametrize("rows", range(1, NETWORK_MAX_ROWS + 1))
def test_sorting_network_sorts_every_zero_one_input(rows: int) -> None:
    # The 0-1 principle: a comparator network sorts every input iff it sorts
    # every 0/1 input. All 2**rows of them, one column each.
    cols = np.arange(2**rows)
    wires = [((cols >> i) & 1).astype(np.int8) for i in range(rows)]
    expected = np.sort(np.stack(wires), axis=0)
    full = [w.copy() for w in wires]
    for i, j in sorting_network(rows):
        assert 0 <= i < j < rows
        full[i], full[j] = np.minimum(full[i], full[j]), np.maximum(full[i], full[j])
    np.testing.assert_array_equal(np.stack(full), expected)
    mid = rows // 2
    middle = (mid,) if rows % 2 else (mid - 1, mid)
    pruned = sorting_network(rows, middle)
    assert len(pruned) <= len(sorting_network(rows))
    part = [w.copy() for w in wires]
    for i, j in pruned:
        part[i], part[j] = np.minimum(part[i], part[j]), np.maximum(part[i], part[j])
    for k in middle:
        np.testing.assert_array_equal(part[k], expected[k])


def test_sorting_network_is_smaller_than_transposition() -> None:
    assert len(sorting_network(10)) == 32  # vs 45 for odd-even transposition
    assert len(sorting_network(10, (4, 5))) < 32
    with pytest.raises(ValueError, match="n must be"):
        sorting_network(-1)
