"""Real Flower simulations (Ray) through the project's own entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        HF_HUB_OFFLINE="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _project_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True)
    return [
        line
        for line in out.stdout.splitlines()
        if marker in line and " Z" not in line and "ps -eo" not in line
    ]


def test_hydra_entry_point_runs_a_real_simulation(
    tmp_path: Path, flwr_home: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "num_clients=4",
        "clients_per_round=2",
        "num_rounds=2",
        "policy=deterministic",
        f"hydra.run.dir={run_dir}",
    ]

    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(flwr_home), capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round   2/2" in proc.stdout and "finished: agent" in proc.stdout
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    keys = {
        "round",
        "accuracy",
        "loss",
        "selected",
        "flagged",
        "source",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "accepted",
        "failures",
    }
    assert all(keys <= set(r) for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    assert all(r["selected"] == 2 and r["source"] == "deterministic" for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] == rows[-1]["accuracy"]
    assert (run_dir / "model.pt").stat().st_size > 0


def test_a_failing_run_exits_nonzero_with_the_cause(
    tmp_path: Path, flwr_home: Path
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "dataset=cifar10",
        "num_clients=4",
        "clients_per_round=2",
        "num_rounds=1",
        f"hydra.run.dir={tmp_path}",
    ]

    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(flwr_home), capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 2
    assert "run failed" in proc.stderr and "cannot be reached" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_flwr_run_with_run_config_overrides(tmp_path: Path, flwr_home: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        ".",
        "--run-config",
        f"num_rounds=2 num_clients=4 clients_per_round=2 output_dir='{out}' "
        "run_name='r' strategy.name='fedavg' policy.name='deterministic'",
        "--federation-config",
        "num-supernodes=4",
        "--stream",
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = [
            json.loads(x)
            for x in (out / "r" / "results.jsonl").read_text().splitlines()
        ]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[-1]["accuracy"] > rows[0]["accuracy"]
        assert (
            json.loads((out / "r" / "config.json").read_text())["strategy"]["name"]
            == "fedavg"
        )
    finally:
        # `flwr run` leaves a detached SuperLink running: stop what the test started.
        subprocess.run(["pkill", "-f", f"flower-superlink.*{flwr_home}"], check=False)
        deadline = time.time() + 20
        while _project_processes(str(flwr_home)) and time.time() < deadline:
            time.sleep(0.5)
    assert _project_processes(str(flwr_home)) == []
