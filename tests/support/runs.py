"""Helpers for checkpoint/resume tests: child runs, SIGKILL, result comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
KILL_ENV = "AGENTFL_TEST_KILL_IN_ROUND"

#: A short run: digits + mlp, 4 clients (3 per round), 4 rounds, no LLM.
SHORT = {
    "dataset.name": "digits",
    "model.name": "mlp",
    "num_clients": 4,
    "clients_per_round": 3,
    "num_rounds": 4,
    "policy.name": "deterministic",
}


def child_env(kill_round: int | None = None) -> dict[str, str]:
    """Return the environment of a child run (offline, this checkout first)."""
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        HF_HUB_OFFLINE="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if kill_round is not None:
        env[KILL_ENV] = str(kill_round)
    return env


def run_child(
    cmd: list[str], kill_round: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session; afterwards kill whatever it left behind.

    A SIGKILLed Ray driver leaves some Ray helpers running; they stay in the child's
    process group, which is killed by its id once the child has exited.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(kill_round),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def inprocess_cmd(flat: dict[str, Any]) -> list[str]:
    """Return the command running ``flat`` in process (real ClientApp, no Ray)."""
    script = ROOT / "tests" / "support" / "inprocess_run.py"
    return [sys.executable, str(script), json.dumps(flat)]


def results(run_dir: Path) -> list[dict[str, Any]]:
    """Return ``results.jsonl`` without the wall-clock field."""
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s")
    return rows


def decisions(run_dir: Path) -> list[tuple[int, str, str]]:
    """Return ``(round, phase, decision)`` of ``decisions.jsonl`` (no latencies)."""
    lines = (run_dir / "decisions.jsonl").read_text().splitlines()
    return [
        (e["round"], e["phase"], json.dumps(e["decision"], sort_keys=True))
        for e in map(json.loads, lines)
    ]


def same_model(a: Path, b: Path) -> bool:
    """Return True if two ``model.pt`` state dicts are bitwise equal."""
    sa, sb = torch.load(a), torch.load(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
