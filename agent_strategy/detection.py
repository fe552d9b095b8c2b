"""Deterministic adversary detectors over a round's reply features, with reasons.

Each detector is a pure function of the :class:`~agent_strategy.ReplyFeatures` of one
round (measured by the server, never reported by the client). A reply is flagged as
``malicious`` when at least one detector fires; the flag's reason names every detector
that fired and the numbers behind it, and flags are ordered most suspicious first (so
that when the guard caps the share of flagged replies it keeps the worst ones).

Detectors
---------
* norm: robust z-score (median / MAD) of ``log(update_norm)`` far above the round
  (boosted or noise updates), or a norm below ``low_norm_ratio`` times the round's
  median (free-riding: little or no work; honest clients with little data have
  smaller norms, so this side is a ratio, not a z-score);
* direction: ``cosine_to_median`` below ``min_cosine`` with a norm at least the
  round's median (a reversed update that is not small), or below ``min_cosine -
  strong_reversal`` whatever its norm. Under non-IID data honest clients with a
  near-zero cosine are common (small, one-class partitions), so a low cosine alone,
  or a cosine z-score, flagged about one honest reply in 20 on the benchmark task;
* distance: robust z-score of ``log(krum_ratio)`` above ``krum_factor`` times the
  threshold (far from its nearest neighbours; mostly redundant with the norm);
* duplicates: an update identical to another reply's (collusion, free-riding).

Robust z-scores need at least ``min_replies_for_z`` replies; the direction threshold
and the duplicate check apply to any round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .types import Flag, ReplyFeatures

_MAD_TO_SD = 0.6745  # the MAD of a normal distribution is 0.6745 standard deviations


@dataclass(frozen=True)
class DetectionParams:
    """Thresholds of the detectors (``defense.*`` in the run configuration)."""

    z_threshold: float = 3.5
    min_cosine: float = 0.0
    min_replies_for_z: int = 4
    low_norm_ratio: float = 0.1
    strong_reversal: float = 0.3
    krum_factor: float = 2.0


def robust_z(values: np.ndarray) -> np.ndarray:
    """Return the modified z-score ``0.6745 (x - median) / MAD`` of each value.

    Iglewicz and Hoaglin's score: about a standard normal for normal data, and
    unmoved by a minority of outliers. A zero MAD (more than half the values equal)
    falls back to the mean absolute deviation (times ``0.7979``, its ratio to the
    standard deviation); if that is zero too, values equal to the median score 0
    and the others ``+/- inf``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    med = float(np.median(x))
    dev = x - med
    mad = float(np.median(np.abs(dev)))
    if mad > 0:
        return _MAD_TO_SD * dev / mad
    mean_ad = float(np.mean(np.abs(dev)))
    if mean_ad > 0:
        return 0.7979 * dev / mean_ad
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dev == 0, 0.0, np.sign(dev) * np.inf)


def _log(values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-12))


def detect(
    replies: Sequence[ReplyFeatures], params: DetectionParams = DetectionParams()
) -> tuple[Flag, ...]:
    """Return a ``malicious`` flag for each suspicious reply, most suspicious first.

    Parameters
    ----------
    replies : sequence of ReplyFeatures
        One round's accepted replies.
    params : DetectionParams
        The thresholds.

    Returns
    -------
    tuple of Flag
        At most one flag per reply; its reason lists each detector that fired.
    """
    n = len(replies)
    if n == 0:
        return ()
    if any(r.cosine_to_median is None or r.krum_ratio is None for r in replies):
        raise ValueError(
            "detection needs the update geometry (cosine_to_median, krum_ratio); "
            "the strategy did not measure it"
        )
    thr = params.z_threshold
    norms = np.array([r.update_norm for r in replies])
    cos = np.array([r.cosine_to_median for r in replies])
    krum = np.array([r.krum_ratio for r in replies])
    use_z = n >= params.min_replies_for_z
    z_norm = robust_z(_log(norms)) if use_z else np.zeros(n)
    z_cos = robust_z(cos) if use_z else np.zeros(n)
    z_krum = robust_z(_log(krum)) if use_z else np.zeros(n)
    med_norm = float(np.median(norms))
    med_cos = float(np.median(cos))

    scored: list[tuple[float, int, Flag]] = []
    for i, r in enumerate(replies):
        reasons: list[str] = []
        severity = 0.0
        if z_norm[i] > thr:
            reasons.append(
                f"update norm {r.update_norm:.3g} is {z_norm[i]:.1f} robust SDs above "
                f"the round's median {med_norm:.3g}"
            )
            severity = max(severity, z_norm[i])
        elif n >= 2 and r.update_norm < params.low_norm_ratio * med_norm:
            reasons.append(
                f"update norm {r.update_norm:.3g} is below {params.low_norm_ratio:g}x "
                f"the round's median {med_norm:.3g} (little or no work)"
            )
            severity = max(severity, thr + 1.0)
        reversed_big = cos[i] < params.min_cosine and r.update_norm >= med_norm
        strong = cos[i] < params.min_cosine - params.strong_reversal
        if reversed_big or strong:
            reasons.append(
                f"cosine to the coordinate median {cos[i]:.2f} < "
                f"{params.min_cosine:.2f} (the round's median {med_cos:.2f}"
                f"{', z ' + format(z_cos[i], '.1f') if use_z else ''})"
                + ("" if strong else " with a norm above the median")
            )
            gap = params.min_cosine - cos[i]
            severity = max(severity, thr + 10 * gap)
        if z_krum[i] > params.krum_factor * thr:
            reasons.append(
                f"Krum score {r.krum_ratio:.3g}x the round's median "
                f"({z_krum[i]:.1f} robust SDs above; distance rank "
                f"{r.distance_rank}/{n})"
            )
            severity = max(severity, z_krum[i])
        if r.duplicates:
            reasons.append(
                f"update identical to {r.duplicates} other repl"
                f"{'y' if r.duplicates == 1 else 'ies'} (collusion or copying)"
            )
            severity = max(severity, 1e6 + r.duplicates)
        if reasons:
            sev = severity if math.isfinite(severity) else 1e9
            reason = "; ".join(reasons)
            if len(reason) > 300:
                reason = reason[:297] + "..."
            scored.append((sev, i, Flag(id=r.id, kind="malicious", reason=reason)))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return tuple(f for _, _, f in scored)
