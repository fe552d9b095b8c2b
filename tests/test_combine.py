"""Robust aggregation rules combined with the policy's weights, on known arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fl_server.aggregation import coordinate_median, trimmed_mean
from fl_server.combine import (
    combine,
    krum_weighted_mean,
    weighted_median,
    weighted_trimmed_mean,
)

U = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -500.0]])


def test_weighted_trimmed_mean_equals_trimmed_mean_with_equal_weights() -> None:
    got = weighted_trimmed_mean(U, np.ones(5), beta=0.2)

    np.testing.assert_allclose(got, trimmed_mean(U, 0.2))
    np.testing.assert_allclose(got, [3.0, 20.0])


def test_weighted_trimmed_mean_uses_the_weights_of_the_kept_values() -> None:
    # column 0 keeps rows 1,2,3 (values 2,3,4) with weights 1,1,2 -> 13/4
    got = weighted_trimmed_mean(U, np.array([1.0, 1.0, 1.0, 2.0, 1.0]), beta=0.2)

    assert got[0] == pytest.approx((2 + 3 + 8) / 4)


def test_weighted_median_known_values() -> None:
    np.testing.assert_allclose(weighted_median(U, np.ones(5)), coordinate_median(U))
    heavy = weighted_median(U, np.array([0.1, 0.1, 0.1, 0.1, 5.0]))
    np.testing.assert_allclose(heavy, [100.0, -500.0])


def test_krum_weighted_mean_drops_the_outlier() -> None:
    got = krum_weighted_mean(U, np.array([1.0, 1.0, 1.0, 1.0, 1.0]), num_malicious=1)

    np.testing.assert_allclose(got, [2.5, 25.0])


@pytest.mark.parametrize("rule", ["weighted", "trimmed", "median", "krum"])
def test_combine_dispatches_and_checks(rule: str) -> None:
    clean = np.tile(np.array([1.0, -1.0]), (4, 1))

    np.testing.assert_allclose(combine(clean, np.ones(4), rule), [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        combine(clean, np.array([1.0, np.nan, 1.0, 1.0]), rule)


def test_combine_rejects_an_unknown_rule() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'mean'"):
        combine(U, np.ones(5), "mean")
