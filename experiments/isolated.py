"""Run one experiment in a fresh Python process, with retries on a loaded machine.

A second simulation in one process after a run with federated evaluation timed out
on its roll call every time it was tried on the loaded benchmark machine, and Ray
sometimes does not start at all ("node timed out during startup"), after which the
failed child hangs. So benchmarks that run many configurations give each run its
own process (and its own Ray instance) in its own session: a run that fails or
exceeds its time has its whole process group stopped, its partial run directory
removed, and is started again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestration.config import RunConfig

from .bench_compression import finished_run

CHILD = (
    "import json, sys\n"
    "from orchestration.config import RunConfig\n"
    "from orchestration.runner import run_experiment\n"
    "run_experiment(RunConfig.from_flat(json.loads(sys.argv[1])))\n"
)


def _stop(child: subprocess.Popen[bytes]) -> None:
    """Stop ``child``'s process group: SIGTERM, then SIGKILL after 30 s."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def run_isolated(
    cfg: RunConfig,
    timeout_s: float | None = None,
    retries: int = 0,
    pause_s: float = 30.0,
    child_code: str = CHILD,
) -> dict[str, Any]:
    """Run ``cfg`` in a fresh process (own session) and return its summary.

    Parameters
    ----------
    cfg : RunConfig
        The run; its summary is read back from ``output_dir / run_name``.
    timeout_s : float, optional
        Wall-clock limit of one attempt (none by default).
    retries : int
        Attempts after the first one that failed (exit status not 0, time out, or
        no complete summary written).
    pause_s : float
        Wait between attempts.
    child_code : str
        The Python code the child runs with the flat config as JSON in
        ``sys.argv[1]`` (for tests).

    Raises
    ------
    RuntimeError
        If every attempt failed; the message says how each ended.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    ends = []
    for attempt in range(1, retries + 2):
        child = subprocess.Popen(
            [sys.executable, "-c", child_code, json.dumps(cfg.to_flat())],
            start_new_session=True,
        )
        try:
            code: int | None = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            _stop(child)
        summary = finished_run(cfg)
        if code == 0 and summary is not None:
            return summary
        why = (
            f"timed out after {timeout_s:g} s"
            if code is None
            else f"exit status {code}"
            if code != 0
            else "no complete summary written"
        )
        ends.append(why)
        print(f"run {cfg.run_name} attempt {attempt} failed ({why})", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        if attempt <= retries:
            time.sleep(pause_s)
    raise RuntimeError(
        f"run {cfg.run_name} failed {len(ends)} time(s): {'; '.join(ends)}"
    )
