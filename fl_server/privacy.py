"""Server side of differential privacy: Flower's client-level DP wrapper, and epsilon.

``dp.mode=client`` wraps the strategy in Flower's
``DifferentialPrivacyClientSideFixedClipping`` (clients run ``fixedclipping_mod``,
the server adds Gaussian noise of std ``noise_multiplier * clipping_norm /
clients_per_round`` to the aggregate). :class:`AgentClientDP` is that wrapper plus an
accountant: after each round it composes one Gaussian release into an Opacus RDP
accountant and writes the cumulative epsilon into the agent's round info, from where
``results.jsonl`` takes it.

The accountant is deliberately conservative in two ways. No amplification by
sampling is claimed (the agent selects clients by utility, not uniformly at random),
and the effective noise multiplier accounts for the agent's non-uniform weights: one
client's clipped update moves a weighted mean by at most ``max_share * C``, so the
noise std ``sigma * C / n`` amounts to a multiplier ``sigma / (n * max_share)``
(equal to ``sigma`` for uniform weights).

``dp.mode=sample``: each client reports its own cumulative DP-SGD epsilon
(``dp-epsilon``); :mod:`fl_server.privacy_metrics` collects it for the round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)

from orchestration.config import RunConfig

from .strategy import AgentStrategy

log = logging.getLogger("agentfl.privacy")


def effective_noise_multiplier(
    noise_multiplier: float, num_sampled: int, max_share: float
) -> float:
    """Return the noise multiplier of ``sigma*C/n`` noise on a weighted mean.

    A weighted mean whose largest weight share is ``max_share`` has L2 sensitivity
    ``max_share * C`` to one client's clipped update.
    """
    if num_sampled < 1 or not 0 < max_share <= 1:
        raise ValueError(f"num_sampled={num_sampled}, max_share={max_share}")
    return noise_multiplier / (num_sampled * max_share)


class RoundAccountant:
    """Cumulative RDP epsilon of one Gaussian release per round (no amplification)."""

    def __init__(self, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.delta = delta
        self._acc = RDPAccountant()

    def step(self, noise_multiplier: float) -> float:
        """Compose one release; return the cumulative epsilon (inf without noise)."""
        if noise_multiplier <= 0:
            return math.inf
        self._acc.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        return float(self._acc.get_epsilon(delta=self.delta))


class AgentClientDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, accounting into the agent.

    Parameters
    ----------
    agent : AgentStrategy
        The wrapped strategy; its round info receives ``epsilons["server"]``.
    noise_multiplier, clipping_norm : float
        As Flower's wrapper.
    num_sampled_clients : int
        Clients per round (the noise std divides by it).
    delta : float
        The delta epsilon is reported at.
    """

    def __init__(
        self,
        agent: AgentStrategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        delta: float,
    ) -> None:
        super().__init__(agent, noise_multiplier, clipping_norm, num_sampled_clients)
        self.agent = agent
        self.ledger = RoundAccountant(delta)  # Flower's own needs FedAvg
        self.epsilon = 0.0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with noise (Flower), then account for the release."""
        replies = list(replies)
        if any(r.has_error() for r in replies):
            # Flower's wrapper skips a round with any error reply; the agent
            # aggregates the others, so the noise is added here instead.
            arrays, metrics = self.agent.aggregate_train(server_round, replies)
            if arrays is not None:
                arrays = self._add_noise_to_aggregated_arrays(arrays)
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            shares = self.agent.info.weights.values()
            sigma = effective_noise_multiplier(
                self.noise_multiplier,
                self.num_sampled_clients,
                max(shares) if shares else 1.0,
            )
            self.epsilon = self.ledger.step(sigma)
            self.agent.info.epsilons["server"] = self.epsilon
            log.info(
                "round %d: client-level DP, effective sigma %.3f, epsilon %.3f",
                server_round,
                sigma,
                self.epsilon,
            )
        return arrays, metrics


def with_client_dp(cfg: RunConfig, strategy: Strategy) -> Strategy:
    """Return ``strategy`` wrapped for ``dp.mode=client``, else ``strategy`` itself.

    The agent gets :class:`AgentClientDP` (noise plus epsilon in the results); a
    Flower baseline gets Flower's wrapper as it is (noise, no epsilon).
    """
    if cfg.dp.mode != "client":
        return strategy
    kw = {
        "noise_multiplier": cfg.dp.noise_multiplier,
        "clipping_norm": cfg.dp.clipping_norm,
        "num_sampled_clients": cfg.clients_per_round,
    }
    if isinstance(strategy, AgentStrategy):
        return AgentClientDP(strategy, delta=cfg.dp.delta, **kw)  # type: ignore[arg-type]
    return DifferentialPrivacyClientSideFixedClipping(strategy, **kw)  # type: ignore[arg-type]
