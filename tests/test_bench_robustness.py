"""The robustness benchmark's bookkeeping: skipping, failed runs and the report."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from experiments.bench_robustness import (
    _finished,
    _first_pass,
    _next_utc,
    _without_stop_after,
    plan,
    report,
    run_name,
)


def _run(
    runs: Path,
    name: str,
    attack: str,
    fraction: float,
    strategy: str,
    accs: list[float],
    summary: dict[str, object] | None = None,
    failed: str | None = None,
    decisions: list[dict[str, object]] | None = None,
) -> None:
    d = runs / name
    d.mkdir(parents=True)
    cfg = {
        "attack": {"kind": attack, "fraction": fraction},
        "strategy": {"name": strategy},
        "seed": 0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    rows = [{"round": i, "accuracy": a} for i, a in enumerate(accs)]
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if failed is not None:
        (d / "failed.json").write_text(json.dumps({"error": failed}))
    if decisions is not None:
        (d / "decisions.jsonl").write_text(
            "\n".join(json.dumps(x) for x in decisions) + "\n"
        )


def _det(tp: int, fp: int, fn: int, **faulty: int) -> dict[str, object]:
    return {"detection": {"replies": {"tp": tp, "fp": fp, "fn": fn, "tn": 0, **faulty}}}


def test_report_scores_cells_failed_runs_and_clean_flags(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(
        runs,
        "clean-fedavg-s0",
        "none",
        0.0,
        "fedavg",
        [0.1, 0.9],
        {"final_accuracy": 0.9, "wall_s": 1.0},
    )
    agg: dict[str, object] = {
        "phase": "aggregate",
        "decision": {
            "weights": {"c0": 1.0, "c1": 1.0},
            "flags": [
                {"id": "c2", "kind": "malicious"},
                {"id": "c1", "kind": "straggler"},
                {"id": "c3", "kind": "faulty"},
            ],
        },
    }
    _run(
        runs,
        "clean-agent-s0",
        "none",
        0.0,
        "agent",
        [0.1, 0.92],
        {"final_accuracy": 0.92, "wall_s": 1.0},
        decisions=[agg, {"phase": "train"}],
    )
    _run(
        runs,
        "noise-f20-agent-s0",
        "noise",
        0.2,
        "agent",
        [0.1, 0.89],
        {
            "final_accuracy": 0.89,
            "wall_s": 2.0,
            "attack": _det(9, 1, 3, faulty_honest=4, faulty_malicious=2),
            "loss_check": {"examples": 256, "seconds": 0.5, "seconds_per_round": 0.25},
        },
    )
    for s, acc in [("fedavg", 0.1), ("fedtrimmedavg", 0.85), ("multikrum", 0.88)]:
        _run(
            runs,
            f"noise-f20-{s}-s0",
            "noise",
            0.2,
            s,
            [0.1, acc],
            {"final_accuracy": acc, "wall_s": 1.0},
        )
    # raised after round 2: scored at its last accuracy, with the reason
    _run(
        runs,
        "noise-f20-fedmedian-s0",
        "noise",
        0.2,
        "fedmedian",
        [0.1, 0.5, 0.3],
        failed="ValidationError: cosine_to_median nan",
    )
    _run(runs, "noise-f40-agent-s0", "noise", 0.4, "agent", [0.1, 0.4])  # unfinished

    out = tmp_path / "res" / "robustness.md"
    out.parent.mkdir()
    out.write_text("old table\n\n## Notes\n\nnone\n")  # hand-written notes: kept
    data = report(runs, out, "cmd")

    (cell,) = data["cells"]
    assert cell["accuracy"]["fedmedian"] == 0.3
    assert cell["agent_minus_best_flower"] == pytest.approx(0.89 - 0.88)
    assert cell["agent_minus_clean_fedavg"] == pytest.approx(0.89 - 0.9)
    assert cell["detection"]["precision"] == 0.9 and cell["detection"]["recall"] == 0.75
    text = out.read_text()
    assert cell["detection"]["faulty_honest"] == 4
    assert cell["detection"]["faulty_malicious"] == 2
    assert (
        "agent 92.0 (1 of 4 honest replies flagged malicious, 1 dropped as faulty)"
        in text
    )
    assert "(at least 70% of the server's validation examples in one class)" in text
    assert "`noise-f20-fedmedian-s0` raised after round 2 (ValidationError" in text
    assert (
        "| noise | 20% | 89.0 | 10.0 | 85.0 | 88.0 | 30.0 | 1.0 | -1.0 | 0.900 | 0.750 "
        "| 4 | 2 | 1 |" in text
    )
    assert (
        "256 validation examples, 1 agent runs): median 0.25 s per round, 25% of"
        in text
    )
    assert "before the server loss check existed (their detection has no loss " in text
    assert "check): `clean-agent-s0`." in text
    assert text.endswith("## Notes\n\nnone\n") and "old table" not in text
    assert (out.parent / "robustness.json").exists()
    assert (out.parent / "robustness_accuracy_f20.png").exists()
    assert (out.parent / "robustness_detection.png").exists()
    # a second report (the held-out seeds) writes its own plots, not over these
    before = (out.parent / "robustness_accuracy_f20.png").read_bytes()
    report(runs, out.parent / "robustness_heldout.md", "cmd")
    assert (out.parent / "robustness_heldout_accuracy_f20.png").exists()
    assert (out.parent / "robustness_heldout_detection.png").exists()
    assert (out.parent / "robustness_accuracy_f20.png").read_bytes() == before
    assert _finished(runs / "noise-f20-fedmedian-s0")
    assert not _finished(runs / "noise-f40-agent-s0")


def test_a_restarted_runs_second_pass_is_left_out() -> None:
    rows = [{"round": r, "accuracy": a} for r, a in [(0, 0.1), (1, 0.5), (2, 0.6)]]
    again = [{"round": 1, "accuracy": 0.1}, {"round": 2, "accuracy": 0.1}]

    assert _first_pass(rows + again) == rows
    assert _first_pass(rows) == rows and _first_pass([]) == []


def test_plan_orders_fractions_first_and_names_runs() -> None:
    cells = plan([0], [0.2, 0.4], ["noise", "stale"], ["agent", "fedavg"])

    assert cells[0] == ("none", 0.0, "fedavg", 0)
    assert [c[1] for c in cells[1:9]] == [0.2] * 4 + [0.4] * 4
    assert cells[-1] == ("none", 0.0, "agent", 0)
    assert run_name("noise", 0.4, "agent", 2) == "noise-f40-agent-s2"
    assert run_name("none", 0.0, "fedavg", 1) == "clean-fedavg-s1"


def test_stop_after_is_the_next_such_utc_time() -> None:
    now = dt.datetime(2026, 11, 25, 22, 30, tzinfo=dt.UTC).timestamp()

    assert _next_utc("00:10", now) - now == pytest.approx(100 * 60)
    assert _next_utc("23:00", now) - now == pytest.approx(30 * 60)
    assert _without_stop_after(["--seeds", "0", "--stop-after", "00:10", "-x"]) == [
        "--seeds",
        "0",
        "-x",
    ]
