"""experiments.isolated: one run per fresh process, retried when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.isolated import run_isolated
from orchestration.config import RunConfig

# A child that writes what a finished run leaves behind (config.json and
# summary.json) after failing ``FAILS`` times, counted in a file next to the run.
_FAKE = """
import json, sys
from pathlib import Path
from orchestration.config import RunConfig
cfg = RunConfig.from_flat(json.loads(sys.argv[1]))
run = Path(cfg.output_dir) / cfg.run_name
run.mkdir(parents=True, exist_ok=True)
tries = Path(cfg.output_dir) / "tries"
n = int(tries.read_text()) + 1 if tries.exists() else 1
tries.write_text(str(n))
(run / "partial").write_text("x")
if n <= FAILS:
    sys.exit(3)
(run / "config.json").write_text(json.dumps(cfg.model_dump()))
(run / "summary.json").write_text(json.dumps({"rounds": cfg.num_rounds, "n": n}))
"""


def _cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.from_flat(
        {"output_dir": str(tmp_path), "run_name": "r", "num_rounds": 2}
    )


def test_a_failed_attempt_is_cleaned_up_and_retried(tmp_path: Path) -> None:
    summary = run_isolated(
        _cfg(tmp_path), retries=1, pause_s=0, child_code=_FAKE.replace("FAILS", "1")
    )
    assert summary == {"rounds": 2, "n": 2}
    assert (tmp_path / "tries").read_text() == "2"


def test_every_attempt_failing_raises_with_how_each_ended(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"failed 2 time\(s\): exit status 3; exit"):
        run_isolated(
            _cfg(tmp_path),
            retries=1,
            pause_s=0,
            child_code=_FAKE.replace("FAILS", "5"),
        )
    assert not (tmp_path / "r").exists()  # the partial run directory is removed


def test_a_hanging_child_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    hang = "import time\ntime.sleep(60)\n"
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        run_isolated(_cfg(tmp_path), timeout_s=1, child_code=hang)


def test_negative_retries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retries"):
        run_isolated(_cfg(tmp_path), retries=-1)
