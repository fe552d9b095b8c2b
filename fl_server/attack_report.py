"""Score the agent's detection against the attackers a run simulated.

The strategy never learns who is malicious; after the run, the server compares the
strategy's per-round history (who replied, who was rejected, flagged malicious or
flagged faulty) with the malicious partitions of ``attack.*``
(``fl_client.attacks.malicious_partitions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def detection_scores(
    history: Sequence[Mapping[str, Any]],
    malicious: Iterable[str],
    start_round: int = 1,
) -> dict[str, Any]:
    """Return reply-level and client-level detection counts, precision and recall.

    Reply level: every reply (client, round) from ``start_round`` on is a positive
    when its client is malicious, and is detected when it was rejected or flagged
    ``malicious``. A ``faulty`` flag (a broken update, dropped from the aggregate
    but not called an attack; :mod:`agent_strategy.detection`) is no detection:
    such replies are counted apart, ``faulty_honest`` (honest replies dropped as
    faulty) and ``faulty_malicious`` (attackers' replies flagged only faulty, also
    counted in ``fn``). Client level: a client is detected when it was ever
    excluded. Precision (recall) is ``None`` when nothing was detected (no positive
    existed).

    Parameters
    ----------
    history : sequence of mappings
        ``AgentStrategy.history``: per round ``round``, ``replied``, ``rejected``,
        ``flagged`` (malicious), ``faulty`` (absent in runs made before it
        existed) and ``excluded`` (lists of client ids).
    malicious : iterable of str
        The attacking client ids (``c<partition-id>``).
    start_round : int
        The first round the attackers attacked.
    """
    bad = set(malicious)
    tp = fp = fn = tn = faulty_honest = faulty_malicious = 0
    ever_excluded: set[str] = set()
    for row in history:
        ever_excluded |= set(row.get("excluded", ()))
        if int(row["round"]) < start_round:
            continue
        caught = set(row.get("flagged", ())) | set(row.get("rejected", ()))
        faulty = set(row.get("faulty", ())) - caught
        for cid in row.get("replied", ()):
            if cid in bad:
                tp += cid in caught
                fn += cid not in caught
                faulty_malicious += cid in faulty
            else:
                fp += cid in caught
                tn += cid not in caught
                faulty_honest += cid in faulty

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    ctp = len(ever_excluded & bad)
    return {
        "replies": {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "faulty_honest": faulty_honest,
            "faulty_malicious": faulty_malicious,
        },
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "clients_excluded": sorted(ever_excluded, key=lambda c: int(c[1:])),
        "client_precision": ratio(ctp, len(ever_excluded)),
        "client_recall": ratio(ctp, len(bad)),
    }
