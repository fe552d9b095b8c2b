"""Deterministic adversary detectors over a round's reply features, with reasons.

Each detector is a pure function of the :class:`~agent_strategy.ReplyFeatures` of one
round (measured by the server, never reported by the client). A reply is flagged as
``malicious`` when at least one detector fires; the flag's reason names every detector
that fired and the numbers behind it, and flags are ordered most suspicious first (so
that when the guard caps the share of flagged replies it keeps the worst ones).

Norms per example
-----------------
Every norm below is a *scaled* norm: ``update_norm * (m / examples) ** a`` with
``examples`` the client's registered training examples (its roll-call count, which
a client cannot inflate by reporting more; the reported count when unknown), ``m``
the round's median of those and ``a`` = ``norm_examples_exponent`` (0.5). With a
fixed batch size a client with k times the examples takes k times the local steps,
and an honest update's norm grows with them (about as sqrt(k) late in training,
when the steps' directions decorrelate). Unscaled, the benchmark's three largest
clients (329, 278 and 262 examples, 2-4.6x the reference norm) were flagged again
and again as attackers; scaled, their norms are ordinary, while a reversed x4,
boosted or noise update stays far away. Replayed on five logged benchmark runs
(:mod:`experiments.replay_detection`), sign flip at 20% on seed 1 went from
precision / recall 0.47 / 1.00 to 0.88 / 0.88, seed 0 from 1.00 / 0.89 to
1.00 / 1.00. ``a = 0`` compares raw norms.

Reference
---------
Norms are compared with a reference norm: the round's median, or, when at least
half of the round's norms are more than ``core_cap`` times the median of the round's
*core*, the core's median. The core is the replies whose Krum distance rank is in
the better half (the most central), duplicates left out. When attackers are half or
more of a round (with 40% malicious clients, 5 or 6 of the 10 sampled happens) the
round's median is theirs, or, at exactly half, the midpoint between the largest
honest norm and the smallest attacker's; but far-away updates (boosted, reversed
x4, noise) are never central, so the core's median stays an honest one. The test
is on the *upper* median (the ``n // 2``-th norm from the smallest, counting from
0; the median itself when ``n`` is odd): with an even ``n`` the plain median
averages the two middle norms and an outlying half could pull it only part way
past ``core_cap``. On the benchmark that happened in seed 1's sign flip at 40%,
rounds 1 and 4, five attackers in ten at a round median of 1.6-1.7x the core's;
replayed on the 55 logged agent runs of seeds 0-4 (1,650 rounds of 10 replies) the
upper median turned 12 attacked rounds and no attacker-free one into far-majority
rounds (the one attacker-free far-majority round, at 2.06x, was one under the plain
median too), caught 3 more sign-flip replies and changed no other count. A core
needs ``min_replies_for_z`` replies for its median to stand alone for half the
round: with fewer than ``2 * min_replies_for_z`` replies the test stays on the
plain median (in a round of 4, two ordinary large norms are half of it). (The core
alone is not the reference in every round: under non-IID data the central replies
are the small clients, whose norms are small.) The spread is the core's robust SD
of the log scaled norms, at least ``min_log_spread``.

Detectors
---------
* norm, high: the norm is at least ``big_norm_ratio`` times the reference *and* more
  than ``z_threshold`` robust SDs above it (log scale). Under Dirichlet 0.5 (MNIST-5k,
  300 clean replies) 99% of honest norms are under 2.2x the reference and the
  largest was 4.8x, so a large norm alone is not enough;
* norm, repeated: a norm at least ``repeat_norm_ratio`` times the reference and
  more than ``z_threshold`` robust SDs above it, from a client with a record
  (flagged or rejected before; ``record``). Late in training a reversed x4 update
  of a small client can point along the median and be only 2-4x the reference,
  like a one-off large honest update; an attacker does it every round it is
  selected. The z-score condition keeps one flag on an honest client from making
  each of its later large-but-ordinary updates a repeat: on the held-out seeds 3-4
  of the benchmark, the honest c10 got a direction flag and then two repeated-norm
  flags at 3.9 and 2.7 robust SDs (the attackers this clause catches are mostly 5-15
  SDs out). Replayed on the 55 logged agent runs of seeds 0-4 it removed two false
  positives (seed 3's scaling and noise runs at 20%) and one label-flip detection,
  and changed nothing else;
* norm, unaligned: a norm at least ``unaligned_norm_ratio`` (3) times the reference,
  more than ``z_threshold`` robust SDs above it, and a cosine to the coordinate
  median under ``unaligned_max_cosine`` (0.25), unless far-away replies are half
  the round or more. A sign flip x4 of an update that was nearly orthogonal to the
  median (common in the first rounds under non-IID data) is 3-4x the reference
  with a cosine near 0; it passed both the high-norm test (4x) and the direction
  test.
  On the benchmark's logged replies the honest norms at 2.6-3.7x the reference
  (other than seed 0's c17, whose updates break the model) had cosines 0.26-0.35;
  the sign-flip replies missed at 3.0-3.9x had cosines -0.02 to +0.31, most under
  0.2. Replayed (:mod:`experiments.replay_detection`) on 26 runs it caught 6 more
  sign-flip replies and flagged 4 more honest ones. The margin is thin: two named
  parameters, not constants;
* norm, low: a norm under ``low_norm_ratio`` times the reference (free-riding);
* direction: a reversed *and* amplified update: a norm at least
  ``reversal_norm_ratio`` times the reference and a backward push ``ratio *
  (min_cosine - cosine_to_median)`` of at least ``min_push``; or a cosine below
  ``min_cosine - strong_reversal`` with a norm at least the reference. Two features
  must agree: honest non-IID clients with a near-zero or slightly negative cosine
  are common, but their norms are ordinary or small (a low cosine alone flagged
  about one honest reply in 20 on the benchmark task);
* duplicates: an update identical to another reply's (collusion, free-riding);
* server-checked loss (``checked_loss`` / ``checked_accuracy``, measured by
  :mod:`fl_server.loss_check` on the server's own validation set): the candidate
  model ``global + update`` has an accuracy at most ``checked_accuracy_ratio`` times
  the round's accuracy centre *and* a loss at least ``min_loss_excess`` nats above
  the round's loss centre (:func:`loss_reference`). This is what catches label
  flipping, whose updates have ordinary norms and directions but whose models are
  systematically wrong. The loss alone does not separate them: under Dirichlet 0.5
  honest candidates' losses reach 4-6x the centre late in training (a client with
  two or three classes forgets the others) while their accuracy stays above 0.4x
  the centre's after the first rounds; flipped models score near or under chance.

Malicious or faulty
-------------------
A reply flagged *only* by the server-checked loss whose candidate model is
*collapsed* (``checked_top_share`` at least ``collapse_share``: it assigns at least
that share of the server's validation examples to one class) is flagged ``faulty``,
not ``malicious``. Label flipping, the attack the check exists for, yields a working
classifier with permuted outputs: its predictions spread over the classes as the
validation labels do (top share near 0.1 on MNIST). A broken honest update does not:
a small non-IID client's model that forgot the other classes, or an outsized update
that destroyed the candidate, predicts mostly one class. Such a reply is still
dropped from the aggregate (a faulty flag gets no weight) but is no evidence of an
attack. Any geometry detector (norm, direction, duplicates) firing as well keeps the
flag ``malicious``.

A faulty flag gives the client no *record* (``record`` is for the repeated-norm
detector; the strategy counts only rejections and malicious flags as bad rounds
for reputation, and a faulty round as neither bad nor good). Giving it one made the
norm detector flag an honest client's later one-off large update as a repeat
offence, which is how the honest clients c17 and c9 of the benchmark were flagged
over and over; an attacker's record comes from its own malicious flags.

A record expires: it is a reputation under ``record_below`` (0.8), and reputation
recovers a quarter of its gap to 1 per good round (:mod:`agent_strategy.reputation`),
so four good rounds after a single flag (0.5 -> 0.84) clear it. With a record that
never expired (any reputation under 1), one flag on an honest client with large
updates made every later outsized one a "repeat" (seed 1's c5 of the benchmark: one
direction flag in round 3, then five repeated-norm flags in rounds 16-25).

The Krum ratio is reported in the reason but is not a detector of its own: it is
mostly the norm again, and alone it flagged honest clients with a large norm.
With fewer than ``min_replies_for_z`` replies there is no core: the reference is the
median of all replies and the z-score condition is dropped. Label flipping is not
detected by the update geometry (its updates look like honest non-IID ones); only
the server-checked loss catches it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .types import ClientState, Flag, FlagKind, ReplyFeatures

_MAD_TO_SD = 0.6745  # the MAD of a normal distribution is 0.6745 standard deviations


@dataclass(frozen=True)
class DetectionParams:
    """Thresholds of the detectors (``defense.*`` in the run configuration)."""

    z_threshold: float = 3.5
    min_cosine: float = 0.0
    min_replies_for_z: int = 4
    low_norm_ratio: float = 0.1
    big_norm_ratio: float = 4.0
    reversal_norm_ratio: float = 1.5
    min_push: float = 0.1
    strong_reversal: float = 0.3
    min_log_spread: float = 0.1
    core_cap: float = 2.0
    majority_norm_ratio: float = 3.0
    repeat_norm_ratio: float = 2.0
    checked_accuracy_ratio: float = 0.4
    min_loss_excess: float = 0.5
    collapse_share: float = 0.7
    norm_examples_exponent: float = 0.5
    record_below: float = 0.8
    unaligned_norm_ratio: float = 3.0
    unaligned_max_cosine: float = 0.25

    def __post_init__(self) -> None:
        if not -1 <= self.unaligned_max_cosine <= 1:
            raise ValueError(
                f"need -1 <= unaligned_max_cosine <= 1, got {self.unaligned_max_cosine}"
            )
        if not 0 < self.record_below <= 1:
            raise ValueError(f"need 0 < record_below <= 1, got {self.record_below}")
        if not 0 <= self.norm_examples_exponent <= 1:
            raise ValueError(
                "need 0 <= norm_examples_exponent <= 1, got "
                f"{self.norm_examples_exponent}"
            )
        if self.z_threshold <= 0 or self.min_log_spread <= 0:
            raise ValueError("z_threshold and min_log_spread must be > 0")
        if not 0 <= self.low_norm_ratio < 1 <= self.reversal_norm_ratio:
            raise ValueError(
                "need 0 <= low_norm_ratio < 1 <= reversal_norm_ratio, got "
                f"{self.low_norm_ratio} and {self.reversal_norm_ratio}"
            )
        ratios = (
            self.big_norm_ratio,
            self.core_cap,
            self.majority_norm_ratio,
            self.repeat_norm_ratio,
            self.unaligned_norm_ratio,
        )
        if not 0 < self.checked_accuracy_ratio < 1 or self.min_loss_excess < 0:
            raise ValueError(
                "need 0 < checked_accuracy_ratio < 1 and min_loss_excess >= 0, got "
                f"{self.checked_accuracy_ratio} and {self.min_loss_excess}"
            )
        if not 0 < self.collapse_share <= 1:
            raise ValueError(f"need 0 < collapse_share <= 1, got {self.collapse_share}")
        if min(ratios) < 1 or self.strong_reversal < 0:
            raise ValueError(
                "need big_norm_ratio, core_cap, majority_norm_ratio, "
                "repeat_norm_ratio, unaligned_norm_ratio >= 1 and strong_reversal >= 0"
            )


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


def scaled_norms(replies: Sequence[ReplyFeatures], exponent: float) -> np.ndarray:
    """Return each reply's update norm per ``examples ** exponent``, in norm units.

    ``update_norm * (m / examples) ** exponent``, with ``examples`` the client's
    ``registered_examples`` (its ``num_examples`` when that is None) and ``m`` the
    median of those over the replies: a client with the median count keeps its
    norm. ``exponent`` 0 returns the raw norms.
    """
    norms = np.array([r.update_norm for r in replies], dtype=np.float64)
    if exponent == 0 or not replies:
        return norms
    ex = np.array(
        [max(r.registered_examples or r.num_examples, 1) for r in replies],
        dtype=np.float64,
    )
    return norms * (float(np.median(ex)) / ex) ** exponent


def clients_with_record(
    states: Iterable[ClientState], params: DetectionParams
) -> set[str]:
    """Return the ids of the clients with a record: reputation under ``record_below``.

    This is the ``record`` :func:`detect` takes; reputation recovers after good
    rounds (:mod:`agent_strategy.reputation`), so a record expires.
    """
    return {s.id for s in states if s.reputation < params.record_below}


def core_mask(replies: Sequence[ReplyFeatures]) -> np.ndarray:
    """Return which replies form the round's reference core.

    The core is the replies whose ``distance_rank`` is at most ``ceil(n / 2)`` (the
    most central half by Krum score) and that duplicate no other reply; if that
    leaves nothing (every reply a duplicate), every reply.
    """
    n = len(replies)
    half = math.ceil(n / 2)
    mask = np.array(
        [(r.distance_rank or n + 1) <= half and not r.duplicates for r in replies]
    )
    return mask if mask.any() else np.ones(n, dtype=bool)


def reference(
    replies: Sequence[ReplyFeatures],
    params: DetectionParams = DetectionParams(),
    norms: np.ndarray | None = None,
) -> tuple[float, float, bool, bool]:
    """Return the round's reference norm, log-norm spread and whether z applies.

    The norms are ``norms`` when given, else :func:`scaled_norms` of the replies
    with ``params.norm_examples_exponent``; the last value returned says whether
    far-away replies are at least half the round (the core's median is the
    reference).

    With at least ``params.min_replies_for_z`` replies the reference is the median
    norm of all replies, unless the upper median (``sorted(norms)[n // 2]``: at
    least half of the norms are that large; the plain median with fewer than
    ``2 * params.min_replies_for_z`` replies) is more than ``params.core_cap`` times
    the median of the core (:func:`core_mask`): then far-away replies are at least
    half the round and the core's median is the reference. The spread is the
    core's robust SD of the log-norms (``MAD / 0.6745``), at least
    ``params.min_log_spread``. With fewer replies: the median of all norms and no
    spread (``inf``; the z-score condition is dropped).
    """
    if norms is None:
        norms = scaled_norms(replies, params.norm_examples_exponent)
    med_all = float(np.median(norms))
    if len(replies) < params.min_replies_for_z:
        return med_all, math.inf, False, False
    logs = _log(norms[core_mask(replies)])
    center = float(np.median(logs))
    mad = float(np.median(np.abs(logs - center)))
    med_core = math.exp(center)
    n = len(norms)
    upper_median = (
        float(np.sort(norms)[n // 2]) if n >= 2 * params.min_replies_for_z else med_all
    )
    far_majority = upper_median > params.core_cap * med_core
    ref = med_core if far_majority else med_all
    return ref, max(mad / _MAD_TO_SD, params.min_log_spread), True, far_majority


def loss_reference(
    replies: Sequence[ReplyFeatures], params: DetectionParams = DetectionParams()
) -> tuple[float, float] | None:
    """Return the round's server-checked ``(loss centre, accuracy centre)``, or None.

    The loss centre is the median of the better half of the checked losses (the
    ``ceil(n / 2)`` lowest), the accuracy centre the median of the better half of
    the checked accuracies (the highest): both stay an honest reply's value while
    at least a quarter of the round is honest, so attackers that are a majority of
    a round (6 of 10 happens with 40% malicious clients) do not move them. None
    when the replies were not checked (``checked_loss`` None) or when there are
    fewer than ``params.min_replies_for_z`` of them.

    Raises
    ------
    ValueError
        If only some replies were checked.
    """
    checked = [r.checked_loss is not None for r in replies]
    if not any(checked):
        return None
    if not all(checked) or any(r.checked_accuracy is None for r in replies):
        raise ValueError("the server checked the loss of only some of the replies")
    if len(replies) < params.min_replies_for_z:
        return None
    half = math.ceil(len(replies) / 2)
    losses = np.sort([float(r.checked_loss or 0.0) for r in replies])
    accs = np.sort([float(r.checked_accuracy or 0.0) for r in replies])[::-1]
    return float(np.median(losses[:half])), float(np.median(accs[:half]))


def detect(
    replies: Sequence[ReplyFeatures],
    params: DetectionParams = DetectionParams(),
    record: Collection[str] = (),
) -> tuple[Flag, ...]:
    """Return a flag for each suspicious reply, most suspicious first.

    The flag is ``malicious``, or ``faulty`` when the server-checked loss alone
    fired and the candidate model is collapsed (see the module docstring).

    Parameters
    ----------
    replies : sequence of ReplyFeatures
        One round's accepted replies.
    params : DetectionParams
        The thresholds.
    record : collection of str
        Clients with a record: flagged or rejected recently, their reputation
        under ``params.record_below`` (the caller's choice; the deterministic
        policy passes exactly those).
        For them a norm ``repeat_norm_ratio`` times the reference (and more than
        ``z_threshold`` robust SDs above it) is enough: an attacker keeps sending
        outsized updates, an honest client's large one is a one-off.

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
    norms = scaled_norms(replies, params.norm_examples_exponent)
    ref, spread, use_z, far_majority = reference(replies, params, norms)
    # Far-away replies are at least half the round (one of the benchmark's 1,024
    # attacker-free rounds, at 2.06x the core's median, the plain median's too; 99%
    # of them stayed under 1.74x): the z-score is no longer a test
    # against honest replies, and ``majority_norm_ratio`` times the core's median
    # is enough.
    big = params.majority_norm_ratio if far_majority else None
    log_ref = math.log(max(ref, 1e-12))
    checked = loss_reference(replies, params)

    scored: list[tuple[float, int, Flag]] = []
    for i, r in enumerate(replies):
        reasons: list[str] = []
        severity = 0.0
        loss_only_collapsed = False
        norm = float(norms[i])
        ratio = norm / ref if ref > 0 else (math.inf if norm else 1)
        z = (math.log(max(norm, 1e-12)) - log_ref) / spread if use_z else 0.0
        where = f"the reference norm {ref:.3g}"
        shown = (
            f"update norm {r.update_norm:.3g}"
            if norm == r.update_norm
            else f"update norm {r.update_norm:.3g} ({norm:.3g} per its examples)"
        )
        cos = r.cosine_to_median
        assert cos is not None  # checked above
        far_above = z > thr or not use_z
        repeat = r.id in record and ratio >= params.repeat_norm_ratio and far_above
        unaligned = (
            ratio >= params.unaligned_norm_ratio
            and far_above
            and cos < params.unaligned_max_cosine
            and not far_majority
        )
        if (
            repeat
            or unaligned
            or (big is not None and ratio >= big)
            or (ratio >= params.big_norm_ratio and far_above)
        ):
            reasons.append(
                f"{shown} is {ratio:.3g}x {where}"
                + (f" ({z:.1f} robust SDs above)" if use_z else "")
                + (" from a client flagged before" if repeat else "")
                + (
                    f", cosine to the coordinate median only {cos:.2f}"
                    if unaligned and ratio < params.big_norm_ratio and not repeat
                    else ""
                )
            )
            severity = max(severity, z if use_z else thr + math.log(ratio))
        elif n >= 2 and ratio < params.low_norm_ratio:
            reasons.append(
                f"{shown} is below "
                f"{params.low_norm_ratio:g}x {where} (little or no work)"
            )
            severity = max(severity, thr + 1.0)
        push = ratio * (params.min_cosine - cos)
        reversed_big = ratio >= params.reversal_norm_ratio and push >= params.min_push
        strong = cos < params.min_cosine - params.strong_reversal and ratio >= 1.0
        # With far-away replies half the round or more the coordinate median is
        # (half) theirs and the cosine to it says nothing about the honest direction.
        if (reversed_big or strong) and not far_majority:
            bound = params.min_cosine - (0 if reversed_big else params.strong_reversal)
            reasons.append(
                f"cosine to the coordinate median {cos:.2f} < {bound:.2f} with a "
                f"norm {ratio:.3g}x {where}"
            )
            gap = params.min_cosine - cos
            severity = max(severity, thr + 10 * gap + math.log(ratio))
        if checked is not None:
            loss, acc = r.checked_loss, r.checked_accuracy
            assert loss is not None and acc is not None  # loss_reference checked
            acc_ratio = acc / checked[1] if checked[1] > 0 else 1.0
            excess = loss - checked[0]
            if (
                acc_ratio <= params.checked_accuracy_ratio
                and excess >= params.min_loss_excess
            ):
                vs = "" if r.loss_gap is None else f", {r.loss_gap:+.2f} vs reported"
                share = r.checked_top_share
                collapsed = share is not None and share >= params.collapse_share
                loss_only_collapsed = collapsed and not reasons
                why = (
                    f"; {share:.0%} of its predictions in one class (a collapsed model)"
                    if collapsed
                    else " (a model trained on wrong labels?)"
                )
                reasons.append(
                    f"server-checked accuracy {acc:.2f} is {acc_ratio:.2f}x the "
                    f"round's {checked[1]:.2f}, loss {loss:.2f} vs {checked[0]:.2f}"
                    f"{vs}{why}"
                )
                severity = max(severity, thr + 10 * (1 - acc_ratio) + min(excess, 10))
        if r.duplicates:
            loss_only_collapsed = False
            reasons.append(
                f"update identical to {r.duplicates} other repl"
                f"{'y' if r.duplicates == 1 else 'ies'} (collusion or copying)"
            )
            severity = max(severity, 1e6 + r.duplicates)
        if reasons:
            if r.krum_ratio is not None and r.krum_ratio > 1:
                reasons.append(
                    f"Krum score {r.krum_ratio:.3g}x the round's median (distance "
                    f"rank {r.distance_rank}/{n})"
                )
            sev = severity if math.isfinite(severity) else 1e9
            reason = "; ".join(reasons)
            if len(reason) > 300:
                reason = reason[:297] + "..."
            kind: FlagKind = "faulty" if loss_only_collapsed else "malicious"
            scored.append((sev, i, Flag(id=r.id, kind=kind, reason=reason)))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return tuple(f for _, _, f in scored)
