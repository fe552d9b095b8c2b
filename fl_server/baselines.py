"""Flower's own strategies as baselines, built from the same run configuration."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    MultiKrum,
    Strategy,
)

from orchestration.config import RunConfig

BASELINES = ("fedavg", "fedprox", "fedtrimmedavg", "multikrum", "fedmedian")


def build_baseline(cfg: RunConfig) -> Strategy:
    """Return Flower's strategy named by ``cfg.strategy.name``, unmodified.

    Arguments are Flower's positional ``fraction_train, fraction_evaluate,
    min_train_nodes, min_evaluate_nodes, min_available_nodes``. Sampling is Flower's
    (``fraction_train`` of the connected nodes, drawn with the ``random`` module,
    which the ServerApp seeds). Federated evaluation is off so the round time
    compares like with like; the server evaluates centrally.
    """
    name = cfg.strategy.name
    fraction = cfg.clients_per_round / cfg.num_clients
    k, n = cfg.clients_per_round, cfg.num_clients
    s = cfg.strategy
    if name == "fedavg":
        return FedAvg(fraction, 0.0, k, 0, n)
    if name == "fedprox":
        return FedProx(fraction, 0.0, k, 0, n, proximal_mu=s.proximal_mu)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(fraction, 0.0, k, 0, n, beta=s.trim_beta)
    if name == "multikrum":
        return MultiKrum(
            fraction,
            0.0,
            k,
            0,
            n,
            num_malicious_nodes=s.krum_byzantine,
            num_nodes_to_select=s.krum_keep,
        )
    if name == "fedmedian":
        return FedMedian(fraction, 0.0, k, 0, n)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
