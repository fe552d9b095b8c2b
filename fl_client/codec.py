"""Update codecs: stochastic uniform quantization, top-k sparsification, both.

Pure numpy, imported by the client (encoding, error feedback) and the server (decoding)
alike. An update is one flat float32 vector, the concatenation of the model's tensors
(``sizes`` gives each tensor's length, in the model's order). Encoded updates are a few
compact arrays:

=========  ==============================================================
codec      arrays
=========  ==============================================================
``q8``     ``codes`` uint8 (n), ``qparams`` float32 (tensors, 2)
``q4``     ``codes`` uint8 (ceil(n / 2), two 4-bit codes per byte), ``qparams``
``topk``   ``indices`` uint32 (k, strictly increasing), ``values`` float32 (k)
``topk_q8`` ``indices`` uint32 (k), ``codes`` uint8 (k), ``qparams`` float32 (1, 2)
=========  ==============================================================

``qparams`` rows are ``(lo, step)`` per quantized tensor: a value is ``lo + code *
step``. Quantization is stochastic (unbiased: ``E[dequantize(quantize(x))] = x``) with
``|x - dequantize(quantize(x))| <= step`` per element. :func:`decode` checks every
length, dtype, index and parameter before it builds anything, so a corrupt payload
raises :class:`CodecError` with the reason instead of decoding into garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CODECS = ("none", "q8", "q4", "topk", "topk_q8")
BITS = {"q8": 8, "q4": 4, "topk": 0, "topk_q8": 8}
SPARSE = frozenset({"topk", "topk_q8"})
_LAYOUT: dict[str, dict[str, type[np.generic]]] = {
    "q8": {"codes": np.uint8, "qparams": np.float32},
    "q4": {"codes": np.uint8, "qparams": np.float32},
    "topk": {"indices": np.uint32, "values": np.float32},
    "topk_q8": {"indices": np.uint32, "codes": np.uint8, "qparams": np.float32},
}


class CodecError(ValueError):
    """An encoded update that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class Encoded:
    """An encoded update: compact arrays plus the numbers needed to decode them."""

    codec: str
    arrays: dict[str, np.ndarray]
    n: int
    k: int
    bits: int

    def nbytes(self) -> int:
        """Return the bytes of the arrays' data."""
        return int(sum(a.nbytes for a in self.arrays.values()))


