"""Upload codecs a policy may allocate, their sizes, and the bandwidth rule.

Pure functions of an :class:`~agent_strategy.types.Observation`, shared by the
deterministic policy (which gives each selected client its codec), the LLM policy
(whose unnamed codecs follow the same rule) and the guard (which clamps every codec
to :func:`allowed_codecs` and gives the clients it adds the rule's codec).
"""

from __future__ import annotations

import numpy as np

from .types import Compression, Observation


def allowed_codecs(obs: Observation) -> tuple[Compression, ...]:
    """Return the upload codecs a policy may allocate: the default, then the others.

    The run's default codec (``obs.default_compression``) is always allowed;
    ``limits.codecs`` adds the others (``compression.adaptive``).
    """
    extra = tuple(c for c in obs.limits.codecs if c != obs.default_compression)
    return (obs.default_compression, *dict.fromkeys(extra))


def upload_ratio(codec: Compression, topk_fraction: float = 0.01) -> float:
    """Return the nominal upload size of ``codec`` relative to float32.

    ``q8`` 1/4, ``q4`` 1/8 (scales per tensor neglected); top-k sends a uint32 index
    and a float32 value per kept entry (``2 * fraction``), ``topk_q8`` an index and
    an 8-bit code (``1.25 * fraction``).
    """
    return {
        "none": 1.0,
        "q8": 0.25,
        "q4": 0.125,
        "topk": 2.0 * topk_fraction,
        "topk_q8": 1.25 * topk_fraction,
    }[codec]


def bandwidth_codecs(obs: Observation) -> dict[str, Compression]:
    """Return an upload codec per client with measured communication time.

    The allowed codecs (:func:`allowed_codecs`: the run's default and
    ``limits.codecs``) are ranked by :func:`upload_ratio`, top-k at the
    observation's ``topk_fraction``. A client whose
    ``comm_s`` is ``s`` times the median ``comm_s`` of the measured clients (its
    bandwidth ``1 / s`` times the median's; the simulated devices move the dense
    model down and up, so ``comm_s`` is proportional to ``1 / bandwidth``) gets the
    weakest codec whose upload takes at most the median client's dense upload,
    ``s * ratio <= 1``, or the strongest if none does: clients at or above the
    median bandwidth upload uncompressed (or the weakest allowed codec), slower ones
    8-bit, 4-bit, then top-k as their bandwidth falls. Clients never measured get
    no entry (they keep the default). Empty when only the default is allowed or no
    client was measured.
    """
    topk_fraction = obs.topk_fraction
    ladder = sorted(
        allowed_codecs(obs),
        key=lambda c: -upload_ratio(c, topk_fraction),
    )
    comm = {
        c.id: c.comm_s for c in obs.clients if c.comm_s is not None and c.comm_s > 0
    }
    if len(ladder) < 2 or not comm:
        return {}
    median = float(np.median(list(comm.values())))
    out: dict[str, Compression] = {}
    for cid, t in comm.items():
        slowdown = t / median
        out[cid] = next(
            (
                c
                for c in ladder
                if slowdown * upload_ratio(c, topk_fraction) <= 1.0 + 1e-9
            ),
            ladder[-1],
        )
    return out
