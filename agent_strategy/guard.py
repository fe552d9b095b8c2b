"""``guard``: the hard limits no policy may exceed, as a pure function.

Whatever a policy answers (the deterministic one, or an LLM that may be wrong or
adversarially prompted), the strategy only ever acts on ``guard(decision, obs)``. The
guard repairs what it can (clamps, drops, tops up, renormalises) and reports every
change, so the decision log shows what the policy asked for and what was done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .codecs import allowed_codecs, bandwidth_codecs
from .reputation import is_excluded
from .types import Allocation, Compression, Decision, Flag, Limits, Observation


class GuardError(ValueError):
    """The observation leaves no safe decision (e.g. fewer clients than the minimum)."""


@dataclass(frozen=True)
class Guarded:
    """A guarded decision and the list of changes the guard made to it."""

    decision: Decision
    changes: tuple[str, ...]


def cap_weights(weights: np.ndarray, caps: np.ndarray | float) -> np.ndarray:
    """Normalise non-negative ``weights`` so that entry ``i`` is at most ``caps[i]``.

    Water-filling: entries above their cap are set to it and the excess is spread
    over the others in proportion to their weight (or, if those are all zero, to
    their remaining caps). When the caps sum to less than 1 they cannot all hold and
    are scaled up together (so a scalar cap ``c`` with ``n * c < 1`` gives uniform
    weights).

    Parameters
    ----------
    weights : np.ndarray
        One-dimensional, finite, non-negative, with a positive sum.
    caps : np.ndarray or float
        The largest share each entry may get (one value for all, or one per entry),
        each in ``(0, 1]``.

    Returns
    -------
    np.ndarray
        Weights that sum to 1, none above its (possibly scaled) cap.
    """
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("weights must be a non-empty 1-D array")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative, with a positive sum")
    cap = np.broadcast_to(np.asarray(caps, dtype=float), w.shape).copy()
    if not np.all(np.isfinite(cap)) or np.any(cap <= 0):
        raise ValueError("caps must be finite and positive")
    if cap.sum() < 1.0:
        cap = cap / cap.sum()
    w = w / w.sum()
    fixed = np.zeros(w.size, dtype=bool)
    for _ in range(w.size):
        over = (w > cap + 1e-12) & ~fixed
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap[fixed]
        free = ~fixed
        budget = max(1.0 - cap[fixed].sum(), 0.0)
        if not free.any():
            break
        if w[free].sum() > 0:
            w[free] = w[free] / w[free].sum() * budget
        else:
            w[free] = cap[free] / cap[free].sum() * budget
    return w / w.sum()


def guard(decision: Decision, obs: Observation) -> Guarded:
    """Return ``decision`` made safe for ``obs``, with the changes made.

    Train phase: selected ids are eligible, unique, not flagged, not excluded
    (``ClientState.excluded_until``; excluded clients only fill up a selection that
    would otherwise stay under the minimum), and between
    ``limits.min_clients`` and ``limits.max_clients`` (topped up with the least
    recently selected clients if short); clients left out for more than
    ``limits.max_staleness`` rounds are added, up to half the slots, replacing the
    policy's last picks if needed (no client starves); each selected
    client has an allocation within the epoch, learning-rate and deadline limits,
    and an upload codec among :func:`~agent_strategy.codecs.allowed_codecs` (else the
    run's default); a selected client the policy gave no allocation (one the guard
    added, or one a policy left out) gets the default epochs, learning rate and
    deadline, and the codec of
    :func:`~agent_strategy.codecs.bandwidth_codecs` (the default when only that is
    allowed or its bandwidth was never measured).
    Aggregate phase: flags name replying clients only, leave at least
    ``limits.min_clients`` replies accepted and flag at most ``max_flag_share`` of
    them; weights cover exactly the unflagged
    replies, are finite and non-negative (examples-based if none are usable), sum to
    1, and none exceeds ``max_weight_share`` or ``weight_trust`` times its share of
    the examples; the aggregation rule is one of ``limits.rules`` (else the first).

    Raises
    ------
    GuardError
        If fewer eligible clients exist than ``limits.min_clients`` (train phase).
    """
    if obs.phase == "train":
        return _guard_train(decision, obs)
    return _guard_aggregate(decision, obs)


def _guard_train(decision: Decision, obs: Observation) -> Guarded:
    lim = obs.limits
    changes: list[str] = []
    eligible = [c.id for c in obs.clients]
    if len(eligible) < lim.min_clients:
        raise GuardError(
            f"only {len(eligible)} eligible clients, fewer than the minimum "
            f"{lim.min_clients}; lower min_replies/clients_per_round or add clients"
        )
    eligible_set = set(eligible)
    flags = tuple(f for f in decision.flags if f.id in eligible_set)
    if len(flags) != len(decision.flags):
        changes.append("dropped flags on unknown clients")
    # Excluded clients (reputation) are treated as flagged: never selected, unless
    # too few others remain (then the top-up below may take them back).
    excluded = {c.id for c in obs.clients if is_excluded(c, obs.round)}
    flagged = {f.id for f in flags} | excluded

    selected: list[str] = []
    seen: set[str] = set()
    for cid in decision.selected:
        if cid in seen:
            changes.append(f"dropped duplicate {cid}")
        elif cid not in eligible_set:
            changes.append(f"dropped ineligible {cid}")
        elif cid in excluded:
            changes.append(f"dropped {cid}: excluded until round {_until(obs, cid)}")
        elif cid in flagged:
            changes.append(f"dropped {cid}: both selected and flagged")
        else:
            selected.append(cid)
            seen.add(cid)
    if len(selected) > lim.max_clients:
        changes.append(f"truncated selection {len(selected)} -> {lim.max_clients}")
        selected = selected[: lim.max_clients]
    if lim.max_staleness > 0:
        # No client starves: the stalest overdue clients get up to half the slots
        # (so a large federation cannot turn the policy into a round robin).
        chosen = set(selected)
        overdue = sorted(
            (
                c
                for c in obs.clients
                if c.id not in flagged
                and c.id not in chosen
                and obs.round - c.last_selected_round > lim.max_staleness
            ),
            key=lambda c: (c.last_selected_round, int(c.id[1:])),
        )
        added = [c.id for c in overdue[: max(lim.max_clients // 2, 1)]]
        if added:
            keep = min(len(selected), max(lim.max_clients - len(added), 0))
            selected = selected[:keep] + added
            changes.append(
                f"added clients unselected for over {lim.max_staleness} rounds: {added}"
            )
    if len(selected) < lim.min_clients:
        chosen = set(selected)
        by_staleness = sorted(
            (c for c in obs.clients if c.id not in chosen and c.id not in flagged),
            key=lambda c: (c.last_selected_round, int(c.id[1:])),
        ) + sorted(
            (c for c in obs.clients if c.id in excluded and c.id not in chosen),
            key=lambda c: (-c.reputation, c.excluded_until, int(c.id[1:])),
        )
        extra = [c.id for c in by_staleness[: lim.min_clients - len(selected)]]
        changes.append(f"topped up selection with {extra}")
        selected += extra

    allocations: dict[str, Allocation] = {}
    by_bandwidth: dict[str, Compression] | None = None
    for cid in selected:
        alloc = decision.allocations.get(cid)
        if alloc is None:
            if by_bandwidth is None:
                by_bandwidth = bandwidth_codecs(obs)
            codec = by_bandwidth.get(cid, obs.default_compression)
            changes.append(
                f"default allocation for {cid}"
                + (
                    f" (codec {codec!r} by its bandwidth)"
                    if codec != obs.default_compression
                    else ""
                )
            )
            alloc = Allocation(
                local_epochs=obs.default_epochs,
                lr=obs.default_lr,
                compression=codec,
                deadline_s=lim.deadline_s,
            )
        fixed = _clamp_allocation(alloc, obs)
        if fixed.compression != alloc.compression:
            changes.append(
                f"codec {alloc.compression!r} of {cid} not allowed "
                f"({', '.join(allowed_codecs(obs))}); using {fixed.compression!r}"
            )
        if fixed.model_copy(update={"compression": alloc.compression}) != alloc:
            changes.append(f"clamped allocation of {cid}")
        allocations[cid] = fixed
    guarded = decision.model_copy(
        update={
            "selected": tuple(selected),
            "allocations": allocations,
            "weights": {},
            "flags": flags,
        }
    )
    return Guarded(guarded, tuple(changes))


def _until(obs: Observation, cid: str) -> int:
    return next(c.excluded_until for c in obs.clients if c.id == cid)


def _clamp_allocation(alloc: Allocation, obs: Observation) -> Allocation:
    lim = obs.limits
    lr = alloc.lr if math.isfinite(alloc.lr) else obs.default_lr
    deadline = alloc.deadline_s if math.isfinite(alloc.deadline_s) else lim.deadline_s
    codec = alloc.compression
    if codec not in allowed_codecs(obs):
        codec = obs.default_compression
    return alloc.model_copy(
        update={
            "compression": codec,
            "local_epochs": int(
                min(max(alloc.local_epochs, lim.min_epochs), lim.max_epochs)
            ),
            "lr": float(min(max(lr, lim.lr_min), lim.lr_max)),
            "deadline_s": float(min(deadline, lim.deadline_s)),
        }
    )


def cap_flags(flags: Sequence[Flag], n_replies: int, limits: Limits) -> list[Flag]:
    """Return the first flags, in order, on as many clients as the guard allows.

    At most ``min(n_replies - limits.min_clients, int(limits.max_flag_share *
    n_replies))`` clients stay flagged (at least ``min_clients`` replies and the rest
    of the share must stay accepted); a later flag on a client already kept is kept
    too. Flags come most suspicious first (:func:`~agent_strategy.detect`), so the
    cap drops the least suspicious.
    """
    keep = min(
        max(n_replies - limits.min_clients, 0),
        int(limits.max_flag_share * n_replies),
    )
    kept: list[Flag] = []
    kept_ids: set[str] = set()
    for f in flags:
        if f.id in kept_ids or len(kept_ids) < keep:
            kept.append(f)
            kept_ids.add(f.id)
    return kept


def _guard_aggregate(decision: Decision, obs: Observation) -> Guarded:
    changes: list[str] = []
    reply_ids = [r.id for r in obs.replies]
    reply_set = set(reply_ids)
    flags: list[Flag] = []
    seen: set[tuple[str, str]] = set()
    for f in decision.flags:
        if f.id not in reply_set:
            changes.append(f"dropped flag on {f.id}: not a reply of this round")
        elif (f.id, f.kind) not in seen:
            seen.add((f.id, f.kind))
            flags.append(f)
    kept = cap_flags(flags, len(obs.replies), obs.limits)
    if len(kept) < len(flags):
        changes.append(
            f"dropped {len(flags) - len(kept)} flag(s): at least "
            f"{obs.limits.min_clients} replies and "
            f"{1 - obs.limits.max_flag_share:.0%} of them must stay accepted"
        )
        flags = kept
    flagged = {f.id for f in flags}
    accepted = [r for r in obs.replies if r.id not in flagged]
    for cid in decision.weights:
        if cid not in reply_set or cid in flagged:
            changes.append(f"dropped weight of {cid}: flagged or not a reply")
    weights: dict[str, float] = {}
    if accepted:
        raw = []
        for r in accepted:
            w = decision.weights.get(r.id, 0.0)
            if not math.isfinite(w) or w < 0:
                changes.append(f"weight of {r.id} was {w}; set to 0")
                w = 0.0
            raw.append(w)
        arr = np.array(raw, dtype=float)
        if arr.sum() <= 0:
            changes.append("no usable weights; weighting by examples")
            arr = np.array([r.num_examples for r in accepted], dtype=float)
        examples = np.array([r.num_examples for r in accepted], dtype=float)
        caps = np.minimum(
            obs.limits.max_weight_share,
            obs.limits.weight_trust * examples / examples.sum(),
        )
        capped = cap_weights(arr, caps)
        if np.any(np.abs(capped - arr / arr.sum()) > 1e-9):
            changes.append(
                f"weights held to the trust region (share <= "
                f"{obs.limits.max_weight_share:g}, <= {obs.limits.weight_trust:g}x "
                "the examples share)"
            )
        weights = {r.id: float(w) for r, w in zip(accepted, capped, strict=True)}
    rule = decision.aggregation
    if rule not in obs.limits.rules:
        changes.append(
            f"aggregation {rule!r} not allowed ({', '.join(obs.limits.rules)}); "
            f"using {obs.limits.rules[0]!r}"
        )
        rule = obs.limits.rules[0]
    guarded = decision.model_copy(
        update={
            "selected": (),
            "allocations": {},
            "weights": weights,
            "flags": tuple(flags),
            "aggregation": rule,
        }
    )
    return Guarded(guarded, tuple(changes))
