"""experiments.replay_detection: the detectors replayed on a run's logged features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inprocess import InProcessGrid

from experiments.replay_detection import (
    NoFeaturesError,
    _overrides,
    main,
    replay_run,
)
from fl_client.attacks import malicious_partitions
from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay")
    cfg = RunConfig.from_flat(
        {
            "dataset.name": "digits",
            "model.name": "mlp",
            "num_clients": 5,
            "clients_per_round": 5,
            "num_rounds": 4,
            "output_dir": str(out),
            "run_name": "run",
            "policy.name": "deterministic",
            "attack.kind": "sign_flip",
            "attack.fraction": 0.2,
            "defense.enabled": True,
        }
    )
    run_server(InProcessGrid(make_client_app(cfg), 5), cfg)
    return out / "run"


def _logged_counts(run: Path) -> tuple[int, int]:
    """(attacker replies flagged malicious, honest ones) from the decision log."""
    cfg = RunConfig.model_validate(json.loads((run / "config.json").read_text()))
    bad = {f"c{p}" for p in malicious_partitions(5, 0.2, cfg.seed)}
    tp = fp = 0
    for line in (run / "decisions.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["phase"] != "aggregate":
            continue
        for f in d["decision"]["flags"]:
            if f["kind"] == "malicious":
                tp += f["id"] in bad
                fp += f["id"] not in bad
    return tp, fp


def test_the_runs_own_settings_reproduce_its_flags(attacked_run: Path) -> None:
    got = replay_run(attacked_run)

    assert (got["tp"], got["fp"]) == _logged_counts(attacked_run)
    assert got["tp"] >= 1  # the sign flipper was caught, so the check has teeth
    # One attacker, flagged from round 1 and excluded after two flags in a row.
    assert got["tp"] + got["fn"] >= 2


def test_other_settings_change_the_flags(attacked_run: Path) -> None:
    # Detectors that never fire: nothing is flagged, every attack reply is missed.
    off = {
        "z_threshold": 1e9,
        "big_norm_ratio": 1e9,
        "majority_norm_ratio": 1e9,
        "repeat_norm_ratio": 1e9,
        "min_push": 1e9,
        "strong_reversal": 1e9,
        "low_norm_ratio": 0.0,
    }
    got = replay_run(attacked_run, off)

    assert got["tp"] == 0 and got["fp"] == 0 and got["fn"] >= 2
    assert got["precision"] is None and got["recall"] == 0.0


def test_a_log_without_features_is_refused(attacked_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text((attacked_run / "config.json").read_text())
    lines = (attacked_run / "decisions.jsonl").read_text().splitlines()
    stripped = [json.loads(x) for x in lines]
    for d in stripped:
        d.pop("replies", None)
    (run / "decisions.jsonl").write_text("\n".join(map(json.dumps, stripped)))

    with pytest.raises(NoFeaturesError, match="cannot be replayed"):
        replay_run(run)
    assert main([str(run)]) == 2


def test_settings_are_checked(
    attacked_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _overrides(["big_norm_ratio=5", "min_replies_for_z=3"]) == {
        "big_norm_ratio": 5.0,
        "min_replies_for_z": 3,
    }
    with pytest.raises(SystemExit, match="NAME one of"):
        _overrides(["no_such=1"])
    with pytest.raises(ValueError, match="z_threshold"):
        _overrides(["z_threshold=-1"])
    assert main([str(attacked_run), "--set", "z_threshold=-1"]) == 2
    assert "z_threshold" in capsys.readouterr().err

    assert main([str(attacked_run), "--set", "norm_examples_exponent=0"]) == 0
    table = capsys.readouterr().out
    assert "the run's own" in table and "| norm_examples_exponent=0 |" in table
    # without --set: the run's own settings, one row (replayed once)
    assert main([str(attacked_run)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 1 and "| the run's own |" in rows[0]


def test_each_logged_reply_carries_its_clients_roll_call_examples(
    attacked_run: Path,
) -> None:
    replies = [
        r
        for line in (attacked_run / "decisions.jsonl").read_text().splitlines()
        if (d := json.loads(line))["phase"] == "aggregate"
        for r in d.get("replies", [])
    ]

    assert replies
    # The detectors scale norms by this count; an honest client reports the
    # training set it registered at roll call, so the two agree here.
    assert all(r["registered_examples"] == r["num_examples"] for r in replies)
