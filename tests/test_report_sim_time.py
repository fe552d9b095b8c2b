"""The report's simulated-time view: time to accuracy and the sim-time curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import write_run

from experiments.bench_stragglers import run_stats
from experiments.report import build_report, load_run, time_to_accuracy, write_plots


def _add_sim_time(run: Path, times: list[float]) -> None:
    path = run / "results.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for row, t in zip(rows, times, strict=True):
        row["sim_time_s"] = t
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_time_to_accuracy_known_answers() -> None:
    times, accs = [0.0, 10.0, 25.0, 30.0], [0.1, 0.85, 0.91, 0.88]

    assert time_to_accuracy(times, accs, 0.9) == 25.0
    assert time_to_accuracy(times, accs, 0.85) == 10.0
    assert time_to_accuracy(times, accs, 0.95) is None
    with pytest.raises(ValueError, match="3 times but 4"):
        time_to_accuracy(times[:3], accs, 0.9)


def test_sim_time_curve_is_averaged_and_plotted(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", accuracies=[0.1, 0.5, 0.95], seed=0)
    b = write_run(tmp_path, "b", accuracies=[0.1, 0.7, 0.85], seed=1)
    _add_sim_time(a, [0.0, 10.0, 20.0])
    _add_sim_time(b, [0.0, 30.0, 40.0])
    plain = write_run(
        tmp_path, "c", accuracies=[0.1, 0.2, 0.3], strategy="fedavg", seed=0
    )

    stats = build_report([load_run(p) for p in (a, b, plain)])
    paths = write_plots(stats, tmp_path)

    by_strategy = {s.strategy: s for s in stats}
    assert by_strategy["agent"].sim_time_curve == (0.0, 20.0, 30.0)
    assert by_strategy["fedavg"].sim_time_curve == ()
    assert tmp_path / "accuracy_vs_sim_time.png" in paths
    assert (tmp_path / "accuracy_vs_sim_time.png").read_bytes()[:4] == b"\x89PNG"
    stats_a = run_stats(list(load_run(a).rows), 0.9)
    assert stats_a["time_to_target_s"] == 20.0
    assert stats_a["mean_round_sim_s"] == 10.0
    assert run_stats(list(load_run(b).rows), 0.9)["time_to_target_s"] is None
