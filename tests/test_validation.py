from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fl_server.aggregation import l2_norms
from fl_server.validation import (
    InvalidReply,
    ModelSpec,
    finite_rows,
    non_finite_array,
    validate_train_reply,
)

GLOBAL = ArrayRecord([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
SPEC = ModelSpec.of(GLOBAL)


def _content(arrays: list[np.ndarray] | None = None, **metrics: Any) -> RecordDict:
    arrays = (
        arrays
        if arrays is not None
        else [np.ones((2, 3), np.float32), np.ones(4, np.float32)]
    )
    m: dict[str, Any] = {
        "num-examples": 10,
        "train-loss": 0.5,
        "train-duration": 1.0,
        "partition-id": 3,
    }
    m.update(metrics)
    m = {k: v for k, v in m.items() if v is not None}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(m)})


def test_valid_reply_is_flattened() -> None:
    r = validate_train_reply(_content(), SPEC)

    assert r.vector.shape == (10,)
    assert (r.num_examples, r.partition_id) == (10, 3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            _content([np.full((2, 3), np.nan, np.float32), np.ones(4, np.float32)]),
            "non-finite",
        ),
        (
            _content([np.full((2, 3), np.inf, np.float32), np.ones(4, np.float32)]),
            "non-finite",
        ),
        (_content([np.ones((3, 2), np.float32), np.ones(4, np.float32)]), "shape"),
        (_content([np.ones((2, 3), np.int64), np.ones(4, np.float32)]), "dtype"),
        (
            _content([np.ones((2, 3), np.float64), np.ones(4, np.float32)]),
            "dtype float64, expected float32",
        ),
        (_content(**{"train-loss": -0.1}), "train-loss must be finite and >= 0"),
        (_content([np.ones((2, 3), np.float32)]), "keys differ"),
        (_content(**{"num-examples": 0}), "num-examples"),
        (_content(**{"num-examples": -5}), "num-examples"),
        (_content(**{"num-examples": 2.5}), "num-examples"),
        (_content(**{"train-loss": float("nan")}), "train-loss"),
        (_content(**{"train-duration": -1.0}), "train-duration"),
        (_content(**{"partition-id": None}), "lack"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(
    content: RecordDict, match: str
) -> None:
    with pytest.raises(InvalidReply, match=match):
        validate_train_reply(content, SPEC)


def test_two_array_records_are_rejected() -> None:
    c = _content()
    c["extra"] = ArrayRecord([np.ones(1, np.float32)])

    with pytest.raises(InvalidReply, match="1 ArrayRecord"):
        validate_train_reply(c, SPEC)


def test_out_row_receives_the_weights_and_is_untouched_on_rejection() -> None:
    out = np.full(10, -7.0, np.float32)
    bad = _content([np.full((2, 3), np.nan, np.float32), np.ones(4, np.float32)])

    with pytest.raises(InvalidReply):
        validate_train_reply(bad, SPEC, out=out)
    assert np.all(out == -7.0)

    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
    r = validate_train_reply(_content(arrays), SPEC, out=out)
    assert r.vector is out
    np.testing.assert_array_equal(out, np.r_[np.arange(6), np.ones(4)])
    with pytest.raises(ValueError, match="expected"):
        validate_train_reply(_content(), SPEC, out=np.zeros(9, np.float32))


def test_absurd_example_counts_are_rejected() -> None:
    validate_train_reply(_content(**{"num-examples": 20}), SPEC, max_examples=20)

    with pytest.raises(InvalidReply, match="num-examples 10000000 is absurd"):
        validate_train_reply(
            _content(**{"num-examples": 10_000_000}), SPEC, max_examples=20
        )


def test_spec_headers_are_flowers_npy_headers() -> None:
    assert len(SPEC.headers) == 2
    for header, array in zip(SPEC.headers, GLOBAL.values(), strict=True):
        assert header.startswith(b"\x93NUMPY")
        assert len(array.data) == len(header) + array.numpy().nbytes


def test_in_place_decoding_equals_flowers_numpy() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(2, 3)).astype(np.float32), np.arange(4, dtype="f4")]
    record = ArrayRecord(arrays)
    for i, array in enumerate(record.values()):
        fast = SPEC.decode(i, array)
        assert not fast.flags.writeable  # a view of the message's bytes
        np.testing.assert_array_equal(fast, array.numpy())
        assert fast.dtype == array.numpy().dtype and fast.shape == arrays[i].shape
    r = validate_train_reply(_content(arrays), SPEC)
    np.testing.assert_array_equal(r.vector, np.concatenate([a.ravel() for a in arrays]))


