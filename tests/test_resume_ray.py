"""Must-show: a run on Flower's simulation engine (Ray) SIGKILLed inside round 3 and
resumed ends with the same model (bitwise) and results as an uninterrupted run.

The reference run uses the same ServerApp and ClientApp in process (no Ray): equal
results also show that the engine does not change the numbers.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from inprocess import InProcessGrid
from support.runs import SHORT, decisions, results, run_child, same_model

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig

HYDRA_ARGS = [
    "dataset=digits",
    "model=mlp",
    "num_clients=4",
    "clients_per_round=3",
    "num_rounds=4",
    "policy=deterministic",
]


def test_ray_run_killed_in_round_3_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    ref = RunConfig.from_flat({**SHORT, "output_dir": str(tmp_path), "run_name": "ref"})
    run_server(InProcessGrid(make_client_app(ref), ref.num_clients), ref)
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "experiments.run", *HYDRA_ARGS]
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"

    killed = run_child(
        [*base, f"output_dir={tmp_path}", "run_name=run", hydra_dir],
        kill_round=3,
        timeout=400,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "SIGKILL in round 3" in killed.stdout
    assert [r["round"] for r in results(run_dir)] == [0, 1, 2]

    resumed = run_child([*base, f"resume={run_dir}", hydra_dir], timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming" in resumed.stdout and "round   4/4" in resumed.stdout

    assert results(run_dir) == results(tmp_path / "ref")
    assert decisions(run_dir) == decisions(tmp_path / "ref")
    assert same_model(run_dir / "model.pt", tmp_path / "ref" / "model.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_after_round"] == 2 and summary["rounds"] == 4
