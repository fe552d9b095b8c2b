"""Epsilon values clients report (``dp-epsilon``), collected per round.

Kept apart from :mod:`fl_server.privacy` so that the strategies can import it without
an import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flwr.app import RecordDict

from fl_client.dp import EPSILON_METRIC


def record_reported_epsilon(
    epsilons: dict[str, float], cid: str, metrics: Mapping[str, object]
) -> None:
    """Copy a finite, non-negative ``dp-epsilon`` from ``metrics`` into ``epsilons``."""
    eps = metrics.get(EPSILON_METRIC)
    if isinstance(eps, int | float) and not isinstance(eps, bool):
        if math.isfinite(eps) and eps >= 0:
            epsilons[cid] = float(eps)


def record_client_epsilon(
    epsilons: dict[str, float], cid: str, content: RecordDict
) -> None:
    """As :func:`record_reported_epsilon`, for a Message-API reply's metrics."""
    for rec in content.metric_records.values():
        record_reported_epsilon(epsilons, cid, rec)


def epsilon_summary(epsilons: Mapping[str, float]) -> tuple[float | None, float | None]:
    """Return the round's (max, mean) epsilon, or ``(None, None)`` without DP."""
    if not epsilons:
        return None, None
    vals = list(epsilons.values())
    return max(vals), sum(vals) / len(vals)