# ------------------------------------------------------------------ quantization
def quantize(
    x: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """Stochastically round ``x`` to ``2**bits`` uniform levels over ``[min, max]``.

    Returns ``(codes, lo, step)`` with ``codes`` uint8; ``lo`` and ``step`` are float32
    values. Rounding up happens with probability equal to the fractional position, so
    the dequantized value is unbiased.
    """
    if bits not in (4, 8):
        raise CodecError(f"bit width {bits} unsupported; valid: 4, 8")
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return np.zeros(0, np.uint8), 0.0, 0.0
    levels = (1 << bits) - 1
    lo = np.float32(x.min())
    step = np.float32((float(x.max()) - float(lo)) / levels)
    if step <= 0:
        return np.zeros(x.size, np.uint8), float(lo), 0.0
    t = (x.astype(np.float64) - float(lo)) / float(step)
    floor = np.floor(t)
    up = rng.random(x.size) < (t - floor)
    codes = np.clip(floor + up, 0, levels).astype(np.uint8)
    return codes, float(lo), float(step)


def dequantize(codes: np.ndarray, lo: float, step: float) -> np.ndarray:
    """Return ``lo + codes * step`` as float32."""
    return (float(lo) + codes.astype(np.float64) * float(step)).astype(np.float32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte (first code in the low nibble); pad with 0."""
    if codes.size and int(codes.max()) > 15:
        raise CodecError("a 4-bit code exceeds 15")
    padded = np.zeros(codes.size + codes.size % 2, np.uint8)
    padded[: codes.size] = codes
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Invert :func:`pack_nibbles` for ``n`` codes."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


# ------------------------------------------------------------------ sparsification
def topk_count(n: int, fraction: float) -> int:
    """Return how many entries top-k keeps of ``n`` (at least 1)."""
    if not 0 < fraction <= 1:
        raise CodecError(f"top-k fraction {fraction} outside (0, 1]")
    return max(1, min(n, math.ceil(fraction * n)))


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``k`` largest-magnitude entries: sorted uint32 indices, values."""
    if not 1 <= k <= x.size:
        raise CodecError(f"k={k} outside 1..{x.size}")
    idx = np.argpartition(np.abs(x), x.size - k)[x.size - k :]
    idx = np.sort(idx).astype(np.uint32)
    return idx, x[idx].astype(np.float32)


# ------------------------------------------------------------------ codecs
def encode(
    update: np.ndarray,
    sizes: Sequence[int],
    codec: str,
    *,
    fraction: float,
    rng: np.random.Generator,
) -> Encoded:
    """Encode a flat update whose tensors have lengths ``sizes``.

    Quantizing codecs use one ``(lo, step)`` per tensor; ``topk_q8`` quantizes the
    kept values with one pair. ``fraction`` is top-k's share of entries kept.
    """
    x = np.asarray(update, dtype=np.float32).ravel()
    n = int(x.size)
    if sum(sizes) != n:
        raise CodecError(f"sizes sum to {sum(sizes)}, update has {n} entries")
    if codec in ("q8", "q4"):
        bits = BITS[codec]
        parts, params, start = [], [], 0
        for size in sizes:
            codes, lo, step = quantize(x[start : start + size], bits, rng)
            parts.append(codes)
            params.append((lo, step))
            start += size
        codes = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        packed = pack_nibbles(codes) if bits == 4 else codes
        qparams = np.asarray(params, np.float32).reshape(len(sizes), 2)
        return Encoded(codec, {"codes": packed, "qparams": qparams}, n, n, bits)
    if codec in SPARSE:
        k = topk_count(n, fraction)
        idx, values = top_k(x, k)
        if codec == "topk":
            return Encoded(codec, {"indices": idx, "values": values}, n, k, 0)
        codes, lo, step = quantize(values, 8, rng)
        qparams = np.asarray([[lo, step]], np.float32)
        arrays = {"indices": idx, "codes": codes, "qparams": qparams}
        return Encoded(codec, arrays, n, k, 8)
    raise CodecError(f"unknown codec {codec!r}; valid: {', '.join(CODECS[1:])}")


def decode(
    arrays: Mapping[str, np.ndarray],
    *,
    codec: str,
    sizes: Sequence[int],
    k: int,
    bits: int,
    max_k: int | None = None,
) -> np.ndarray:
    """Return the flat float32 update; raise :class:`CodecError` if anything is off.

    Checks the codec and bit width are known and consistent, the array names and
    dtypes are exactly the codec's, every length matches ``sizes`` and ``k``
    (``k <= max_k`` if given), indices are strictly increasing and below ``n``, and
    quantization parameters are finite with ``step >= 0``.
    """
    if codec not in _LAYOUT:
        raise CodecError(f"unknown codec {codec!r}; valid: {', '.join(CODECS[1:])}")
    if bits != BITS[codec]:
        raise CodecError(
            f"bit width {bits} unknown for {codec} (expected {BITS[codec]})"
        )
    layout = _LAYOUT[codec]
    if set(arrays) != set(layout):
        raise CodecError(f"{codec} arrays {sorted(arrays)}, expected {sorted(layout)}")
    for name, dtype in layout.items():
        a = arrays[name]
        if a.dtype != np.dtype(dtype):
            raise CodecError(f"{codec} array {name!r} has dtype {a.dtype}, not {dtype}")
    n = int(sum(sizes))
    if codec in ("q8", "q4"):
        codes = arrays["codes"].ravel()
        want = n if bits == 8 else (n + 1) // 2
        if codes.size != want or k != n:
            raise CodecError(
                f"{codec}: {codes.size} code bytes and k={k}, expected {want} and {n}"
            )
        qparams = _qparams(arrays["qparams"], len(sizes))
        if bits == 4:
            if n % 2 and codes.size and codes[-1] >> 4:
                raise CodecError("q4: padding nibble is not zero")
            codes = unpack_nibbles(codes, n)
        out = np.empty(n, np.float32)
        start = 0
        for size, (lo, step) in zip(sizes, qparams, strict=True):
            out[start : start + size] = dequantize(
                codes[start : start + size], lo, step
            )
            start += size
        return out
    idx = arrays["indices"].ravel()
    limit = n if max_k is None else min(n, max_k)
    if not 1 <= k <= limit:
        raise CodecError(f"{codec}: k={k} outside 1..{limit}")
    if idx.size != k:
        raise CodecError(f"{codec}: {idx.size} indices, expected k={k}")
    if np.any(np.diff(idx.astype(np.int64)) <= 0):
        raise CodecError(f"{codec}: indices are not strictly increasing")
    if int(idx[-1]) >= n:
        raise CodecError(f"{codec}: index {int(idx[-1])} out of range 0..{n - 1}")
    if codec == "topk":
        values = arrays["values"].ravel()
    else:
        codes = arrays["codes"].ravel()
        if codes.size != k:
            raise CodecError(f"{codec}: {codes.size} codes, expected k={k}")
        ((lo, step),) = _qparams(arrays["qparams"], 1)
        values = dequantize(codes, lo, step)
    if values.size != k:
        raise CodecError(f"{codec}: {values.size} values, expected k={k}")
    if not np.all(np.isfinite(values)):
        raise CodecError(f"{codec}: non-finite values")
    out = np.zeros(n, np.float32)
    out[idx] = values
    return out


def _qparams(qparams: np.ndarray, rows: int) -> np.ndarray:
    if qparams.shape != (rows, 2):
        raise CodecError(f"qparams has shape {qparams.shape}, expected ({rows}, 2)")
    if not np.all(np.isfinite(qparams)) or np.any(qparams[:, 1] < 0):
        raise CodecError("qparams must be finite with step >= 0")
    return qparams


# ------------------------------------------------------------------ error feedback
def encode_with_feedback(
    update: np.ndarray,
    residual: np.ndarray | None,
    sizes: Sequence[int],
    codec: str,
    *,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[Encoded, np.ndarray]:
    """Encode ``update + residual``; return it and the new residual.

    The new residual is what the encoding left out, so ``decoded + new_residual ==
    update + residual`` (exactly on the kept top-k entries, whose residual is 0).
    ``residual=None`` starts from zero (plain top-k).
    """
    x = np.asarray(update, dtype=np.float32).ravel()
    corrected = x if residual is None else x + residual.astype(np.float32)
    enc = encode(corrected, sizes, codec, fraction=fraction, rng=rng)
    sent = decode(enc.arrays, codec=codec, sizes=sizes, k=enc.k, bits=enc.bits)
    return enc, corrected - sent
