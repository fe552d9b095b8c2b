"""The agent against real attackers, end to end on the real ClientApp (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from inprocess import InProcessGrid

from fl_client.attacks import malicious_partitions
from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from fl_server.strategy import RoundFailedError
from orchestration.config import RunConfig


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 5,
        "clients_per_round": 5,
        "num_rounds": 4,
        "output_dir": str(tmp_path),
        "run_name": "run",
        "policy.name": "deterministic",
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_sign_flip_attacker_is_flagged_within_3_rounds_and_excluded(
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        tmp_path,
        **{
            "attack.kind": "sign_flip",
            "attack.fraction": 0.2,
            "defense.enabled": True,
        },
    )
    (bad,) = malicious_partitions(5, 0.2, cfg.seed)
    attacker = f"c{bad}"

    summary = run_server(InProcessGrid(make_client_app(cfg), 5), cfg)

    decisions = _lines(tmp_path / "run" / "decisions.jsonl")
    flagged_rounds = [
        d["round"]
        for d in decisions
        if d["phase"] == "aggregate"
        and any(f["id"] == attacker for f in d["decision"]["flags"])  # type: ignore[index]
    ]
    assert flagged_rounds and flagged_rounds[0] <= 3
    selected_after = [
        d["decision"]["selected"]  # type: ignore[index]
        for d in decisions
        if d["phase"] == "train" and d["round"] > flagged_rounds[1]  # type: ignore[operator]
    ]
    assert selected_after and all(attacker not in s for s in selected_after)
    attack = summary["attack"]
    assert isinstance(attack, dict) and attack["malicious"] == [attacker]
    assert attacker in attack["detection"]["clients_excluded"]
    assert attack["detection"]["recall"] == 1.0
    rows = _lines(tmp_path / "run" / "results.jsonl")
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # type: ignore[operator]


def _nan_all(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, ctx)
    if msg.metadata.message_type == "train":
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}
        )
    return reply


def test_a_round_with_every_update_rejected_keeps_the_model_and_goes_on(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, num_rounds=2, max_failed_rounds=3)
    grid = InProcessGrid(make_client_app(cfg, mods=[_nan_all]), 5)

    summary = run_server(grid, cfg)

    rows = _lines(tmp_path / "run" / "results.jsonl")
    assert [r["failed"] for r in rows] == [False, True, True]
    assert all("non-finite" in str(r["failure_reason"]) for r in rows[1:])
    assert rows[1]["accuracy"] == rows[0]["accuracy"] == rows[2]["accuracy"]
    assert summary["failed_rounds"] == 2


def test_too_many_failed_rounds_in_a_row_stop_the_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_rounds=4, max_failed_rounds=2)
    grid = InProcessGrid(make_client_app(cfg, mods=[_nan_all]), 5)

    with pytest.raises(RoundFailedError, match=r"2 round\(s\) in a row failed.*c0: "):
        run_server(grid, cfg)
    assert len(_lines(tmp_path / "run" / "results.jsonl")) == 3
