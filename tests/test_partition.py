from __future__ import annotations

import time

import numpy as np
import pytest

from fl_client.task import (
    DatasetUnavailableError,
    build_model,
    central_split,
    federated_split,
    load_dataset,
    partition_indices,
)


def test_mnist5k_is_real_mnist_offline() -> None:
    d = load_dataset("mnist5k")

    assert d.x.shape == (5000, 1, 28, 28)
    assert d.x.dtype == np.float32
    assert np.bincount(d.y).tolist() == [500] * 10


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_pool(kind: str) -> None:
    y = np.repeat(np.arange(10), 40)

    parts = partition_indices(y, kind, 8, alpha=0.5, classes_per_client=2, seed=1)

    allidx = np.concatenate(parts)
    assert len(parts) == 8
    assert len(allidx) == len(np.unique(allidx))
    if kind != "pathological":
        assert sorted(allidx.tolist()) == list(range(len(y)))
    if kind == "pathological":
        assert all(len(np.unique(y[p])) <= 2 for p in parts)


def test_partitioning_is_reproducible_and_seed_dependent() -> None:
    y = np.repeat(np.arange(10), 40)

    a = partition_indices(y, "dirichlet", 5, alpha=0.3, seed=7)
    b = partition_indices(y, "dirichlet", 5, alpha=0.3, seed=7)
    c = partition_indices(y, "dirichlet", 5, alpha=0.3, seed=8)

    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_central_test_set_is_held_out_from_every_client() -> None:
    clients, central = federated_split("digits", 6, "dirichlet", 0.5, 2, 0.2, 0.2, 0)
    data = load_dataset("digits")
    pool, test = central_split(data.y, 0.2, 0)

    assert len(central.y) == len(test)
    assert not set(pool.tolist()) & set(test.tolist())
    seen = {
        row.tobytes() for c in clients for row in np.concatenate([c.train.x, c.test.x])
    }
    assert not any(row.tobytes() in seen for row in central.x)
    assert all(len(c.train.y) > 0 and len(c.test.y) > 0 for c in clients)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="mnist5k, digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="cnn, mlp"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="iid, dirichlet, pathological"):
        partition_indices(np.zeros(10, int), "shards", 2)


def test_online_dataset_offline_fails_fast_and_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AGENTFL_DATA_CACHE", str(tmp_path))
    load_dataset.cache_clear()
    start = time.perf_counter()

    with pytest.raises(DatasetUnavailableError, match="mnist5k"):
        load_dataset("cifar10")

    assert time.perf_counter() - start < 5
    load_dataset.cache_clear()


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
def test_models_fit_every_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    import torch

    m = build_model(name, shape, 10)

    assert m(torch.zeros(2, *shape)).shape == (2, 10)
