"""Client side of upload compression: the update, error-feedback state, the records.

The client uploads the *update* ``new - received`` encoded by :mod:`fl_client.codec`
as compact arrays in the reply's ``ArrayRecord`` and the numbers needed to decode it
in a ``ConfigRecord`` named ``compression`` (``codec``, ``bits``, ``k``, ``names``,
``sizes``). With error feedback (top-k codecs) the residual, what earlier encodings
left out, is kept in ``context.state`` as an ``ArrayRecord`` and added to the next
update. A client told that it should hold a residual (``ef-expected``) but has none
(its node restarted) sends plain top-k this round, logs it and reports
``ef-residual-missing = 1``; it holds a residual again from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .codec import CODECS, SPARSE, encode, encode_with_feedback

log = logging.getLogger("agentfl.client")

RESIDUAL_KEY = "compression.residual"
META_KEY = "compression"


@dataclass(frozen=True)
class Upload:
    """What a train reply carries: arrays, optional codec metadata, extra metrics."""

    arrays: ArrayRecord
    meta: ConfigRecord | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)


def flat(record: ArrayRecord, names: list[str]) -> np.ndarray:
    """Concatenate the named arrays of ``record`` into one float32 vector."""
    return np.concatenate(
        [record[n].numpy().astype(np.float32, copy=False).ravel() for n in names]
    )


def compress_upload(
    new: ArrayRecord,
    received: ArrayRecord,
    codec: str,
    *,
    fraction: float,
    error_feedback: bool,
    ef_expected: bool,
    state: RecordDict,
    rng: np.random.Generator,
) -> Upload:
    """Encode ``new - received`` (over ``new``'s keys) with ``codec``.

    ``codec="none"`` returns ``new`` unchanged (dense weights, as Flower's baselines
    expect). ``state`` is the node's ``context.state``; the residual lives there.

    Raises
    ------
    ValueError
        For an unknown codec or arrays missing from ``received``.
    """
    if codec not in CODECS:
        raise ValueError(f"config 'compression'={codec!r}; valid: {', '.join(CODECS)}")
    if codec == "none":
        return Upload(new)
    names = list(new.keys())
    missing = [n for n in names if n not in received]
    if missing:
        raise ValueError(f"received model lacks arrays {missing}")
    sizes = [int(np.prod(new[n].shape)) for n in names]
    update = flat(new, names) - flat(received, names)
    metrics: dict[str, int | float] = {}
    if codec in SPARSE and error_feedback:
        residual = _residual(state, update.size)
        metrics["ef-residual-missing"] = int(residual is None and ef_expected)
        if residual is None and ef_expected:
            log.warning(
                "error-feedback residual missing (node restarted?): plain top-k "
                "this round, a new residual from now on"
            )
        enc, new_residual = encode_with_feedback(
            update, residual, sizes, codec, fraction=fraction, rng=rng
        )
        state[RESIDUAL_KEY] = ArrayRecord({"residual": Array(new_residual)})
    else:
        enc = encode(update, sizes, codec, fraction=fraction, rng=rng)
    arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in enc.arrays.items()}
    )
    meta = ConfigRecord(
        {"codec": codec, "bits": enc.bits, "k": enc.k, "names": names, "sizes": sizes}
    )
    return Upload(arrays, meta, metrics)


def _residual(state: RecordDict, n: int) -> np.ndarray | None:
    record = state.array_records.get(RESIDUAL_KEY)
    if record is None or "residual" not in record:
        return None
    residual = record["residual"].numpy()
    if residual.shape != (n,) or not np.all(np.isfinite(residual)):
        log.warning("error-feedback residual has the wrong shape or values; dropped")
        return None
    return residual.astype(np.float32, copy=False)
