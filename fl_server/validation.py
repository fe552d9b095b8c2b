"""Check a client's train reply before it can touch the global model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType

from .aggregation import flatten_arrays, unflatten_vector

REQUIRED_METRICS = ("num-examples", "train-loss", "train-duration", "partition-id")


class InvalidReply(ValueError):
    """A reply that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """Names, shapes and dtypes of the global model's arrays.

    ``headers`` are the ``.npy`` headers Flower's :class:`~flwr.app.Array` writes for
    each array (``np.save`` of a C-ordered array of that shape and dtype): a reply's
    array whose serialized bytes start with the same header and hold exactly the
    right number of bytes after it is read in place (``np.frombuffer``) instead of
    through ``np.load``, which parses the header again for every array of every
    reply. Any other array takes Flower's own ``Array.numpy()``. The same headers
    encode the new global model (:meth:`encode`) without ``np.save``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    headers: tuple[bytes, ...] = ()

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """Number of scalars in each array."""
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def size(self) -> int:
        """Number of scalars in the model."""
        return sum(self.counts)

    @classmethod
    def of(cls, arrays: ArrayRecord) -> ModelSpec:
        """Describe an ``ArrayRecord``."""
        nds = {k: v.numpy() for k, v in arrays.items()}
        headers = []
        for name, a in nds.items():
            data = arrays[name].data
            header = data[: len(data) - a.nbytes]
            # Only a C-ordered array's bytes are its buffer as is.
            ok = (
                arrays[name].stype == SType.NUMPY
                and b"'fortran_order': False" in header
            )
            headers.append(header if ok else b"")
        return cls(
            names=tuple(nds),
            shapes=tuple(a.shape for a in nds.values()),
            dtypes=tuple(a.dtype for a in nds.values()),
            headers=tuple(headers),
        )

    def decode(self, index: int, array: Array) -> np.ndarray:
        """Return ``array`` (the reply's array at ``index``) as a NumPy array.

        In place (a read-only view of its bytes) when its header is the expected
        one, else Flower's ``Array.numpy()``; a decoding failure raises
        :class:`InvalidReply`. Shape and dtype are checked by the caller.
        """
        header = self.headers[index] if index < len(self.headers) else b""
        data = array.data
        if header and array.stype == SType.NUMPY and data.startswith(header):
            dtype, count = self.dtypes[index], self.counts[index]
            if len(data) == len(header) + count * dtype.itemsize:
                return np.frombuffer(
                    data, dtype=dtype, count=count, offset=len(header)
                ).reshape(self.shapes[index])
        try:
            return array.numpy()
        except Exception as e:  # noqa: BLE001 - any decoding failure rejects the reply
            raise InvalidReply(
                f"array {self.names[index]!r} cannot be decoded: {e}"
            ) from e

    def encode(self, index: int, values: np.ndarray) -> Array:
        """Return ``values`` (the array at ``index``) as a Flower ``Array``.

        The same ``Array`` as ``Array(values)`` (``np.save``'s bytes), built from
        the known header and the values' bytes when ``values`` has the array's
        shape and dtype and a header is known; else through ``Array(values)``.
        """
        header = self.headers[index] if index < len(self.headers) else b""
        shape, dtype = self.shapes[index], self.dtypes[index]
        if not header or values.shape != shape or values.dtype != dtype:
            return Array(values)
        return Array(
            dtype=str(dtype),
            shape=tuple(int(n) for n in shape),
            stype=SType.NUMPY,
            data=header + values.tobytes(),
        )

    def to_record(self, vector: np.ndarray) -> ArrayRecord:
        """Return a flat model ``vector`` as an ``ArrayRecord`` of this layout.

        Each array is cast to its dtype and encoded by :meth:`encode`.
        """
        if vector.ndim != 1 or vector.size != self.size:
            raise ValueError(
                f"vector has shape {vector.shape}, expected ({self.size},)"
            )
        arrays = unflatten_vector(vector, list(self.shapes), list(self.dtypes))
        return ArrayRecord(
            {
                name: self.encode(i, a)
                for i, (name, a) in enumerate(zip(self.names, arrays, strict=True))
            }
        )


@dataclass(frozen=True)
class ValidReply:
    """A reply that passed every check, with its flattened weights."""

    vector: np.ndarray
    num_examples: int
    train_loss: float
    duration_s: float
    partition_id: int


def validate_train_reply(
    content: RecordDict,
    spec: ModelSpec,
    out: np.ndarray | None = None,
    max_examples: int | None = None,
    check_finite: bool = True,
) -> ValidReply:
    """Return the reply's weights and metrics, or raise :class:`InvalidReply`.

    Checks: exactly one ArrayRecord with the global model's keys, shapes and dtypes,
    all values finite; one MetricRecord with ``num-examples`` (a positive integer, at
    most ``max_examples`` if given), a finite non-negative ``train-loss``, a
    non-negative ``train-duration`` and an integer ``partition-id``.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    spec : ModelSpec
        The global model's layout.
    out : numpy.ndarray, optional
        A float vector of the model's size (a row of the round's update matrix) that
        receives the flattened weights, avoiding a copy per reply; written only when
        every check passes. By default a new float32 vector is returned.
    max_examples : int, optional
        The most ``num-examples`` a client may claim.
    check_finite : bool, default True
        Check every value is finite. A caller that checks the filled ``out`` row
        itself (the strategy does, with the float64 sums of squares it needs for the
        update norms anyway: :func:`finite_rows`) passes False and saves a pass over
        the reply.
    """
    # Flower builds a new dict of each kind of record on every access: once each.
    array_records, metric_records = content.array_records, content.metric_records
    if len(array_records) != 1:
        raise InvalidReply(f"expected 1 ArrayRecord, got {len(array_records)}")
    if len(metric_records) != 1:
        raise InvalidReply(f"expected 1 MetricRecord, got {len(metric_records)}")
    record = next(iter(array_records.values()))
    if tuple(record.keys()) != spec.names:
        missing = set(spec.names) - set(record.keys())
        extra = set(record.keys()) - set(spec.names)
        raise InvalidReply(
            f"array keys differ: missing {sorted(missing)}, extra {sorted(extra)}"
        )
    arrays = []
    for i, (name, shape, dtype) in enumerate(
        zip(spec.names, spec.shapes, spec.dtypes, strict=True)
    ):
        a = spec.decode(i, record[name])
        if a.shape != shape:
            raise InvalidReply(f"array {name!r} has shape {a.shape}, expected {shape}")
        if a.dtype != dtype:
            raise InvalidReply(f"array {name!r} has dtype {a.dtype}, expected {dtype}")
        if check_finite and not np.all(np.isfinite(a)):
            raise InvalidReply(f"array {name!r} has non-finite values")
        arrays.append(a)
    metrics = next(iter(metric_records.values()))
    missing_m = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing_m:
        raise InvalidReply(f"metrics lack {missing_m}")
    n, loss, dur, pid = (metrics[k] for k in REQUIRED_METRICS)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidReply(f"num-examples must be a positive integer, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise InvalidReply(
            f"num-examples {n} is absurd: more than {max_examples} (twice the "
            "training-set size the client reported at the roll call)"
        )
    if not isinstance(loss, int | float) or not math.isfinite(loss) or loss < 0:
        raise InvalidReply(f"train-loss must be finite and >= 0, got {loss!r}")
    if not isinstance(dur, int | float) or not math.isfinite(dur) or dur < 0:
        raise InvalidReply(f"train-duration must be >= 0, got {dur!r}")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise InvalidReply(f"partition-id must be an integer, got {pid!r}")
    if out is None:
        vector = flatten_arrays(arrays)
    else:
        if out.ndim != 1 or out.size != spec.size:
            raise ValueError(f"out has shape {out.shape}, expected ({spec.size},)")
        np.concatenate([a.ravel() for a in arrays], out=out, casting="same_kind")
        vector = out
    return ValidReply(vector, n, float(loss), float(dur), pid)


def finite_rows(sq_norms: np.ndarray) -> np.ndarray:
    """Return which rows of a float32 matrix hold only finite values.

    ``sq_norms`` are the rows' sums of squares in float64
    (:func:`fl_server.aggregation.l2_norms` squared, which sums a row again in
    float64 when its float32 sum overflows): a NaN or an infinity in a row makes its
    sum NaN or inf, and finite float32 values never overflow a float64 sum (at most
    ``3.4e38 ** 2 * size``), so the test is exact.
    """
    return np.isfinite(np.asarray(sq_norms, dtype=np.float64))


def non_finite_array(vector: np.ndarray, spec: ModelSpec) -> str:
    """Return the name of the first array of ``vector`` that holds a non-finite value.

    For the rejection message of a row :func:`finite_rows` refused; ``""`` if none.
    """
    start = 0
    for name, count in zip(spec.names, spec.counts, strict=True):
        stop = start + count
        if not np.all(np.isfinite(vector[start:stop])):
            return name
        start = stop
    return ""
