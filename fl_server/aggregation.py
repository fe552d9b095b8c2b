"""Aggregation math as pure functions on stacked, flattened updates.

An update matrix ``U`` has one row per client and one column per model coordinate
(the client's new weights minus the global weights, flattened). Nothing here knows
about Flower.
"""

from __future__ import annotations

import functools

import numpy as np


def flatten_arrays(
    arrays: list[np.ndarray], dtype: type[np.floating] = np.float32
) -> np.ndarray:
    """Concatenate arrays into one vector of ``dtype`` (float32: the models' own)."""
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])


def unflatten_vector(
    vector: np.ndarray, shapes: list[tuple[int, ...]], dtypes: list[np.dtype]
) -> list[np.ndarray]:
    """Split ``vector`` back into arrays of the given shapes and dtypes.

    An array already of its dtype is a view of ``vector`` (no copy): callers that
    keep or change the arrays while ``vector`` changes must copy them.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    if sum(sizes) != vector.size:
        raise ValueError(f"vector has {vector.size} values, shapes need {sum(sizes)}")
    out, start = [], 0
    for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
        out.append(
            vector[start : start + size].reshape(shape).astype(dtype, copy=False)
        )
        start += size
    return out


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return ``sum_i w_i U_i / sum_i w_i``.

    Raises
    ------
    ValueError
        If shapes disagree or the weights are negative, non-finite or sum to zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if updates.ndim != 2 or w.shape != (updates.shape[0],):
        raise ValueError(f"{updates.shape[0]} updates but weights of shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative, with a positive sum")
    # Weights in the updates' dtype: a float64 vector would upcast (copy) the matrix.
    # einsum, not ``w @ U``: a matrix-vector product goes to multi-threaded BLAS,
    # which on a machine whose cores are busy training (a simulation) waits for
    # its threads: 18-26 ms instead of 0.2 ms for 10 x 106k here (einsum: 0.2 ms).
    return np.asarray(
        np.einsum("i,ij->j", (w / w.sum()).astype(updates.dtype), updates)
    )


#: Up to this many rows, :func:`sort_columns` and :func:`coordinate_median` use a
#: sorting network of vectorised ``minimum``/``maximum`` compare-exchanges on whole
#: rows (Batcher's odd-even merge sort: 32 compare-exchanges for 10 rows, 63 for 16);
#: above it, ``np.sort``. Measured on 106k float32 columns (odd-even transposition
#: network, n (n - 1) / 2 exchanges): 10 rows 2.1 vs 5.7 ms, 16 rows 5.6 vs 6.4 ms.
NETWORK_MAX_ROWS = 16


@functools.lru_cache(maxsize=64)
def sorting_network(
    n: int, outputs: tuple[int, ...] | None = None
) -> tuple[tuple[int, int], ...]:
    """Return the compare-exchanges ``(i, j)``, ``i < j``, that sort ``n`` wires.

    Batcher's odd-even merge sort for the next power of two, with the exchanges that
    touch a wire ``>= n`` dropped (those wires act as ``+inf`` padding, which such an
    exchange never moves below wire ``n - 1``). With ``outputs``, only the exchanges
    that can change one of those output wires are kept (a backward pass from the
    outputs), e.g. the middle wire(s) for a median: 29 instead of 32 for 10 rows.

    Parameters
    ----------
    n : int
        Number of wires (rows), ``>= 0``.
    outputs : tuple of int, optional
        The sorted positions the caller needs; all of them by default.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = 1
    while size < n:
        size *= 2
    comps: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    kept = [(a, b) for a, b in comps if b < n]
    if outputs is None:
        return tuple(kept)
    needed = set(outputs)
    pruned = []
    for a, b in reversed(kept):
        if a in needed or b in needed:
            pruned.append((a, b))
            needed |= {a, b}
    return tuple(reversed(pruned))


def _run_network(
    updates: np.ndarray, network: tuple[tuple[int, int], ...]
) -> list[np.ndarray]:
    """Apply ``network`` to copies of the rows; return the rows, sorted where needed."""
    rows = [np.array(r, copy=True) for r in updates]
    if not rows:
        return rows
    spare = np.empty_like(rows[0])
    for i, j in network:
        np.minimum(rows[i], rows[j], out=spare)
        np.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows


def sort_columns(updates: np.ndarray) -> np.ndarray:
    """Return ``np.sort(updates, axis=0)``: every column sorted, rows ascending.

    For the few rows of a round (clients) and many columns (parameters), sorting
    the short strided columns with ``np.sort`` is slow; a sorting network
    (:func:`sorting_network`) that compares whole rows with ``np.minimum`` /
    ``np.maximum`` gives the same values several times faster. Inputs must not
    contain NaN (validated replies never do), where the network and ``np.sort``
    would order differently.
    """
    n = updates.shape[0]
    if n > NETWORK_MAX_ROWS or updates.ndim != 2 or n == 0:
        return np.sort(updates, axis=0)
    return np.stack(_run_network(updates, sorting_network(n)))


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Return the coordinate-wise median of the rows.

    Same values as ``np.median(updates, axis=0)`` (for NaN-free input): a sorting
    network pruned to the middle row(s) for up to :data:`NETWORK_MAX_ROWS` rows,
    else ``np.sort``.
    """
    n = updates.shape[0]
    if n == 0:
        raise ValueError("median of zero updates")
    mid = n // 2
    middle = (mid,) if n % 2 else (mid - 1, mid)
    if n <= NETWORK_MAX_ROWS and updates.ndim == 2:
        rows = _run_network(updates, sorting_network(n, middle))
        ordered = [rows[i] for i in middle]
    else:
        full = np.sort(updates, axis=0)
        ordered = [full[i] for i in middle]
    if n % 2:
        return np.asarray(ordered[0])
    return np.asarray((ordered[0] + ordered[1]) / 2.0)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    """Return the coordinate-wise mean after dropping the ``beta`` share at each end."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    n = updates.shape[0]
    k = int(np.floor(beta * n))
    ordered = sort_columns(updates)
    return np.asarray(ordered[k : n - k].mean(axis=0))


def l2_norms(updates: np.ndarray) -> np.ndarray:
    """Return the L2 norm of each row.

    Never inf for a row of finite float32 values: a float32 matrix's sums of
    squares are taken in float32 (one fast pass), and only the rows whose sum came
    out non-finite (a NaN or inf in the row, or a sum beyond the float32 range) are
    summed again in float64. The result is float64.
    """
    u = np.asarray(updates)
    if u.ndim != 2:
        return np.asarray(np.linalg.norm(u, axis=-1))
    if u.dtype != np.float32:
        return np.sqrt(np.einsum("ij,ij->i", u, u, dtype=np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", u, u).astype(np.float64)
    bad = ~np.isfinite(sq)
    if bad.any():
        rows = np.flatnonzero(bad)
        sq[rows] = np.einsum("ij,ij->i", u[rows], u[rows], dtype=np.float64)
    return np.sqrt(sq)


def cosine_to(
    updates: np.ndarray, centre: np.ndarray, norms: np.ndarray | None = None
) -> np.ndarray:
    """Return each row's cosine similarity to ``centre`` (0 where a norm is 0).

    ``norms`` are the rows' L2 norms if the caller has them (one pass less).
    """
    row_norms = l2_norms(updates) if norms is None else norms
    c = np.asarray(centre)
    denom = row_norms * float(np.sqrt(np.einsum("i,i->", c, c, dtype=np.float64)))
    # Not BLAS (see weighted_mean); float64 sums so that huge updates give a
    # finite cosine, not inf / inf.
    dots = np.einsum("ij,j->i", updates, centre, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)
