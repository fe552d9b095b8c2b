"""Checkpoints: file format, corruption fallback, config checks, kill and resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from inprocess import InProcessGrid
from support.runs import SHORT, inprocess_cmd, results, run_child, same_model

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    config_mismatch,
    decode,
    encode,
)
from orchestration.config import ConfigError, RunConfig


class _Part:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _cfg(tmp_path: Path, name: str, **kw: object) -> RunConfig:
    return RunConfig.from_flat(
        {**SHORT, "output_dir": str(tmp_path), "run_name": name, **kw}
    )


# ---------------------------------------------------------------- file format
def test_encode_decode_roundtrip_and_every_kind_of_damage() -> None:
    blob = encode(b"payload bytes")
    assert decode(blob) == b"payload bytes"
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        decode(blob[:-3])
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    with pytest.raises(CorruptCheckpoint, match="SHA-256"):
        decode(bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="bad header"):
        decode(b"garbage\n" + blob)


def test_checkpointer_keeps_the_last_two_and_restores_parts(tmp_path: Path) -> None:
    part = _Part()
    ck = Checkpointer(tmp_path, keep=2)
    ck.register("counter", part)
    for r in range(4):
        part.value = 10 * r
        ck.save(r, {"w": np.full(3, r, dtype=np.float32)})

    assert ck.rounds() == [2, 3]
    latest = ck.latest()
    assert latest is not None and latest.round == 3
    part.value = -1
    ck.restore(latest)
    assert part.value == 30
    np.testing.assert_array_equal(latest.arrays["w"], np.full(3, 3, np.float32))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(tmp_path, keep=2)
    ck.register("counter", _Part(7))
    ck.save(1, {"w": np.zeros(2)})
    path = ck.save(2, {"w": np.ones(2)})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])

    latest = ck.latest()

    assert latest is not None and latest.round == 1
    assert ck.corrupt_skipped == 1
    assert "round 2 unusable" in caplog.text


def test_an_unfinished_write_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(1, {"w": np.zeros(2)})
    (tmp_path / ".ckpt-000002.bin.x1y2").write_bytes(b"AGENTFL-CKPT 1 half")

    again = Checkpointer(tmp_path, keep=2)

    latest = again.latest()
    assert latest is not None and latest.round == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001.bin"]


def test_restore_refuses_a_checkpoint_missing_a_part(tmp_path: Path) -> None:
    Checkpointer(tmp_path, keep=2).save(1, {})
    ck = Checkpointer(tmp_path, keep=2)
    ck.register("planner", _Part())
    latest = ck.latest()
    assert latest is not None
    with pytest.raises(CheckpointError, match="planner"):
        ck.restore(latest)


def test_config_mismatch_ignores_only_the_resumable_keys() -> None:
    a = RunConfig().to_flat()
    b = {**a, "output_dir": "elsewhere", "resume": "x", "seed": 3}
    assert config_mismatch(a, b) == ["seed: 0 != 3"]


# ---------------------------------------------------------------- resume, in process
def test_resume_rejects_a_missing_dir_and_a_different_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "r", num_rounds=2)
    run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)

    with pytest.raises(ConfigError, match="'resume'.*not a directory"):
        run_server(None, _cfg(tmp_path, "x", resume=str(tmp_path / "nope")))  # type: ignore[arg-type]
    other = _cfg(tmp_path, "x", num_rounds=2, seed=5, resume=str(tmp_path / "r"))
    with pytest.raises(CheckpointError, match="seed: 0 != 5"):
        run_server(InProcessGrid(make_client_app(other), 4), other)


def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """Real SIGKILL of a child run inside round 3; resume; compare bitwise."""
    ref = _cfg(tmp_path, "ref")
    run_server(InProcessGrid(make_client_app(ref), ref.num_clients), ref)

    flat = {**SHORT, "output_dir": str(tmp_path), "run_name": "killed"}
    killed = run_child(inprocess_cmd(flat), kill_round=3, timeout=120)
    run_dir = tmp_path / "killed"
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert [r["round"] for r in results(run_dir)] == [0, 1, 2]
    assert not (run_dir / "model.pt").exists()

    resumed = run_child(inprocess_cmd({**flat, "resume": str(run_dir)}), timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:]

    assert results(run_dir) == results(tmp_path / "ref")
    assert same_model(run_dir / "model.pt", tmp_path / "ref" / "model.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_after_round"] == 2


def test_resume_after_a_corrupted_checkpoint_reruns_from_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = _cfg(tmp_path, "ref", num_rounds=3)
    run_server(InProcessGrid(make_client_app(ref), ref.num_clients), ref)
    flat = {**SHORT, "num_rounds": 3, "output_dir": str(tmp_path), "run_name": "k"}
    killed = run_child(inprocess_cmd(flat), kill_round=3, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    ckpts = sorted((tmp_path / "k" / "checkpoints").glob("ckpt-*.bin"))
    assert [p.name for p in ckpts] == ["ckpt-000001.bin", "ckpt-000002.bin"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # truncated

    cfg = _cfg(tmp_path, "k", num_rounds=3, resume=str(tmp_path / "k"))
    summary = run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)

    assert "round 2 unusable" in caplog.text and "truncated" in caplog.text
    assert summary["resumed_after_round"] == 1
    assert results(tmp_path / "k") == results(tmp_path / "ref")
    assert same_model(tmp_path / "k" / "model.pt", tmp_path / "ref" / "model.pt")


def test_resume_reuses_logged_decisions_instead_of_asking_the_policy(
    tmp_path: Path,
) -> None:
    """Round 3's train decision was logged before the kill: it is replayed."""
    from agent_strategy import Decision, DeterministicPolicy, Observation
    from fl_server.policy_setup import PolicySetup
    from fl_server.server_app import _run_server

    ref = _cfg(tmp_path, "ref")
    run_server(InProcessGrid(make_client_app(ref), ref.num_clients), ref)
    flat = {**SHORT, "output_dir": str(tmp_path), "run_name": "k"}
    assert run_child(inprocess_cmd(flat), kill_round=3).returncode == -signal.SIGKILL

    asked: list[tuple[int, str]] = []

    class Counting(DeterministicPolicy):
        def decide(self, obs: Observation) -> Decision:
            asked.append((obs.round, obs.phase))
            return super().decide(obs)

    cfg = _cfg(tmp_path, "k", resume=str(tmp_path / "k"))
    det = DeterministicPolicy(seed=0, exploration=0.2)
    _run_server(
        InProcessGrid(make_client_app(cfg), cfg.num_clients),
        cfg,
        PolicySetup(Counting(seed=0, exploration=0.2), det),
    )

    assert asked == [(3, "aggregate"), (4, "train"), (4, "aggregate")]
    assert results(tmp_path / "k") == results(tmp_path / "ref")
    lines = (tmp_path / "k" / "decisions.jsonl").read_text().splitlines()
    assert [(e["round"], e["phase"]) for e in map(json.loads, lines)] == [
        (r, p) for r in (1, 2, 3, 4) for p in ("train", "aggregate")
    ]


def test_llm_state_roundtrip_keeps_history_budget_and_breaker() -> None:
    from agent_strategy import DeterministicPolicy
    from agent_strategy.llm import Budget, LLMPolicy, RoundSummary
    from agent_strategy.llm.budget import Usage
    from fl_server.state import LLMState

    def make() -> LLMPolicy:
        return LLMPolicy(
            "openai/stub-model",
            fallback=DeterministicPolicy(),
            budget=Budget(max_calls=10, max_cost_usd=1.0),
        )

    a = make()
    a.remember(RoundSummary(1, 0.5, 4, 1, 0.7, 1.2, 0.3, 1))
    a.budget.charge(Usage(100, 20), 0.25)
    a.calls, a._consecutive_failures, a._paused_until = 7, 2, 12
    a.fallbacks["timeout"] += 3
    a.corrections["aggregation"] += 2

    b = make()
    LLMState(b).load_state_dict(LLMState(a).state_dict())

    assert list(b.history) == list(a.history)
    assert b.budget.state_dict() == a.budget.state_dict()
    assert (b.calls, b._consecutive_failures, b._paused_until) == (7, 2, 12)
    assert b.fallbacks == a.fallbacks
    assert b.corrections == {"aggregation": 2}