def test_other_layouts_take_flowers_path_and_are_checked() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    r = validate_train_reply(_content([fortran, np.ones(4, np.float32)]), SPEC)
    np.testing.assert_array_equal(r.vector[:6], fortran.ravel())  # C order values

    record = ArrayRecord([np.ones((2, 3), np.float32), np.ones(4, np.float32)])
    first = next(iter(record.values()))
    first.data = first.data[:-4]  # right header, a value missing
    content = RecordDict(
        {
            "arrays": record,
            "metrics": MetricRecord(
                {
                    "num-examples": 10,
                    "train-loss": 0.5,
                    "train-duration": 1.0,
                    "partition-id": 3,
                }
            ),
        }
    )
    with pytest.raises(InvalidReply, match="cannot be decoded"):
        validate_train_reply(content, SPEC)


def test_finite_rows_is_exact_for_float32_rows() -> None:
    big = np.finfo(np.float32).max
    m = np.array(
        [
            [big, -big, big, big],  # finite: float64 sums of squares do not overflow
            [0.0, np.nan, 0.0, 0.0],
            [np.inf, 0.0, 0.0, 0.0],
            [-np.inf, np.inf, 0.0, 0.0],  # inf - inf: NaN in the sum
            [1.0, 2.0, 3.0, 4.0],
        ],
        dtype=np.float32,
    )
    sq = np.einsum("ij,ij->i", m, m, dtype=np.float64)

    assert finite_rows(sq).tolist() == [True, False, False, False, True]
    # The strategy's norms (float32 sums, float64 again where those overflow)
    # give the same verdict, and the huge finite row keeps a finite norm.
    norms = l2_norms(m)
    assert finite_rows(norms**2).tolist() == [True, False, False, False, True]
    assert norms[0] == pytest.approx(np.sqrt(sq[0]), rel=1e-12)
    assert norms[4] == pytest.approx(np.sqrt(30.0), rel=1e-6)


def test_encode_gives_flowers_own_array() -> None:
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(2, 3)).astype(np.float32), np.arange(4, dtype="f4")]
    for i, v in enumerate(values):
        fast, flower = SPEC.encode(i, v), Array(v)
        assert (fast.dtype, fast.shape, fast.stype) == (
            flower.dtype,
            flower.shape,
            flower.stype,
        )
        assert fast.data == flower.data  # byte for byte np.save's output
    # A layout other than the spec's (here float64) takes Flower's own path.
    wide = SPEC.encode(1, np.arange(4, dtype=np.float64))
    assert wide.dtype == "float64" and wide.numpy().tolist() == [0, 1, 2, 3]


def test_to_record_splits_a_vector_into_the_models_arrays() -> None:
    vector = np.arange(10, dtype=np.float64)  # cast to the arrays' float32
    record = SPEC.to_record(vector)

    assert list(record.keys()) == list(GLOBAL.keys())
    got = [a.numpy() for a in record.values()]
    assert [g.dtype for g in got] == [np.float32, np.float32]
    np.testing.assert_array_equal(got[0], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(got[1], np.arange(6, 10))
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        SPEC.to_record(np.zeros(9, np.float32))


def test_non_finite_array_names_the_array() -> None:
    v = np.zeros(10, np.float32)
    assert non_finite_array(v, SPEC) == ""
    v[7] = np.nan  # the second array (b) starts at index 6
    assert non_finite_array(v, SPEC) == SPEC.names[1]
    v[0] = np.inf
    assert non_finite_array(v, SPEC) == SPEC.names[0]


def test_check_finite_false_leaves_the_check_to_the_caller() -> None:
    out = np.zeros(10, np.float32)
    bad = _content([np.full((2, 3), np.nan, np.float32), np.ones(4, np.float32)])

    r = validate_train_reply(bad, SPEC, out=out, check_finite=False)

    assert np.isnan(r.vector[:6]).all() and r.vector is out
