"""Simulated adversaries: what a malicious client sends instead of its honest update.

Attack code lives apart from honest training and is off unless ``attack.kind`` is set.
Which partitions are malicious is a deterministic function of the run's seed and
``attack.fraction`` (:func:`malicious_partitions`), so the server can record it and
score its detectors, and every strategy of a benchmark faces the same attackers.

All crafting functions are pure: they take the global model the client received and
its honestly trained local model as lists of arrays (state-dict order) and return the
arrays the attacker replies with. ``u = local - global`` is the honest update.

========== ==========================================================================
kind       reply
========== ==========================================================================
sign_flip  ``global - scale * u`` (a reversed, amplified update)
scaling    ``global + scale * u`` (a boosted update, e.g. model replacement)
noise      ``global + N(0, noise_std^2)`` per coordinate (no training signal)
label_flip trained honestly on labels ``y -> C - 1 - y`` (data poisoning)
free_ride  the received global model unchanged (no work done)
stale      the global model received in the first attacked round, every round
collude    every attacker sends the same ``global - scale * u_leader``, where
           ``u_leader`` is trained on the lowest malicious partition with its seed
========== ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from orchestration.config import AttackConfig, RunConfig

from .task.data import ArrayDataset

Arrays = list[np.ndarray]
_STALE_KEY = "attack-stale-model"


def malicious_partitions(
    num_clients: int, fraction: float, seed: int
) -> tuple[int, ...]:
    """Return the sorted partition ids that attack, ``round(fraction * n)`` of them.

    A deterministic function of ``(num_clients, fraction, seed)``; its own random
    stream, so it does not depend on the data split or on the strategy.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 0xA77AC])
    return tuple(sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False)))


def sign_flip(global_: Arrays, local: Arrays, scale: float) -> Arrays:
    """Return ``global - scale * (local - global)``."""
    return [
        (g - scale * (w - g)).astype(g.dtype)
        for g, w in zip(global_, local, strict=True)
    ]


def scale_update(global_: Arrays, local: Arrays, scale: float) -> Arrays:
    """Return ``global + scale * (local - global)``."""
    return [
        (g + scale * (w - g)).astype(g.dtype)
        for g, w in zip(global_, local, strict=True)
    ]


def gaussian_update(global_: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    """Return ``global + N(0, std^2)``, drawn independently per coordinate."""
    return [(g + rng.normal(0.0, std, size=g.shape)).astype(g.dtype) for g in global_]


def free_ride(global_: Arrays) -> Arrays:
    """Return copies of the received global model (an all-zero update)."""
    return [g.copy() for g in global_]


def flip_labels(data: ArrayDataset) -> ArrayDataset:
    """Return ``data`` with every label ``y`` replaced by ``num_classes - 1 - y``."""
    y = (data.num_classes - 1 - data.y).astype(data.y.dtype)
    return ArrayDataset(data.x, y, data.num_classes)


@dataclass(frozen=True)
class Attacker:
    """One malicious client in one round: how it trains and what it replies.

    Built by :func:`attacker_for`; ``None`` there means the client is honest.
    """

    kind: str
    pid: int
    leader: int
    scale: float
    noise_std: float
    seed: int
    server_round: int

    def training_set(
        self, data: ArrayDataset, data_of: Callable[[int], ArrayDataset]
    ) -> tuple[int, ArrayDataset]:
        """Return ``(partition id whose seed to use, data to train on)``."""
        if self.kind == "label_flip":
            return self.pid, flip_labels(data)
        if self.kind == "collude":
            return self.leader, data_of(self.leader)
        return self.pid, data

    def reply(self, global_: Arrays, local: Arrays, state: RecordDict) -> Arrays:
        """Return the arrays sent instead of ``local``; ``state`` is the node's."""
        if self.kind in ("sign_flip", "collude"):
            return sign_flip(global_, local, self.scale)
        if self.kind == "scaling":
            return scale_update(global_, local, self.scale)
        if self.kind == "noise":
            rng = np.random.default_rng([self.seed, self.server_round, self.pid])
            return gaussian_update(global_, self.noise_std, rng)
        if self.kind == "free_ride":
            return free_ride(global_)
        if self.kind == "stale":
            if _STALE_KEY not in state.array_records:
                state[_STALE_KEY] = ArrayRecord(free_ride(global_))
            return [
                a.copy() for a in state.array_records[_STALE_KEY].to_numpy_ndarrays()
            ]
        return local  # label_flip: the poisoned training is the attack


def attacker_for(cfg: RunConfig, pid: int, server_round: int) -> Attacker | None:
    """Return the attacker partition ``pid`` plays this round, or None if honest."""
    attack: AttackConfig = cfg.attack
    if attack.kind == "none" or server_round < attack.start_round:
        return None
    bad = malicious_partitions(cfg.num_clients, attack.fraction, cfg.seed)
    if pid not in bad:
        return None
    return Attacker(
        kind=attack.kind,
        pid=pid,
        leader=bad[0],
        scale=attack.scale,
        noise_std=attack.noise_std,
        seed=cfg.seed,
        server_round=server_round,
    )
