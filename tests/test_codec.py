"""Update codecs: round trips, error bounds, error feedback, corrupt payloads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fl_client.codec import (
    CodecError,
    decode,
    dequantize,
    encode,
    encode_with_feedback,
    pack_nibbles,
    quantize,
    top_k,
    unpack_nibbles,
)

SIZES = [300, 7, 1, 1024]


def _update(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, sum(SIZES)).astype(np.float32)
    x[307] = 0.123  # the one-entry tensor (constant: step 0)
    return x


def _roundtrip(x: np.ndarray, codec: str, fraction: float = 0.05) -> np.ndarray:
    enc = encode(x, SIZES, codec, fraction=fraction, rng=np.random.default_rng(1))
    return decode(enc.arrays, codec=codec, sizes=SIZES, k=enc.k, bits=enc.bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_within_one_step(bits: int) -> None:
    x = _update()
    codes, lo, step = quantize(x, bits, np.random.default_rng(0))
    assert codes.dtype == np.uint8 and int(codes.max()) <= (1 << bits) - 1
    err = np.abs(dequantize(codes, lo, step) - x)
    assert step > 0
    assert float(err.max()) <= step * (1 + 1e-5) + 1e-7


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_is_unbiased(bits: int) -> None:
    x = np.linspace(-1, 1, 41).astype(np.float32)
    rng = np.random.default_rng(7)
    draws = 4000
    mean = np.zeros_like(x, dtype=np.float64)
    step = 0.0
    for _ in range(draws):
        codes, lo, step = quantize(x, bits, rng)
        mean += dequantize(codes, lo, step)
    mean /= draws
    # One draw errs by < step: the mean's standard error is <= step / 2 / sqrt(n).
    assert np.max(np.abs(mean - x)) < 5 * step / 2 / np.sqrt(draws)
    # Deterministic rounding to the nearest level would be biased by up to step/2.
    assert step > 0


def test_nibble_packing_round_trip_odd_length() -> None:
    codes = np.array([0, 15, 3, 9, 1], np.uint8)
    packed = pack_nibbles(codes)
    assert packed.size == 3 and packed.dtype == np.uint8
    assert np.array_equal(unpack_nibbles(packed, 5), codes)


@pytest.mark.parametrize(("codec", "ratio"), [("q8", 4), ("q4", 8)])
def test_quantized_codecs_round_trip_per_tensor(codec: str, ratio: int) -> None:
    x = _update()
    enc = encode(x, SIZES, codec, fraction=1.0, rng=np.random.default_rng(1))
    assert set(enc.arrays) == {"codes", "qparams"}
    assert enc.arrays["qparams"].shape == (len(SIZES), 2)
    assert enc.arrays["codes"].nbytes == (
        x.size if codec == "q8" else (x.size + 1) // 2
    )
    out = decode(enc.arrays, codec=codec, sizes=SIZES, k=enc.k, bits=enc.bits)
    start = 0
    for (_lo, step), size in zip(enc.arrays["qparams"], SIZES, strict=True):
        seg = slice(start, start + size)
        assert np.all(np.abs(out[seg] - x[seg]) <= step * (1 + 1e-5) + 1e-7)
        start += size
    assert out[307] == np.float32(0.123)  # a constant tensor is exact
    assert x.nbytes / enc.nbytes() > ratio * 0.95


def test_topk_keeps_exactly_the_largest_entries() -> None:
    x = _update()
    out = _roundtrip(x, "topk", fraction=0.05)
    k = int(np.ceil(0.05 * x.size))
    kept = np.flatnonzero(out)
    assert kept.size == k
    assert np.array_equal(out[kept], x[kept])  # kept entries are exact
    threshold = np.sort(np.abs(x))[-k]
    assert np.all(np.abs(x[kept]) >= threshold)


def test_topk_q8_quantizes_kept_values() -> None:
    x = _update()
    enc = encode(x, SIZES, "topk_q8", fraction=0.05, rng=np.random.default_rng(2))
    assert enc.arrays["indices"].dtype == np.uint32
    assert enc.arrays["codes"].dtype == np.uint8
    out = decode(enc.arrays, codec="topk_q8", sizes=SIZES, k=enc.k, bits=8)
    idx = enc.arrays["indices"]
    step = float(enc.arrays["qparams"][0, 1])
    assert np.all(np.abs(out[idx] - x[idx]) <= step * (1 + 1e-5) + 1e-7)
    assert np.count_nonzero(np.delete(out, idx)) == 0


@pytest.mark.parametrize("codec", ["topk", "topk_q8"])
def test_error_feedback_conserves_the_residual(codec: str) -> None:
    rng = np.random.default_rng(3)
    residual = None
    for r in range(4):
        update = _update(seed=r)
        old = np.zeros_like(update) if residual is None else residual
        enc, residual = encode_with_feedback(
            update, residual, SIZES, codec, fraction=0.02, rng=rng
        )
        sent = decode(enc.arrays, codec=codec, sizes=SIZES, k=enc.k, bits=enc.bits)
        np.testing.assert_allclose(sent + residual, update + old, rtol=0, atol=1e-6)
        if codec == "topk":
            assert np.all(residual[enc.arrays["indices"]] == 0)
    assert np.linalg.norm(residual) > 0


def test_top_k_rejects_bad_k() -> None:
    with pytest.raises(CodecError, match="k=0"):
        top_k(np.ones(3, np.float32), 0)


def _good(codec: str) -> tuple[dict[str, np.ndarray], int, int]:
    enc = encode(_update(), SIZES, codec, fraction=0.05, rng=np.random.default_rng(0))
    return {k: v.copy() for k, v in enc.arrays.items()}, enc.k, enc.bits


Corruption = Callable[[dict[str, np.ndarray], int, int], tuple[int, int]]


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> Corruption:
    def corrupt(a: dict[str, np.ndarray], k: int, bits: int) -> tuple[int, int]:
        value = fn(a[name])
        if value is None:
            del a[name]
        else:
            a[name] = value
        return k, bits

    return corrupt


CORRUPT: list[tuple[str, Corruption, str]] = [
    ("topk", _set("indices", lambda i: i + 5000), "out of range"),
    ("topk", _set("indices", lambda i: i[::-1].copy()), "increasing"),
    ("topk", _set("indices", lambda i: np.repeat(i[:1], i.size)), "increasing"),
    ("topk", _set("values", lambda v: v[:-1]), "values"),
    ("topk", _set("values", lambda v: v.astype(np.float64)), "dtype"),
    ("topk", _set("indices", lambda i: i.astype(np.int64)), "dtype"),
    ("topk", lambda a, k, b: (k + 1, b), "indices, expected"),
    ("topk", lambda a, k, b: (10_000, b), "outside"),
    ("q8", lambda a, k, b: (k, 5), "bit width 5"),
    ("q8", _set("codes", lambda c: c[:-3]), "code bytes"),
    ("q8", _set("qparams", lambda q: q[:2]), "qparams"),
    ("q4", _set("qparams", lambda q: q * np.nan), "finite"),
    ("q4", _set("qparams", lambda q: None), "arrays"),
    ("q4", _set("codes", lambda c: c[:-1]), "code bytes"),
    ("topk_q8", _set("codes", lambda c: c[:-1]), "codes"),
]


@pytest.mark.parametrize(("codec", "corrupt", "match"), CORRUPT)
def test_corrupt_payloads_are_refused(
    codec: str, corrupt: Corruption, match: str
) -> None:
    arrays, k, bits = _good(codec)
    k, bits = corrupt(arrays, k, bits)
    with pytest.raises(CodecError, match=match):
        decode(arrays, codec=codec, sizes=SIZES, k=k, bits=bits)


def test_unknown_codec_and_top_k_limit() -> None:
    arrays, k, _ = _good("topk")
    with pytest.raises(CodecError, match="unknown codec"):
        decode(arrays, codec="zip", sizes=SIZES, k=k, bits=0)
    with pytest.raises(CodecError, match="outside 1..10"):
        decode(arrays, codec="topk", sizes=SIZES, k=k, bits=0, max_k=10)
