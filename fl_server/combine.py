"""The policy's weights combined with a robust rule, as pure functions.

``combine(updates, weights, rule)`` is what the agent strategy aggregates with; the
rule is the policy's choice (``Decision.aggregation``), bounded by ``defense.rules``.

=========  ===============================================================
rule       aggregate of the accepted updates ``U`` with weights ``w``
=========  ===============================================================
weighted   ``sum_i w_i U_i`` (weights normalised)
trimmed    per coordinate, the ``floor(beta n)`` lowest and highest values
           are dropped and the rest averaged with their clients' weights
median     per coordinate, the weighted median (lower one on a tie)
krum       multi-Krum keeps the ``n - f`` most central rows; their
           weighted mean
=========  ===============================================================
"""

from __future__ import annotations

import numpy as np

from .aggregation import weighted_mean
from .robust import multikrum_select


def _check(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if updates.ndim != 2 or w.shape != (updates.shape[0],):
        raise ValueError(f"{updates.shape[0]} updates but weights of shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative, with a positive sum")
    return w / w.sum()


def weighted_trimmed_mean(
    updates: np.ndarray, weights: np.ndarray, beta: float
) -> np.ndarray:
    """Return the coordinate-wise weighted mean after trimming ``beta`` at each end.

    ``k = floor(beta * n)`` values are dropped at each end of every coordinate (as
    Flower's ``FedTrimmedAvg``); the remaining values are averaged with the weights
    of the clients they came from (renormalised per coordinate; equal weights give
    the plain trimmed mean).
    """
    w = _check(updates, weights)
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    n = updates.shape[0]
    k = int(np.floor(beta * n))
    if k == 0:
        return weighted_mean(updates, w)
    order = np.argsort(updates, axis=0, kind="stable")[k : n - k]
    vals = np.take_along_axis(updates, order, axis=0)
    ws = w[order].astype(updates.dtype)
    total = ws.sum(axis=0)
    total = np.where(total > 0, total, 1.0)
    return np.asarray((ws * vals).sum(axis=0) / total, dtype=updates.dtype)


def weighted_median(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the coordinate-wise weighted median (lower median on a tie).

    For each coordinate, the smallest value at which the weights of the values at or
    below it reach half the total. Equal weights and an odd ``n`` give the ordinary
    median.
    """
    w = _check(updates, weights)
    order = np.argsort(updates, axis=0, kind="stable")
    cum = np.cumsum(w[order], axis=0)
    idx = np.argmax(cum >= 0.5 - 1e-12, axis=0)
    pick = np.take_along_axis(order, idx[None, :], axis=0)
    return np.asarray(np.take_along_axis(updates, pick, axis=0)[0])


def krum_weighted_mean(
    updates: np.ndarray, weights: np.ndarray, num_malicious: int
) -> np.ndarray:
    """Return the weighted mean of the ``n - f`` rows multi-Krum keeps."""
    w = _check(updates, weights)
    n = updates.shape[0]
    f = min(max(num_malicious, 0), max(n - 1, 0))
    keep = np.sort(multikrum_select(updates, f, max(n - f, 1)))
    wk = w[keep]
    if wk.sum() <= 0:
        wk = np.ones(len(keep))
    return weighted_mean(updates[keep], wk)


def combine(
    updates: np.ndarray,
    weights: np.ndarray,
    rule: str,
    *,
    trim_beta: float = 0.2,
    krum_byzantine: int = 2,
) -> np.ndarray:
    """Return the aggregate update of ``rule`` (see the module's table)."""
    if rule == "weighted":
        return weighted_mean(updates, weights)
    if rule == "trimmed":
        return weighted_trimmed_mean(updates, weights, trim_beta)
    if rule == "median":
        return weighted_median(updates, weights)
    if rule == "krum":
        return krum_weighted_mean(updates, weights, krum_byzantine)
    raise ValueError(
        f"unknown aggregation rule {rule!r}; valid: weighted, trimmed, median, krum"
    )
