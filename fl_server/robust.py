"""Byzantine-robust selection (Krum / multi-Krum) as pure functions on updates.

Multi-Krum (Blanchard et al., NeurIPS 2017) scores each update by the sum of its
squared L2 distances to its ``n - f - 2`` nearest other updates (``f`` the assumed
number of attackers) and keeps the ``m`` lowest-scoring ones; ``m = 1`` is Krum. The
selection equals Flower's ``flwr.serverapp.strategy.multikrum.select_multikrum``
(which works on ``RecordDict`` replies); here the input is the update matrix ``U``
of :mod:`fl_server.aggregation`, one row per client, nothing Flower-specific.

Cost: the pairwise distances are inherently ``O(n^2 d)`` for ``n`` updates of ``d``
coordinates (one Gram matrix ``U @ U.T``), plus ``O(n^2)`` memory for the distance
matrix; the nearest-neighbour sums add ``O(n^2)`` with ``np.partition``.
"""

from __future__ import annotations

import numpy as np


def pairwise_sq_distances(
    updates: np.ndarray, sq_norms: np.ndarray | None = None
) -> np.ndarray:
    """Return the ``(n, n)`` matrix of squared L2 distances between rows.

    Uses ``||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y`` with one Gram matrix, so it is
    one BLAS matrix product rather than ``n^2`` vector differences. Rounding can make
    the identity slightly negative; such entries are clipped to 0, and the diagonal
    is exactly 0.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``; floating dtypes are used as they are (no copy), others are
        converted to float64.
    sq_norms : np.ndarray, optional
        The rows' squared L2 norms, if the caller has them (one pass less).

    Returns
    -------
    np.ndarray
        Symmetric, non-negative, zero diagonal.
    """
    u = np.asarray(updates)
    if not np.issubdtype(u.dtype, np.floating):
        u = u.astype(np.float64)
    if u.ndim != 2:
        raise ValueError(f"updates must be 2-D (n, d), got shape {u.shape}")
    sq = np.einsum("ij,ij->i", u, u) if sq_norms is None else np.asarray(sq_norms)
    with np.errstate(over="ignore"):  # checked just below
        gram = u @ u.T
    if not np.all(np.isfinite(gram)):  # float32 overflow: huge updates
        u64 = u.astype(np.float64)
        gram, sq = u64 @ u64.T, np.einsum("ij,ij->i", u64, u64)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return np.asarray(dist)


def krum_scores(
    updates: np.ndarray, num_malicious: int, sq_norms: np.ndarray | None = None
) -> np.ndarray:
    """Return each row's Krum score.

    The score of row ``i`` is the sum of its squared distances to its
    ``max(1, n - f - 2)`` nearest other rows (at most ``n - 1``), as in Flower.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``, ``n >= 2``.
    num_malicious : int
        ``f``, the number of attackers assumed, ``>= 0``.
    sq_norms : np.ndarray, optional
        The rows' squared L2 norms, if the caller has them.
    """
    n = np.asarray(updates).shape[0]
    if n < 2:
        raise ValueError(f"Krum needs at least 2 updates, got {n}")
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    closest = min(max(1, n - num_malicious - 2), n - 1)
    dist = pairwise_sq_distances(updates, sq_norms)
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    nearest = np.partition(dist, closest - 1, axis=1)[:, :closest]
    return np.asarray(nearest.sum(axis=1))


def multikrum_select(
    updates: np.ndarray, num_malicious: int, num_keep: int
) -> np.ndarray:
    """Return the indices of the ``num_keep`` rows multi-Krum keeps, best first.

    Parameters
    ----------
    updates : np.ndarray
        Shape ``(n, d)``: one flattened update (or model) per client.
    num_malicious : int
        ``f``, the number of attackers assumed. Krum's guarantee needs
        ``n > 2 f + 2``; like Flower, smaller ``n`` is accepted and each row is then
        scored against its single nearest neighbour.
    num_keep : int
        ``m`` in ``1..n``; ``1`` is classical Krum.

    Returns
    -------
    np.ndarray
        Integer indices into ``updates``, ordered by increasing score (ties by
        index), the same selection as Flower's ``select_multikrum``.

    Raises
    ------
    ValueError
        If ``updates`` is not 2-D with at least one row, ``num_malicious < 0`` or
        ``num_keep`` is outside ``1..n``.

    Notes
    -----
    Inherently ``O(n^2 d)`` time: every pair of updates is compared once, through
    the Gram matrix (see :func:`pairwise_sq_distances`).
    """
    u = np.asarray(updates)
    if u.ndim != 2 or u.shape[0] < 1:
        raise ValueError(f"updates must be 2-D with at least one row, got {u.shape}")
    n = u.shape[0]
    if not 1 <= num_keep <= n:
        raise ValueError(f"num_keep must be in 1..{n}, got {num_keep}")
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    if n == 1:
        return np.zeros(1, dtype=np.intp)
    scores = krum_scores(u, num_malicious)
    return np.asarray(np.argsort(scores, kind="stable")[:num_keep])
