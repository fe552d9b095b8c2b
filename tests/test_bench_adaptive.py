"""Helpers of the adaptive-compression benchmark, on a hand-written run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.bench_adaptive_compression import codec_counts, round_sim_times


def test_round_sim_times_and_codec_counts(tmp_path: Path) -> None:
    clock = [0.0, 2.5, 6.0, 7.25]  # cumulative sim_time_s after rounds 0..3
    rows = [{"round": r, "sim_time_s": t} for r, t in enumerate(clock)]
    (tmp_path / "results.jsonl").write_text("\n".join(map(json.dumps, rows)))
    train = {
        "phase": "train",
        "decision": {
            "allocations": {"c0": {"compression": "q8"}, "c1": {"compression": "none"}}
        },
    }
    aggregate = {"phase": "aggregate", "decision": {"allocations": {}}}
    (tmp_path / "decisions.jsonl").write_text(
        "\n".join(json.dumps(d) for d in (train, aggregate, train))
    )

    assert round_sim_times(tmp_path) == pytest.approx([2.5, 3.5, 1.25])
    assert codec_counts(tmp_path) == {"q8": 2, "none": 2}
