"""Device-local data (node config ``data-path``) and the node's thread count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict
from inprocess import InProcessGrid
from PIL import Image
from sklearn.datasets import load_digits

from fl_client.client_app import make_client_app
from fl_client.node_config import threads
from fl_client.task import load_dataset
from fl_client.task.local_data import (
    DATASET_SHAPES,
    LocalDataError,
    load_local,
    local_split,
    split_local,
)
from fl_client.task.partition import central_split
from fl_server.server_app import run_server
from orchestration.config import RunConfig

DIGITS = ((1, 8, 8), 10)


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", *[f"p{i}" for i in range(x.shape[1])]])
        for xi, yi in zip(x, y, strict=True):
            w.writerow([int(yi), *[f"{v:g}" for v in xi]])
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _image_folder(root: Path, classes: dict[str, int], size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def test_csv_of_real_digits_loads_as_the_run_input(tmp_path: Path) -> None:
    digits = load_digits()
    path = _write_csv(tmp_path / "d.csv", digits.data[:120], digits.target[:120])

    data = load_local(path, *DIGITS)

    assert data.x.shape == (120, 1, 8, 8) and data.x.dtype == np.float32
    assert np.array_equal(data.y, digits.target[:120])
    assert abs(float(data.x.mean())) < 1e-4 and abs(float(data.x.std()) - 1) < 1e-3
    # Row-major: the first raw row, standardised, is the first image.
    raw = digits.data[:120].astype(np.float32)
    expected = (raw[0] - raw.mean()) / (raw.std() + 1e-8)
    np.testing.assert_allclose(data.x[0].ravel(), expected, rtol=1e-5, atol=1e-5)


def test_image_folder_is_resized_and_labelled_by_folder(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", {"0": 3, "7": 2}, size=(12, 10))
    (root / "7" / "notes.txt").write_text("ignored")
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(root / "0" / "rgb.jpg")

    data = load_local(root, *DIGITS)

    assert data.x.shape == (6, 1, 8, 8)
    assert sorted(data.y.tolist()) == [0, 0, 0, 0, 7, 7]
    rgb_data = load_local(root, (3, 32, 32), 10)
    assert rgb_data.x.shape == (6, 3, 32, 32)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p, "no class folders"),
        (lambda p: _image_folder(p / "i", {"cat": 1}, (8, 8)), "'cat'"),
        (lambda p: _image_folder(p / "i", {"12": 1}, (8, 8)), "unknown label '12'"),
        (lambda p: _image_folder(p / "i", {"1": 0}, (8, 8)), "hold no images"),
        (lambda p: _write_lines(p / "x.txt", ["label,a"]), "or a .csv file"),
        (lambda p: _write_lines(p / "x.csv", ["y,a,b"]), "no 'label' column"),
        (lambda p: _write_lines(p / "x.csv", []), "no 'label' column"),
        (
            lambda p: _write_lines(p / "x.csv", ["label," + ",".join("a" * 63)]),
            "63 feature columns, but the run's model takes 64 values",
        ),
        (
            lambda p: _write_lines(p / "x.csv", ["label," + ",".join("a" * 64)]),
            "no data rows",
        ),
        (
            lambda p: _write_lines(
                p / "x.csv", ["label," + ",".join("a" * 64), "1,2,3"]
            ),
            "line 2: 3 values, the header has 65 columns",
        ),
        (
            lambda p: _write_lines(
                p / "x.csv", ["label," + ",".join("a" * 64), "1," + "x," * 63 + "1"]
            ),
            "line 2: non-numeric feature",
        ),
        (
            lambda p: _write_lines(
                p / "x.csv", ["label," + ",".join("a" * 64), "1," + "nan," * 63 + "1"]
            ),
            "non-finite",
        ),
        (
            lambda p: _write_lines(
                p / "x.csv", ["label," + ",".join("a" * 64), "10," + "0," * 63 + "0"]
            ),
            "unknown label '10'; the run has 10 classes (labels 0..9)",
        ),
        (
            lambda p: _write_lines(
                p / "x.csv", ["label," + ",".join("a" * 64), "cat," + "0," * 63 + "0"]
            ),
            "label 'cat' is not a class index",
        ),
    ],
)
def test_bad_local_data_is_refused_with_a_clear_error(
    tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(LocalDataError) as err:
        load_local(path, *DIGITS)
    assert message in str(err.value)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "i", {"3": 1}, (8, 8))
    (root / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LocalDataError, match="broken.png: not a readable image"):
        load_local(root, *DIGITS)


def test_split_is_reproducible_and_disjoint(tmp_path: Path) -> None:
    digits = load_digits()
    data = load_local(
        _write_csv(tmp_path / "d.csv", digits.data[:50], digits.target[:50]), *DIGITS
    )
    a, b = split_local(data, 0.2, seed=3), split_local(data, 0.2, seed=3)
    assert len(a.test.y) == 10 and len(a.train.y) == 40
    assert np.array_equal(a.train.x, b.train.x)
    rows = {r.tobytes() for r in a.train.x} & {r.tobytes() for r in a.test.x}
    assert rows == set()
    with pytest.raises(LocalDataError, match="at least 2"):
        split_local(data.subset(np.array([0])), 0.2, seed=0)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_declared_shapes_match_the_built_in_datasets(name: str) -> None:
    data = load_dataset(name)
    assert DATASET_SHAPES[name] == (data.input_shape, data.num_classes)


@pytest.mark.parametrize(
    ("conf", "expected"),
    [({}, 1), ({"threads": 4}, 4), ({"threads": "3"}, 3), ({"threads": 2.0}, 2)],
)
def test_threads_from_node_config(conf: dict[str, object], expected: int) -> None:
    assert threads(conf, 1) == expected


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x", True, ""])
def test_bad_threads_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="node config threads="):
        threads({"threads": bad}, 1)


def _digits_csvs(tmp_path: Path, n: int) -> list[Path]:
    """Write the client pool of digits (no central test rows) as n CSV files."""
    digits = load_digits()
    pool, _ = central_split(digits.target, 0.2, seed=0)
    chunks = np.array_split(np.random.default_rng(0).permutation(pool), n)
    return [
        _write_csv(tmp_path / f"node{i}.csv", digits.data[c], digits.target[c])
        for i, c in enumerate(chunks)
    ]


def test_run_on_device_local_csvs_trains(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(
        {
            "num_rounds": 3,
            "num_clients": 3,
            "clients_per_round": 3,
            "min_replies": 2,
            "policy.name": "deterministic",
            "dataset.name": "digits",
            "model.name": "mlp",
            "output_dir": str(tmp_path / "out"),
            "run_name": "r",
        }
    )
    grid = InProcessGrid(make_client_app(cfg), 3)
    paths = _digits_csvs(tmp_path, 3)
    for nid, path in zip(grid.nodes, paths, strict=True):
        grid.contexts[nid].node_config.update({"data-path": str(path), "threads": 2})

    try:
        summary = run_server(grid, cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    rows = [
        json.loads(x)
        for x in (tmp_path / "out" / "r" / "results.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
    assert all(r["accepted"] == 3 and r["failures"] == 0 for r in rows[1:])
    assert summary["rounds"] == 3
    # The roll call reported each node's own CSV size (80% of its rows train).
    local = local_split(str(paths[0]), "digits", 0.2, cfg.seed + 0)
    sizes = {m.content["metrics"]["num-examples"] for m in _query(grid)}
    assert len(local.train.y) in sizes


def _query(grid: InProcessGrid) -> list[Message]:
    msgs = [
        Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in grid.nodes
    ]
    return list(grid.send_and_receive(msgs))


def test_bad_data_path_is_an_error_reply_naming_the_key(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(
        {"num_clients": 2, "clients_per_round": 2, "dataset.name": "digits"}
    )
    grid = InProcessGrid(make_client_app(cfg), 2)
    nid = next(iter(grid.nodes))
    grid.contexts[nid].node_config["data-path"] = str(tmp_path / "nowhere")

    replies = _query(grid)

    assert replies[0].has_error()
    assert "data-path=" in replies[0].error.reason
    assert "no such file or folder" in replies[0].error.reason
    assert not replies[1].has_error()
