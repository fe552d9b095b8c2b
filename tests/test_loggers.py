"""Loggers as hub subscribers: progress line with ETA, TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess import InProcessGrid
from support.runs import SHORT

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig
from orchestration.loggers import progress_line
from orchestration.topics import RoundRecord, RoundReport


def test_progress_line_has_the_numbers_and_an_eta_from_this_process() -> None:
    rec = RoundRecord(12, 0.9, 0.3, 10, 9, 1, 0, "llm", 0.5, 1, 1)
    # resumed after round 10: 2 rounds in 4 s here, 18 left -> 36 s
    rep = RoundReport(record=rec, num_rounds=30, first_round=11, elapsed_s=4.0)
    line = progress_line(rep)
    assert "round  12/30" in line and "acc 0.9000" in line and "flagged 1" in line
    assert "source llm" in line and line.endswith("eta 36s")


def test_tensorboard_scalars_are_written_per_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    cfg = RunConfig.from_flat(
        {
            **SHORT,
            "num_rounds": 2,
            "output_dir": str(tmp_path),
            "run_name": "r",
            "hub.tensorboard": True,
        }
    )
    summary = run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)

    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    points = acc.Scalars("round/accuracy")
    assert [p.step for p in points] == [0, 1, 2]
    assert points[-1].value == pytest.approx(summary["final_accuracy"])
    assert {"round/loss", "round/bytes", "round/flagged"} <= set(acc.Tags()["scalars"])
