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


def test_dense_replay_reproduces_a_real_run(tmp_path: Path) -> None:
    """A short in-process run with bandwidth-bound devices and adaptive codecs: the
    replay must reproduce its bytes and clock (it raises otherwise), and float32
    uploads would have made its rounds longer once codecs are allocated."""
    from inprocess import InProcessGrid
    from support.client_runs import tiny_config

    from experiments.bench_adaptive_compression import dense_replay
    from fl_client.client_app import make_client_app
    from fl_server.server_app import run_server

    cfg = tiny_config(
        tmp_path,
        "adaptive",
        **{
            "compression.adaptive": True,
            "devices.enabled": True,
            "devices.speed_sigma": 0.0,
            "devices.bandwidth_sigma": 1.5,
            "devices.bandwidth_median_mbps": 0.08,
        },
    )
    run_server(InProcessGrid(make_client_app(cfg), 4), cfg)

    replay = dense_replay(cfg, tmp_path / "adaptive")

    assert replay is not None and len(replay) == 3
    assert replay[0][0] == pytest.approx(replay[0][1])  # round 1: all float32
    assert all(dense >= ran - 1e-9 for ran, dense in replay)
    assert sum(d for _, d in replay[1:]) > 1.1 * sum(r for r, _ in replay[1:])
    assert codec_counts(tmp_path / "adaptive")["none"] < 12
