"""The learning task shared by clients and server: data, partitions, models, loops."""

from .data import DATASETS, ArrayDataset, DatasetUnavailableError, load_dataset
from .models import MODELS, build_model
from .partition import (
    ClientSplit,
    central_split,
    federated_split,
    partition_indices,
    split_for,
)
from .training import evaluate, train

__all__ = [
    "DATASETS",
    "MODELS",
    "ArrayDataset",
    "ClientSplit",
    "DatasetUnavailableError",
    "build_model",
    "central_split",
    "evaluate",
    "federated_split",
    "load_dataset",
    "partition_indices",
    "split_for",
    "train",
]
