"""Server-measured features of a round's updates, as pure functions on the matrix.

The update matrix ``U`` has one row per accepted reply (``new - global``, flattened).
These features reach the policy through :class:`~agent_strategy.ReplyFeatures`; the
detectors that turn them into flags are in :mod:`agent_strategy.detection`.
"""

from __future__ import annotations

import numpy as np

from .aggregation import coordinate_median, cosine_to, l2_norms
from .robust import krum_scores


def duplicate_counts(
    updates: np.ndarray, rel_tol: float = 1e-6, norms: np.ndarray | None = None
) -> np.ndarray:
    """Return, per row, how many other rows are identical to it within ``rel_tol``.

    Two rows ``a``, ``b`` count as identical when ``||a - b|| <= rel_tol *
    max(||a||, ||b||)`` (so two all-zero updates are identical too). Honest clients
    training on different data never send identical updates; colluders sending one
    crafted update, or free-riders returning the global model, do. ``norms`` (the
    rows' L2 norms, if already computed) saves one pass over the matrix.
    """
    u = np.asarray(updates)
    n = u.shape[0]
    counts = np.zeros(n, dtype=int)
    if n < 2:
        return counts
    # | ||a|| - ||b|| | <= ||a - b||: only pairs whose norms agree within the
    # tolerance can be identical, and honest rounds have none, so the exact
    # distances are computed for candidate pairs only (no n x n x d work).
    if norms is None:
        norms = l2_norms(u)
    for i in range(n):
        for j in range(i + 1, n):
            scale = max(norms[i], norms[j])
            if abs(norms[i] - norms[j]) > rel_tol * scale:
                continue
            diff = np.linalg.norm(u[i].astype(np.float64) - u[j].astype(np.float64))
            if diff <= rel_tol * scale:
                counts[i] += 1
                counts[j] += 1
    return counts


def krum_ratios(
    updates: np.ndarray, sq_norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's Krum score over the round's median score, and its rank.

    The score assumes up to ``(n - 3) // 2`` attackers (each row is compared with its
    ``n - f - 2`` nearest others, about half the round), so it stays meaningful while
    honest replies are the majority. Rank 1 is the most central row. With fewer than
    3 rows every ratio is 1 and ranks follow the row order. ``sq_norms`` are the
    rows' squared L2 norms, if already computed.
    """
    n = np.asarray(updates).shape[0]
    if n < 3:
        return np.ones(n), np.arange(1, n + 1)
    scores = krum_scores(updates, max(0, (n - 3) // 2), sq_norms).astype(np.float64)
    med = float(np.median(scores))
    ratios = scores / med if med > 0 else np.where(scores > 0, np.inf, 1.0)
    ranks = np.empty(n, dtype=int)
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, n + 1)
    return np.asarray(np.minimum(ratios, 1e12)), ranks


def update_features(
    updates: np.ndarray, geometry: bool = True, norms: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Return every per-row feature: norm, cosine to the median, Krum, duplicates.

    With ``geometry=False`` only ``update_norm`` is computed (one pass): the
    median, Krum's pairwise distances and the duplicate check are the costly part,
    and a run whose policies never read them (the deterministic policy without
    defense) skips them.

    One pass computes the rows' squared norms, shared by the norms, the cosines,
    Krum's distances and the duplicate check; the coordinate median comes from a
    sorting network pruned to the middle rows (:func:`coordinate_median`).
    ``norms`` are the rows' :func:`~fl_server.aggregation.l2_norms` if the caller
    has them already.
    """
    u = np.asarray(updates)
    # l2_norms sums squares in float64: finite for any finite float32 update, so
    # the cosine never becomes inf / inf.
    norms = l2_norms(u) if norms is None else np.asarray(norms)
    sq = norms**2
    if not geometry:
        return {"update_norm": norms}
    ratios, ranks = krum_ratios(u, sq)
    return {
        "update_norm": norms,
        "cosine_to_median": cosine_to(u, coordinate_median(u), norms),
        "krum_ratio": ratios,
        "distance_rank": ranks,
        "duplicates": duplicate_counts(u, norms=norms),
    }
