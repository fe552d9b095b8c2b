"""The deterministic policy: the safe default, and the fallback of every LLM policy.

Selection is utility-based with exploration, in the spirit of Oort (Lai et al., OSDI
2021): a client's statistical utility is ``sqrt(num_examples) * last_loss`` (loss-heavy
clients teach the model most), discounted when its last round overran the deadline, plus
a staleness bonus; a share of the slots goes to the least recently seen clients so that
no client starves. Allocation gives each measured client the local epochs that fit
the preferred round time ``T`` (:func:`fitted_epochs`): slow clients fewer, and, while
``T`` is below the deadline, fast clients more (up to ``limits.max_epochs``). Weights
follow the number of examples; replies slower than the deadline are flagged as
stragglers and get no weight.

System utility is Oort's ``(T / t) ** 2`` for a client expected to take ``t > T``
seconds: ``t`` is its last measured duration, or, when the server measured its
per-epoch compute and communication (simulated devices), the time of the round it
would run, at the epochs it would be given (:func:`fitted_durations`); ``T`` is the
deadline, or a quantile of the clients' expected durations at the default epochs when
``duration_quantile`` is set (Oort's preferred round duration).

Deadlines: a measured client gets the run's deadline (its epochs already fit ``T``).
A client never timed is estimated conservatively: it is not counted on to reply before
the deadline. It is given a shorter deadline (``T``, or the longest expected time of
the round's measured clients if that is later: the round lasts that long anyway) only
when enough of the round's measured clients are expected to reply by then
(``limits.min_clients``, at least the server's ``min_replies``); otherwise it gets the
whole deadline, so a round of clients never timed is not cut off
(:func:`untimed_deadline`). To keep that cheap, while ``T`` is below the deadline,
``limits.min_clients`` slots go to measured clients (by utility) before clients never
selected fill the rest; with ``T`` equal to the deadline, clients never selected come
first.

With ``detection`` parameters (``defense.enabled``), excluded clients are not selected,
the detectors of :mod:`agent_strategy.detection` flag suspicious replies as malicious,
weights are examples times reputation, and the aggregation rule is the weighted mean,
or the coordinate-wise median when more replies look suspicious than the guard lets
the policy flag.

When the limits allow codecs besides the run's default (``compression.adaptive``),
each selected client's upload codec follows its measured bandwidth
(:func:`bandwidth_codecs`): the slower its link, the stronger the compression.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .codecs import bandwidth_codecs, upload_ratio
from .detection import DetectionParams, clients_with_record, detect
from .reputation import is_excluded
from .types import (
    Allocation,
    ClientState,
    Compression,
    Decision,
    Flag,
    Observation,
)


def expected_durations(obs: Observation) -> np.ndarray:
    """Return each client's expected round time at the default epochs (nan: unknown).

    ``comm_s + epoch_s * default_epochs`` where the server measured both, else the last
    measured duration.
    """
    out = np.full(len(obs.clients), np.nan)
    for i, c in enumerate(obs.clients):
        if c.epoch_s is not None and c.comm_s is not None:
            out[i] = c.comm_s + c.epoch_s * obs.default_epochs
        elif c.last_duration_s is not None:
            out[i] = c.last_duration_s
    return out


def preferred_duration(obs: Observation, quantile: float = 0.0) -> float:
    """Return Oort's preferred round time ``T``: the deadline, or at most it.

    With ``quantile > 0`` and some client durations known, the ``quantile`` of the
    known expected durations (if below the deadline).
    """
    deadline = obs.limits.deadline_s
    if quantile <= 0:
        return deadline
    known = expected_durations(obs)
    known = known[np.isfinite(known)]
    if known.size == 0:
        return deadline
    return float(min(deadline, np.quantile(known, quantile)))


def fitted_epochs(client: ClientState, obs: Observation, target: float) -> int | None:
    """Return the local epochs a measured client is given (None: not measured).

    The most whole epochs that fit the preferred round time ``target``: at least
    ``limits.min_epochs`` (a client too slow for one still gets them) and at most
    the default, or, when ``target`` is below the deadline (Oort's pacing, the round
    lasts about ``target`` anyway), at most ``limits.max_epochs``: fast clients fill
    the round with local work instead of idling.
    """
    if client.epoch_s is None or client.comm_s is None:
        return None
    lo = obs.limits.min_epochs
    hi = obs.default_epochs
    if target < obs.limits.deadline_s:
        hi = max(hi, obs.limits.max_epochs)
    if client.epoch_s <= 0:
        return hi
    fit = int(max(target - client.comm_s, 0.0) // client.epoch_s)
    return max(lo, min(hi, fit))


def fitted_durations(obs: Observation, target: float) -> np.ndarray:
    """Return each client's expected round time at the epochs it would be given.

    For a client whose per-epoch compute and communication were measured, the time
    at :func:`fitted_epochs`; else its :func:`expected_durations` entry (nan:
    unknown). Oort's system utility applies to the round the client will actually
    run, not to one at the default epochs.
    """
    out = expected_durations(obs)
    for i, c in enumerate(obs.clients):
        epochs = fitted_epochs(c, obs, target)
        if epochs is not None and c.epoch_s is not None and c.comm_s is not None:
            out[i] = c.comm_s + c.epoch_s * epochs
    return out


def utilities(obs: Observation, quantile: float = 0.0) -> np.ndarray:
    """Return each client's selection utility, in ``obs.clients`` order.

    A seen client's statistical utility ``sqrt(examples) * last_loss`` is normalised
    to ``[0, 1]``, Oort's staleness bonus ``sqrt(0.1 * ln(round) /
    last_selected_round)`` is added, and the sum is multiplied by ``(T / t) ** 2`` if
    its expected duration ``t`` at the epochs it would be given
    (:func:`fitted_durations`) exceeds the preferred
    duration ``T`` (:func:`preferred_duration`); clients never selected get ``inf``,
    and clients selected but never heard from (failures, missed deadlines) a zero
    statistical utility. Vectorised over clients.
    """
    cs = obs.clients
    loss = np.array(
        [np.nan if c.last_loss is None else c.last_loss for c in cs], dtype=float
    )
    examples = np.array([max(c.num_examples, 1) for c in cs], dtype=float)
    last = np.array([max(c.last_selected_round, 1) for c in cs], dtype=float)
    pref = preferred_duration(obs, quantile)
    dur = fitted_durations(obs, pref)
    finite = np.isfinite(loss)
    stat = np.where(finite, np.sqrt(examples) * np.maximum(np.nan_to_num(loss), 0), 0.0)
    top = stat[finite].max() if finite.any() else 0.0
    norm = stat / top if top > 0 else np.zeros_like(stat)
    bonus = np.sqrt(0.1 * np.log(max(obs.round, 1)) / last)
    late = np.isfinite(dur) & (dur > pref)
    factor = np.where(late, (pref / np.where(late, dur, 1.0)) ** 2, 1.0)
    tried = finite | np.array([c.rounds_selected > 0 for c in cs], dtype=bool)
    return np.where(tried, (norm + bonus) * factor, np.inf)


def expected_duration(
    client: ClientState, epochs: int, default_epochs: int
) -> float | None:
    """Return a client's expected round time at ``epochs`` epochs (None: never timed).

    ``comm_s + epoch_s * epochs`` where the server measured both, else the last
    measured duration scaled by ``epochs / default_epochs``.
    """
    if client.epoch_s is not None and client.comm_s is not None:
        return client.comm_s + client.epoch_s * epochs
    if client.last_duration_s is not None:
        return client.last_duration_s * epochs / max(default_epochs, 1)
    return None


def untimed_deadline(
    expected_s: Sequence[float | None], needed: int, target: float, deadline: float
) -> float:
    """Return the deadline of a round's never-timed clients.

    Parameters
    ----------
    expected_s : sequence of float or None
        Expected round time of each selected client at its allocated epochs; None
        for a client never timed.
    needed : int
        Replies the round needs (the policy's ``limits.min_clients``).
    target : float
        The preferred round time ``T`` (:func:`preferred_duration`).
    deadline : float
        The run's deadline.

    Returns
    -------
    float
        ``deadline`` unless at least ``needed`` measured clients are expected within
        it; then ``max(T, their longest expected time)``, at most ``deadline``. A
        client never timed is not counted on to reply early, so a round is never
        made to depend on one.
    """
    if needed < 0 or not target > 0 or not deadline > 0:
        raise ValueError(
            f"needed={needed} must be >= 0, target={target} and deadline={deadline} "
            "must be > 0"
        )
    timed = [t for t in expected_s if t is not None and t <= deadline]
    if len(timed) < needed:
        return deadline
    return float(min(deadline, max([target, *timed])))


def cannot_meet_deadline(obs: Observation) -> np.ndarray:
    """Return which clients miss the deadline even at ``min_epochs`` (measured)."""
    return np.array(
        [
            c.epoch_s is not None
            and c.comm_s is not None
            and c.comm_s + c.epoch_s * obs.limits.min_epochs > obs.limits.deadline_s
            for c in obs.clients
        ],
        dtype=bool,
    )


# ---------------------------------------------------- bandwidth-aware compression
def with_codec_times(
    obs: Observation, codecs: Mapping[str, Compression]
) -> Observation:
    """Return ``obs`` with each coded client's ``comm_s`` at the upload of its codec.

    ``comm_s`` is the dense round trip (download and upload of the float32 model,
    half each); a client uploading with codec ``c`` moves
    ``comm_s / 2 * (1 + upload_ratio(c))`` (top-k at ``obs.topk_fraction``). The
    train phase plans epochs, deadlines and who can meet the deadline on these
    times, so a slow link that fits the deadline once its upload is compressed is
    selected and given the epochs that fit, instead of being taken for hopeless.
    Clients without an entry (or without a measured ``comm_s``) are unchanged; no
    codecs: ``obs`` itself.
    """
    if not codecs:
        return obs
    k = obs.topk_fraction
    clients = tuple(
        c.model_copy(
            update={"comm_s": c.comm_s / 2 * (1 + upload_ratio(codecs[c.id], k))}
        )
        if c.id in codecs and c.comm_s is not None
        else c
        for c in obs.clients
    )
    return obs.model_copy(update={"clients": clients})


class DeterministicPolicy:
    """Utility-based selection with exploration; weights by examples.

    Parameters
    ----------
    seed : int
        Seeds the tie-breaking and exploration draws; with ``obs.round`` it fixes them,
        so the same observation always gets the same decision.
    exploration : float
        Share of the round's slots given to the least recently selected clients.
    cutoff : float
        Oort's exploitation cutoff: clients within this factor of the k-th best
        utility are candidates.
    duration_quantile : float
        Oort's preferred round duration as this quantile of the clients' expected
        durations (see :func:`preferred_duration`); 0 uses the deadline.
    detection : DetectionParams, optional
        Turns on adversary detection, reputation weighting and exclusion.

    Top-k's share of entries, which ranks the top-k codecs among the others when
    codecs follow bandwidth (:func:`~agent_strategy.codecs.bandwidth_codecs`), is
    the observation's ``topk_fraction`` (``compression.topk_fraction``), the one the
    guard and the LLM policy use.
    """

    name = "deterministic"

    def __init__(
        self,
        seed: int = 0,
        exploration: float = 0.2,
        cutoff: float = 0.95,
        duration_quantile: float = 0.0,
        detection: DetectionParams | None = None,
    ) -> None:
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"exploration must be in [0, 1], got {exploration}")
        if not 0.0 < cutoff <= 1.0:
            raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
        if not 0.0 <= duration_quantile < 1.0:
            raise ValueError(
                f"duration_quantile must be in [0, 1), got {duration_quantile}"
            )
        self.seed = seed
        self.exploration = exploration
        self.cutoff = cutoff
        self.duration_quantile = duration_quantile
        self.detection = detection

    def decide(self, obs: Observation) -> Decision:
        """Return a selection and allocation (train) or weights and flags."""
        if obs.phase == "train":
            # Codecs first (from the measured links), then the plan on the times
            # those codecs give; the default run allows no codec: no change.
            codecs = bandwidth_codecs(obs)
            planned = with_codec_times(obs, codecs)
            return self._with_codecs(self._train(planned), codecs)
        return self._aggregate(obs)

    # ------------------------------------------------------------------ phases
    def _rng(self, obs: Observation) -> np.random.Generator:
        return np.random.default_rng([self.seed, obs.round, int(obs.phase == "train")])

    def _train(self, obs: Observation) -> Decision:
        rng = self._rng(obs)
        clients = list(obs.clients)
        if self.detection is not None:
            clients = [c for c in clients if not is_excluded(c, obs.round)]
        n = min(obs.target_clients, len(clients))
        n_explore = round(self.exploration * n)
        tie = rng.random(len(clients))
        hopeless = cannot_meet_deadline(obs)
        if obs.limits.max_staleness > 0:
            # Clients the guard would add as overdue are explored here instead, so
            # they get an allocation that fits (up to half the slots, as the guard).
            overdue = sum(
                obs.round - c.last_selected_round > obs.limits.max_staleness
                and not hopeless[i]
                for i, c in enumerate(clients)
            )
            n_explore = max(n_explore, min(overdue, max(n // 2, 1)))

        # Exploration: the least recently selected clients (never selected first),
        # those measured too slow for the deadline even at min_epochs last.
        by_staleness = sorted(
            range(len(clients)),
            key=lambda i: (hopeless[i], clients[i].last_selected_round, tie[i]),
        )
        chosen = by_staleness[:n_explore]
        explored = set(chosen)
        rest = [i for i in range(len(clients)) if i not in explored]

        # Exploitation, as Oort: candidates are the clients whose utility is at least
        # ``cutoff`` times the k-th best; k of them are drawn without replacement with
        # probability proportional to utility (Gumbel top-k). Unseen clients first,
        # but when the preferred round time is below the deadline,
        # ``limits.min_clients`` slots stay with measured clients (as many as there
        # are): the round's replies then do not depend on clients never timed, and
        # their deadline can be short (see :func:`untimed_deadline`).
        target = preferred_duration(obs, self.duration_quantile)
        util = utilities(
            obs.model_copy(update={"clients": tuple(clients)}), self.duration_quantile
        )
        k = n - len(chosen)
        is_seen = np.isfinite(util)
        unseen = sorted((i for i in rest if not is_seen[i]), key=lambda i: tie[i])
        seen = [i for i in rest if is_seen[i]]
        measured = sum(
            not hopeless[i] and clients[i].last_duration_s is not None for i in seen
        )
        short = target < obs.limits.deadline_s
        reserve = min(obs.limits.min_clients, measured, k) if short else 0
        picks = unseen[: k - reserve]
        k_seen = k - len(picks)
        if k_seen > 0 and seen:
            seen_util = np.maximum(util[seen], 1e-12)
            kth = np.sort(seen_util)[::-1][min(k_seen, len(seen)) - 1]
            pool = [j for j in range(len(seen)) if seen_util[j] >= self.cutoff * kth]
            gumbel = np.log(seen_util[pool]) + rng.gumbel(size=len(pool))
            picks += [
                seen[pool[j]] for j in np.argsort(-gumbel, kind="stable")[:k_seen]
            ]
        chosen += picks

        selected = tuple(clients[i].id for i in chosen)
        allocations = {
            clients[i].id: self._allocation(obs, clients[i], target) for i in chosen
        }
        expected = {
            clients[i].id: expected_duration(
                clients[i],
                allocations[clients[i].id].local_epochs,
                obs.default_epochs,
            )
            for i in chosen
        }
        untimed = [cid for cid, t in expected.items() if t is None]
        late_s = untimed_deadline(
            list(expected.values()),
            obs.limits.min_clients,
            target,
            obs.limits.deadline_s,
        )
        for cid in untimed:
            allocations[cid] = allocations[cid].model_copy(
                update={"deadline_s": late_s}
            )
        return Decision(
            selected=selected,
            allocations=allocations,
            rationale=(
                f"{n_explore} exploration slots by staleness, "
                f"{len(selected) - n_explore} by utility "
                f"(Oort cutoff {self.cutoff:g}); "
                f"preferred round time {target:.2f}s, "
                f"{len(untimed)} never-timed client(s) with deadline {late_s:.2f}s"
            ),
            source="deterministic",
        )

    @staticmethod
    def _allocation(obs: Observation, client: ClientState, target: float) -> Allocation:
        epochs = obs.default_epochs
        deadline = obs.limits.deadline_s
        fitted = fitted_epochs(client, obs, target)
        if fitted is not None:
            # Measured per-epoch compute: the epochs that fit ``target``, the
            # preferred round time (the deadline unless ``duration_quantile`` is set).
            epochs = fitted
        elif client.last_duration_s is not None and client.last_duration_s > deadline:
            # Scale local work down so the next round fits the deadline.
            per_epoch = client.last_duration_s / max(epochs, 1)
            epochs = max(obs.limits.min_epochs, int(deadline // per_epoch))
        return Allocation(
            local_epochs=epochs,
            lr=obs.default_lr,
            compression=obs.default_compression,
            deadline_s=deadline,
        )

    # ------------------------------------------------ bandwidth-aware compression
    @staticmethod
    def _with_codecs(decision: Decision, codecs: Mapping[str, Compression]) -> Decision:
        """Give each selected client its codec from :func:`bandwidth_codecs`.

        A no-op unless the limits allow codecs besides the default
        (``compression.adaptive``): the default run is unchanged.
        """
        if not codecs:
            return decision
        allocations = {
            cid: (
                a.model_copy(update={"compression": codecs[cid]})
                if cid in codecs
                else a
            )
            for cid, a in decision.allocations.items()
        }
        used = [a.compression for a in allocations.values()]
        counts = ", ".join(f"{c} x{used.count(c)}" for c in dict.fromkeys(used))
        return decision.model_copy(
            update={
                "allocations": allocations,
                "rationale": f"{decision.rationale}; codecs by bandwidth: {counts}",
            }
        )

    def _aggregate(self, obs: Observation) -> Decision:
        flags = tuple(
            Flag(
                id=r.id,
                kind="straggler",
                reason=(
                    f"duration {r.duration_s:.2f}s over deadline "
                    f"{obs.limits.deadline_s:.2f}s"
                ),
            )
            for r in obs.replies
            if r.duration_s > obs.limits.deadline_s
        )
        rule = "weighted"
        reputation = {c.id: 1.0 for c in obs.clients}
        if self.detection is not None:
            record = clients_with_record(obs.clients, self.detection)
            suspects = detect(obs.replies, self.detection, record)
            flags += suspects
            reputation = {c.id: c.reputation for c in obs.clients}
            if len({f.id for f in flags}) > int(
                obs.limits.max_flag_share * len(obs.replies)
            ):
                rule = "median"
        flagged = {f.id for f in flags}
        weights = {
            r.id: float(r.num_examples) * max(reputation.get(r.id, 1.0), 1e-3)
            for r in obs.replies
            if r.id not in flagged
        }
        kinds = [f.kind for f in flags]
        return Decision(
            weights=weights,
            flags=flags,
            aggregation=rule,
            rationale=(
                f"weights by examples{' x reputation' if self.detection else ''}; "
                f"{kinds.count('straggler')} straggler(s), "
                f"{kinds.count('malicious')} suspect(s) flagged"
                + (
                    f", {kinds.count('faulty')} faulty update(s) dropped"
                    if "faulty" in kinds
                    else ""
                )
                + f"; rule {rule}"
            ),
            source="deterministic",
        )
