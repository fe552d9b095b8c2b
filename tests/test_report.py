from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from experiments.report import (
    ReportError,
    build_report,
    differing_settings,
    find_run_dirs,
    group_key,
    load_run,
    main,
    render_markdown,
)
from orchestration.config import RunConfig

BYTES_PER_ROUND = 1000


def write_run(
    root: Path,
    name: str,
    *,
    accuracies: list[float],
    seed: int = 0,
    strategy: str = "agent",
    walls: list[float] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A run dir as server_app writes it; ``accuracies[0]`` is round 0."""
    rounds = len(accuracies) - 1
    cfg = RunConfig.from_flat(
        {
            "seed": seed,
            "num_rounds": rounds,
            "strategy.name": strategy,
            "output_dir": str(root),
            "run_name": name,
            **(overrides or {}),
        }
    )
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    walls = walls or [1.0] * rounds
    rows = [
        {
            "round": r,
            "accuracy": acc,
            "loss": 1.0,
            "selected": 10 if r else 0,
            "accepted": 10 if r else 0,
            "flagged": 0,
            "failures": 0,
            "source": "deterministic" if r else "init",
            "wall_s": walls[r - 1] if r else 0.0,
            "bytes_up": BYTES_PER_ROUND if r else 0,
            "bytes_down": BYTES_PER_ROUND if r else 0,
        }
        for r, acc in enumerate(accuracies)
    ]
    (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    summary = {
        "strategy": strategy,
        "seed": seed,
        "rounds": rounds,
        "final_accuracy": accuracies[-1],
        "bytes_up": BYTES_PER_ROUND * rounds,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two strategies x three seeds, nested like a Hydra multirun."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    finals = {"agent": [0.8, 0.9, 1.0], "fedavg": [0.5, 0.6, 0.4]}
    job = 0
    for strategy, accs in finals.items():
        for seed, final in enumerate(accs):
            write_run(
                root,
                str(job),
                accuracies=[0.1, 0.2 * (seed + 1), final],
                seed=seed,
                strategy=strategy,
                walls=[1.0 + seed, 3.0],
            )
            job += 1
    return tmp_path / "multirun"


def test_groups_by_config_without_seed_and_aggregates_exactly(sweep: Path) -> None:
    runs = [load_run(p) for p in find_run_dirs([sweep])]

    stats = {s.strategy: s for s in build_report(runs)}

    assert len(runs) == 6
    assert set(stats) == {"agent", "fedavg"}
    agent, fedavg = stats["agent"], stats["fedavg"]
    assert agent.seeds == (0, 1, 2)
    assert agent.final_accuracy_mean == pytest.approx(0.9)
    assert agent.final_accuracy_std == pytest.approx(0.1)
    assert fedavg.final_accuracy_mean == pytest.approx(0.5)
    assert fedavg.final_accuracy_std == pytest.approx(statistics.stdev([0.5, 0.6, 0.4]))
    # Pooled walls: 1, 3, 2, 3, 3, 3 -> median 3.
    assert agent.median_round_s == pytest.approx(3.0)
    assert agent.num_rounds == 2
    assert agent.rounds == (0, 1, 2)
    assert agent.accuracy_curve == pytest.approx((0.1, 0.4, 0.9))
    assert agent.cumulative_bytes_up == pytest.approx((0, 1000, 2000))
    assert agent.bytes_up_mean == pytest.approx(2000)
    assert agent.settings == {}


def test_single_seed_has_no_std_and_differing_settings_are_shown(
    tmp_path: Path,
) -> None:
    write_run(tmp_path, "a", accuracies=[0.1, 0.7], overrides={"dataset.alpha": 0.1})
    write_run(tmp_path, "b", accuracies=[0.1, 0.9], overrides={"dataset.alpha": 1.0})

    stats = build_report([load_run(p) for p in find_run_dirs([tmp_path])])
    table = render_markdown(stats)

    assert [s.settings for s in stats] == [
        {"dataset.alpha": 0.1},
        {"dataset.alpha": 1.0},
    ]
    assert all(math.isnan(s.final_accuracy_std) for s in stats)
    assert "| agent | mnist5k | dataset.alpha=0.1 | 1 | 0.7000 ± - | 1 |" in table


def test_group_key_ignores_seed_output_dir_and_run_name() -> None:
    a = {"seed": 0, "output_dir": "x", "run_name": "a", "num_rounds": 3}
    b = {"seed": 7, "output_dir": "y", "run_name": "b", "num_rounds": 3}

    assert group_key(a) == group_key(b)
    assert differing_settings([a, {**b, "num_rounds": 4}]) == ["num_rounds"]


def test_cli_writes_table_json_and_plots(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"

    status = main([str(sweep), "--out", str(out)])

    assert status == 0
    table = (out / "report.md").read_text()
    assert "| agent | mnist5k | - | 3 | 0.9000 ± 0.1000 | 2 | 3.000 |" in table
    assert len(json.loads((out / "report.json").read_text())) == 2
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("missing", ["results.jsonl", "summary.json", "config.json"])
def test_incomplete_run_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    write_run(tmp_path, "ok", accuracies=[0.1, 0.5])
    broken = write_run(tmp_path, "broken", accuracies=[0.1, 0.5])
    (broken / missing).unlink()

    status = main([str(tmp_path), "--out", str(tmp_path / "out")])

    assert status == 2
    err = capsys.readouterr().err
    assert "incomplete run" in err and str(broken) in err and missing in err
    assert not (tmp_path / "out").exists()


def test_malformed_results_line_is_named(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", accuracies=[0.1, 0.5])
    with (run / "results.jsonl").open("a") as fh:
        fh.write("{not json\n")

    with pytest.raises(ReportError, match=r"results.jsonl:3"):
        load_run(run)


def test_run_with_fewer_rounds_than_configured_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", accuracies=[0.1, 0.5, 0.6])
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")

    with pytest.raises(ReportError, match=r"ends at round 1.*num_rounds=2"):
        load_run(run)


@pytest.mark.parametrize("argv", [[], ["EMPTY"]])
def test_empty_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]

    status = main([*args, "--out", str(tmp_path / "out")])

    assert status == 2
    err = capsys.readouterr().err
    assert "no run" in err


def test_strict_refuses_mixed_num_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "short", accuracies=[0.1, 0.5])
    write_run(tmp_path, "long", accuracies=[0.1, 0.5, 0.6])

    lenient = main([str(tmp_path), "--out", str(tmp_path / "out")])
    strict = main([str(tmp_path), "--out", str(tmp_path / "out2"), "--strict"])

    assert lenient == 0
    assert "differ in num_rounds [1, 2]" in (tmp_path / "out" / "report.md").read_text()
    assert strict == 2
    assert "different num_rounds [1, 2]" in capsys.readouterr().err


def test_hydra_multirun_layout_is_read_and_grouped(tmp_path: Path) -> None:
    # As `python -m experiments.run -m ... hydra.sweep.dir=DIR` leaves it: DIR holds
    # multirun.yaml and one numbered job dir per run, each with .hydra/ and run.log.
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for strategy in ("agent", "fedavg"):
        for seed in (0, 1, 2):
            run = write_run(
                sweep_dir,
                str(job),
                accuracies=[0.1, 0.5 + 0.1 * seed],
                seed=seed,
                strategy=strategy,
            )
            (run / ".hydra").mkdir()
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                (run / ".hydra" / name).write_text(f"- seed={seed}\n")
            (run / "run.log").write_text("")
            job += 1
    out = tmp_path / "out"

    status = main([str(sweep_dir), "--out", str(out)])

    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert [(g["strategy"], g["seeds"]) for g in report] == [
        ("agent", [0, 1, 2]),
        ("fedavg", [0, 1, 2]),
    ]
    assert [g["final_accuracy_mean"] for g in report] == pytest.approx([0.6, 0.6])


def _decisions(run: Path, latencies: list[float | None]) -> None:
    lines = []
    for i, lat in enumerate(latencies):
        entry: dict[str, Any] = {"round": i // 2 + 1, "phase": "train"}
        if lat is not None:
            entry["llm"] = {"latency_s": lat, "attempts": 1}
        lines.append(json.dumps(entry) + "\n")
    (run / "decisions.jsonl").write_text("".join(lines))


def test_llm_latencies_are_pooled_per_group_and_plotted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # Two seeds of one group: 1..5 s and 6..10 s, plus a decision without a call.
    _decisions(write_run(runs, "a", accuracies=[0.1, 0.5]), [1, 2, 3, 4, 5, None])
    _decisions(write_run(runs, "b", accuracies=[0.1, 0.6], seed=1), [6, 7, 8, 9, 10])
    write_run(runs, "c", accuracies=[0.1, 0.4], strategy="fedavg")
    out = tmp_path / "report"

    assert main([str(runs), "--out", str(out)]) == 0

    stats = {s["strategy"]: s for s in json.loads((out / "report.json").read_text())}
    assert stats["agent"]["llm_calls"] == 10
    assert stats["agent"]["llm_latency_p50_s"] == pytest.approx(5.5)
    assert stats["fedavg"]["llm_calls"] == 0
    assert stats["fedavg"]["llm_latency_p50_s"] is None
    table = (out / "report.md").read_text()
    assert "| 10 | 5.50 / 9.55 |" in table
    assert (out / "llm_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_a_malformed_llm_latency_is_named(tmp_path: Path) -> None:
    run = write_run(tmp_path, "a", accuracies=[0.1, 0.5])
    _decisions(run, [1.0])
    with (run / "decisions.jsonl").open("a") as fh:
        fh.write(json.dumps({"round": 2, "llm": {"latency_s": "slow"}}) + "\n")

    with pytest.raises(ReportError, match=r"decisions.jsonl:2: llm.latency_s"):
        load_run(run)
