"""Split a dataset between the server and the clients, reproducibly.

A stratified share is held out as the server's centralized test set, never seen by any
client. The rest is partitioned with ``flwr-datasets`` partitioners (IID, Dirichlet,
pathological) run on an in-memory Hugging Face dataset of indices and labels, and each
partition is split again into the client's own train and test parts. scikit-learn and
``flwr-datasets`` are imported when a split is made, not with this module: a device
with its own data (``fl_client.task.local_data``) needs neither.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestration.config import RunConfig

from .data import ArrayDataset, load_dataset


@dataclass(frozen=True)
class ClientSplit:
    """One client's local train and test data."""

    train: ArrayDataset
    test: ArrayDataset


def central_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(client_pool_idx, central_test_idx)``, stratified by label."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    pool, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=y
    )
    return np.sort(pool), np.sort(test)


def make_partitioner(
    kind: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> Any:
    """Return a ``flwr_datasets`` partitioner over a ``label`` column."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            seed=seed,
        )
    if kind == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            seed=seed,
        )
    raise ValueError(
        f"unknown partitioner {kind!r}; valid: iid, dirichlet, pathological"
    )


def partition_indices(
    labels: np.ndarray,
    kind: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition positions ``0..len(labels)-1`` into ``num_partitions`` index arrays."""
    from datasets import Dataset

    if num_partitions > len(labels):
        raise ValueError(
            f"{num_partitions} partitions but only {len(labels)} examples to share"
        )
    partitioner = make_partitioner(
        kind,
        num_partitions,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.astype(np.int64), "pos": np.arange(len(labels))}
    )
    return [
        np.asarray(partitioner.load_partition(p)["pos"], dtype=np.int64)
        for p in range(num_partitions)
    ]


@functools.lru_cache(maxsize=8)
def federated_split(
    dataset: str,
    num_partitions: int,
    kind: str,
    alpha: float,
    classes_per_client: int,
    client_test_fraction: float,
    central_test_fraction: float,
    seed: int,
) -> tuple[tuple[ClientSplit, ...], ArrayDataset]:
    """Return every client's split and the central test set (cached per process)."""
    data = load_dataset(dataset)
    pool, central = central_split(data.y, central_test_fraction, seed)
    parts = partition_indices(
        data.y[pool],
        kind,
        num_partitions,
        alpha=alpha,
        classes_per_client=classes_per_client,
        seed=seed,
    )
    clients = []
    for pid, part in enumerate(parts):
        rng = np.random.default_rng([seed, pid])
        rows = pool[rng.permutation(part)]
        n_test = max(1, int(round(client_test_fraction * len(rows))))
        if len(rows) - n_test < 1:
            raise ValueError(
                f"partition {pid} has {len(rows)} examples: too few to split into "
                "train and test; use fewer clients or a larger dataset.alpha"
            )
        clients.append(
            ClientSplit(
                train=data.subset(rows[n_test:]), test=data.subset(rows[:n_test])
            )
        )
    return tuple(clients), data.subset(central)


def split_for(cfg: RunConfig) -> tuple[tuple[ClientSplit, ...], ArrayDataset]:
    """Return :func:`federated_split` for a run configuration."""
    d = cfg.dataset
    return federated_split(
        d.name,
        cfg.num_clients,
        d.partitioner,
        d.alpha,
        d.classes_per_client,
        d.client_test_fraction,
        d.central_test_fraction,
        cfg.seed,
    )
