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

    Sampling is Flower's (``fraction_train`` of the connected nodes, drawn with the
    ``random`` module, which the ServerApp seeds). Federated evaluation is off so the
    round time compares like with like; the server evaluates centrally.
    """
    name = cfg.strategy.name
    common = {
        "fraction_train": cfg.clients_per_round / cfg.num_clients,
        "fraction_evaluate": 0.0,
        "min_train_nodes": cfg.clients_per_round,
        "min_available_nodes": cfg.num_clients,
    }
    s = cfg.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=s.trim_beta, **common)
    if name == "multikrum":
        return MultiKrum(
            num_malicious_nodes=s.krum_byzantine,
            num_nodes_to_select=s.krum_keep,
            **common,
        )
    if name == "fedmedian":
        return FedMedian(**common)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
