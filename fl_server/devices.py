"""Simulated device heterogeneity: profiles, client round times, the round clock.

Pure functions, no Flower: :mod:`fl_server.device_grid` applies them to the messages
of any strategy. Every draw is fixed by the run's seed and the client's partition id
(and, for dropout, the round), so two strategies run with the same seed see the same
devices and the same dropouts.

Model
-----
* compute speed ``s ~ LogNormal(0, speed_sigma)`` (median 1);
* bandwidth ``b = median * LogNormal(0, bandwidth_sigma)`` in bytes per second;
* a round of ``e`` local epochs on ``n`` examples that downloads ``D`` bytes and
  uploads ``U`` takes ``n * e * example_cost_s / s + (D + U) / b`` simulated seconds;
  ``U`` is the reply's real size, so a compressed upload shortens the round (before
  the reply exists, ``U`` is predicted: :class:`Timing` with ``upload_s=None``
  assumes a dense upload, ``D`` bytes);
* the client drops out of round ``r`` with probability ``dropout`` (a fresh draw per
  round): it never replies;
* a round lasts as long as its slowest accepted client, or the whole deadline when a
  dispatched client missed it (the server waited for it until then); dropouts are
  disconnects the server notices at once and do not hold the round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_PROFILE_STREAM = 7919
_DROPOUT_STREAM = 104_729


@dataclass(frozen=True)
class DeviceProfile:
    """One client's simulated device: relative compute speed and bandwidth."""

    speed: float
    bandwidth_bps: float


@dataclass(frozen=True)
class Timing:
    """Simulated seconds of one client's round.

    Attributes
    ----------
    compute_s : float
        Local training.
    comm_s : float
        Moving the dense model down and up (twice the download time): the client's
        link, whatever codec it uploads with. This is what policies see as
        ``ClientState.comm_s``.
    epochs : int
        Local epochs trained.
    upload_s : float or None
        The upload actually sent (the reply's bytes over the bandwidth); ``None``:
        not measured, a dense upload (``comm_s / 2``) is assumed.
    """

    compute_s: float
    comm_s: float
    epochs: int
    upload_s: float | None = None

    @property
    def download_s(self) -> float:
        """Seconds to download the model (half of :attr:`comm_s`)."""
        return self.comm_s / 2

    @property
    def transfer_s(self) -> float:
        """Download plus the real upload (the dense one if not measured)."""
        up = self.download_s if self.upload_s is None else self.upload_s
        return self.download_s + up

    @property
    def total_s(self) -> float:
        """Compute, download and upload: the client's round."""
        return self.compute_s + self.transfer_s

    @property
    def epoch_s(self) -> float:
        """Compute seconds per local epoch."""
        return self.compute_s / max(self.epochs, 1)


def draw_profile(
    seed: int,
    partition_id: int,
    *,
    speed_sigma: float,
    bandwidth_median_bps: float,
    bandwidth_sigma: float,
) -> DeviceProfile:
    """Return client ``partition_id``'s device, fixed by ``seed`` and its id.

    Raises
    ------
    ValueError
        If a sigma is negative, the median bandwidth not positive, or an id negative.
    """
    if speed_sigma < 0 or bandwidth_sigma < 0:
        raise ValueError(
            f"speed_sigma={speed_sigma} and bandwidth_sigma={bandwidth_sigma} "
            "must be >= 0"
        )
    if not bandwidth_median_bps > 0:
        raise ValueError(f"bandwidth median must be > 0, got {bandwidth_median_bps}")
    if seed < 0 or partition_id < 0:
        raise ValueError(f"seed={seed} and partition_id={partition_id} must be >= 0")
    rng = np.random.default_rng([seed, _PROFILE_STREAM, partition_id])
    z_speed, z_bw = rng.standard_normal(2)
    return DeviceProfile(
        speed=float(math.exp(speed_sigma * z_speed)),
        bandwidth_bps=float(bandwidth_median_bps * math.exp(bandwidth_sigma * z_bw)),
    )


def drops_out(seed: int, server_round: int, partition_id: int, p: float) -> bool:
    """Return whether the client is unavailable in ``server_round`` (probability p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if p == 0.0:
        return False
    rng = np.random.default_rng([seed, _DROPOUT_STREAM, server_round, partition_id])
    return bool(rng.random() < p)


def client_timing(
    profile: DeviceProfile,
    *,
    examples: int,
    epochs: int,
    bytes_down: int,
    example_cost_s: float,
    bytes_up: int | None = None,
) -> Timing:
    """Return the simulated compute and communication time of one round.

    ``bytes_down`` is the model sent to the client; ``bytes_up`` its reply's real
    size (``None``: not known yet, a dense upload of ``bytes_down`` is assumed).
    """
    up = 0 if bytes_up is None else bytes_up
    if examples < 0 or epochs < 0 or bytes_down < 0 or up < 0 or example_cost_s < 0:
        raise ValueError(
            f"examples={examples}, epochs={epochs}, bytes_down={bytes_down}, "
            f"bytes_up={bytes_up} and example_cost_s={example_cost_s} must be >= 0"
        )
    bw = profile.bandwidth_bps
    return Timing(
        compute_s=examples * epochs * example_cost_s / profile.speed,
        comm_s=2 * bytes_down / bw,
        epochs=epochs,
        upload_s=None if bytes_up is None else bytes_up / bw,
    )


def epochs_within(deadline_s: float, timing: Timing, max_epochs: int) -> int:
    """Return the most whole epochs (at most ``max_epochs``) that meet the deadline.

    ``timing`` is the client's timing for any number of epochs (its per-epoch compute
    and its download plus upload, :attr:`Timing.transfer_s`, are what count); 0 means
    not even one epoch fits.
    """
    room = deadline_s - timing.transfer_s
    if room < 0:
        return 0
    if timing.epoch_s <= 0:
        return max_epochs
    return max(0, min(max_epochs, math.floor(room / timing.epoch_s + 1e-9)))


def round_duration(
    accepted_s: Iterable[float], late_deadlines_s: Iterable[float] = ()
) -> float:
    """Return a round's simulated length.

    The server waits for each dispatched client until its reply or, for a client
    that misses its deadline, until that deadline: the round lasts the longest of the
    accepted clients' times and the deadlines missed. No client: 0 s.
    """
    return max(max(accepted_s, default=0.0), max(late_deadlines_s, default=0.0))
