"""The per-device settings a SuperNode passes to the ClientApp (``--node-config``).

``flower-supernode --node-config "partition-id=0 num-partitions=3 threads=4
data-path=/data/local"`` gives every message's ``context.node_config`` these keys.
``partition-id`` / ``num-partitions`` are read in :mod:`fl_client.client_app`; the
optional keys here are read by pure functions that raise a ``ValueError`` naming the key
and the allowed values.
"""

from __future__ import annotations

from collections.abc import Mapping

THREADS_KEY = "threads"
DATA_PATH_KEY = "data-path"


def threads(node_config: Mapping[str, object], default: int) -> int:
    """Return the node's torch thread count: ``threads`` if set, else ``default``.

    Raises
    ------
    ValueError
        If ``threads`` is not an integer of at least 1.
    """
    value = node_config.get(THREADS_KEY, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"node config {THREADS_KEY}={value!r} must be an integer >= 1")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < 1:
        raise ValueError(f"node config {THREADS_KEY}={value!r} must be an integer >= 1")
    return int(number)


def data_path(node_config: Mapping[str, object]) -> str | None:
    """Return the node's ``data-path`` (device-local data), or None if not set.

    Raises
    ------
    ValueError
        If ``data-path`` is set but empty or not a string.
    """
    value = node_config.get(DATA_PATH_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"node config {DATA_PATH_KEY}={value!r} must be a non-empty path "
            "(a folder of class sub-folders or a .csv file)"
        )
    return value.strip()
