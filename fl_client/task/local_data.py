"""Device-local data: a folder of images by class, or a CSV file, on the SuperNode.

A SuperNode started with ``--node-config "... data-path=/data/digits"`` trains on the
files under that path instead of a simulated partition of the run's dataset. Two forms
are accepted:

* a **folder** with one sub-folder per class, named by the class index
  (``0/``, ``1/``, ... up to ``num_classes - 1``), holding image files (PNG, JPEG, BMP,
  GIF, TIFF, WebP, PGM/PPM). Images are converted to the run's channels (grey or RGB)
  and resized to its height and width;
* a **CSV file** with a header row, a ``label`` column (the class index) and one column
  per input value (``C*H*W`` of them, row-major, e.g. 64 for ``digits``' 8x8).

The run's dataset (``dataset.name``) fixes the model's input shape and number of
classes; the local data must fit them. Values are standardised to zero mean and unit
variance over the local data, as the built-in datasets are. Any problem raises
:class:`LocalDataError` naming the path, the file or row, and what was expected. Pure
loading: no Flower, no torch.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np

from ..node_config import DATA_PATH_KEY
from .data import ArrayDataset, _standardize
from .partition import ClientSplit

LABEL_COLUMN = "label"
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
# (C, H, W) and number of classes of each run dataset: the global model's input.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist5k": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


class LocalDataError(ValueError):
    """Device-local data that cannot be used; the message names path and cause."""


def run_input(dataset_name: str) -> tuple[tuple[int, int, int], int]:
    """Return ``((C, H, W), num_classes)`` of the model a run with this dataset uses."""
    try:
        return DATASET_SHAPES[dataset_name]
    except KeyError:
        raise LocalDataError(
            f"dataset.name={dataset_name!r} has no known input shape; "
            f"valid: {', '.join(DATASET_SHAPES)}"
        ) from None


def _label(text: str, num_classes: int, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise LocalDataError(
            f"{where}: label {text!r} is not a class index "
            f"(expected 0..{num_classes - 1})"
        ) from None
    if not value.is_integer() or not 0 <= value < num_classes:
        raise LocalDataError(
            f"{where}: unknown label {text!r}; the run has {num_classes} classes "
            f"(labels 0..{num_classes - 1})"
        )
    return int(value)


def load_csv(
    path: Path, input_shape: tuple[int, int, int], num_classes: int
) -> ArrayDataset:
    """Load a CSV of a ``label`` column and ``C*H*W`` feature columns.

    Raises
    ------
    LocalDataError
        No header or ``label`` column, a wrong number of feature columns for the
        run's model input, a ragged row, a non-numeric or non-finite value, an
        unknown label, or no data rows.
    """
    n_features = math.prod(input_shape)
    shape_text = "x".join(map(str, input_shape))
    with path.open(newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        if LABEL_COLUMN not in header:
            raise LocalDataError(
                f"{path}: the header row {header[:5]!r} has no {LABEL_COLUMN!r} "
                f"column; expected '{LABEL_COLUMN}' and {n_features} feature columns"
            )
        if len(header) - 1 != n_features:
            raise LocalDataError(
                f"{path}: {len(header) - 1} feature columns, but the run's model takes "
                f"{n_features} values per example ({shape_text})"
            )
        li = header.index(LABEL_COLUMN)
        xs: list[list[float]] = []
        ys: list[int] = []
        for line, row in enumerate(rows, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path} line {line}"
            if len(row) != len(header):
                raise LocalDataError(
                    f"{where}: {len(row)} values, the header has {len(header)} columns"
                )
            ys.append(_label(row[li].strip(), num_classes, where))
            try:
                values = [float(v) for i, v in enumerate(row) if i != li]
            except ValueError as e:
                raise LocalDataError(f"{where}: non-numeric feature ({e})") from None
            if not all(math.isfinite(v) for v in values):
                raise LocalDataError(f"{where}: non-finite feature value")
            xs.append(values)
    if not ys:
        raise LocalDataError(f"{path}: no data rows after the header")
    x = np.asarray(xs, dtype=np.float32).reshape(-1, *input_shape)
    return ArrayDataset(_standardize(x), np.asarray(ys, dtype=np.int64), num_classes)


def load_image_folder(
    path: Path, input_shape: tuple[int, int, int], num_classes: int
) -> ArrayDataset:
    """Load ``path/<class index>/<image>`` files, converted and resized to the input.

    Raises
    ------
    LocalDataError
        No class folders, a class folder not named 0..num_classes-1, no images, an
        unreadable image, or a channel count other than 1 or 3.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - pillow is a client dependency
        raise LocalDataError(f"{path}: reading images needs Pillow ({e})") from e
    c, h, w = input_shape
    if c not in (1, 3):
        raise LocalDataError(f"{path}: images need 1 or 3 channels, the run has {c}")
    mode = "L" if c == 1 else "RGB"
    folders = sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not folders:
        raise LocalDataError(
            f"{path}: no class folders; put each class's images in a sub-folder "
            f"named by its index (0..{num_classes - 1})"
        )
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for folder in folders:
        label = _label(folder.name, num_classes, f"{path}: class folder")
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            try:
                with Image.open(file) as raw:
                    img = raw.convert(mode)
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as e:
                raise LocalDataError(f"{file}: not a readable image ({e})") from e
            xs.append(pixels[None] if c == 1 else pixels.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise LocalDataError(
            f"{path}: the class folders hold no images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    x = np.stack(xs)
    return ArrayDataset(_standardize(x), np.asarray(ys, dtype=np.int64), num_classes)


def load_local(
    path: str | Path, input_shape: tuple[int, int, int], num_classes: int
) -> ArrayDataset:
    """Load a class-folder directory or a ``.csv`` file (see the module docstring).

    Raises
    ------
    LocalDataError
        A missing path, a file that is not ``.csv``, or malformed content.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LocalDataError(
            f"node config {DATA_PATH_KEY}={str(path)!r}: no such file or folder"
        )
    if p.is_dir():
        return load_image_folder(p, input_shape, num_classes)
    if p.suffix.lower() == ".csv":
        return load_csv(p, input_shape, num_classes)
    raise LocalDataError(
        f"node config {DATA_PATH_KEY}={str(path)!r}: expected a folder of class "
        "sub-folders or a .csv file"
    )


def split_local(data: ArrayDataset, test_fraction: float, seed: int) -> ClientSplit:
    """Shuffle with ``seed`` and hold out ``test_fraction`` (at least one) for testing.

    Raises
    ------
    LocalDataError
        With fewer than two examples (one to train, one to test).
    """
    n = len(data.y)
    if n < 2:
        raise LocalDataError(
            f"{n} local example(s): at least 2 are needed (one to train, one to test)"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    return ClientSplit(
        train=data.subset(order[n_test:]), test=data.subset(order[:n_test])
    )


@functools.lru_cache(maxsize=4)
def local_split(
    path: str, dataset_name: str, test_fraction: float, seed: int
) -> ClientSplit:
    """Load ``path`` for a run on ``dataset_name`` and split it (cached per process)."""
    shape, num_classes = run_input(dataset_name)
    return split_local(load_local(path, shape, num_classes), test_fraction, seed)
