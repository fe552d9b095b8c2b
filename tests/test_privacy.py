"""Differential privacy (Opacus DP-SGD, Flower's client-level DP) and the rules on
which privacy features compose; the real ClientApp in process (tests/inprocess.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from inprocess import InProcessGrid

from fl_client.client_app import make_client_app
from fl_client.dp import STATE_KEY, epsilon_of, load_history, save_history
from fl_server.privacy import RoundAccountant, effective_noise_multiplier
from fl_server.server_app import run_server
from orchestration.config import ConfigError, RunConfig


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 3,
        "clients_per_round": 3,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "run_name": "run",
        "policy.name": "deterministic",
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _rows(cfg: RunConfig) -> list[dict[str, object]]:
    path = Path(cfg.output_dir) / cfg.run_name / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_dp_sgd_epsilon_grows_across_rounds_and_persists_per_node(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, **{"dp.mode": "sample", "dp.noise_multiplier": 1.1})
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)

    run_server(grid, cfg)

    rows = _rows(cfg)
    eps = [r.get("epsilon_max") for r in rows]  # absent until a client reports
    assert eps[0] is None
    assert all(isinstance(e, float) and e > 0 for e in eps[1:])
    assert eps[1] < eps[2] < eps[3]  # type: ignore[operator]
    # The accountant lives in each node's context.state: one Opacus history whose
    # steps add up over rounds (a fresh accountant each round would hold one round).
    for ctx in grid.contexts.values():
        history = load_history(ctx.state)
        assert sum(n for _, _, n in history) > 0
    ctx = next(iter(grid.contexts.values()))
    one_round = [(s, r, n // cfg.num_rounds) for s, r, n in load_history(ctx.state)]
    assert epsilon_of(load_history(ctx.state), 1e-5) > epsilon_of(one_round, 1e-5)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]  # type: ignore[operator]


def _update_norms(seen: list[float]):  # type: ignore[no-untyped-def]
    """An app-level test mod recording ||reply - global|| of every train reply."""

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, ctx)
        start = msg.content["arrays"].to_numpy_ndarrays()  # type: ignore[union-attr]
        reply = call_next(msg, ctx)
        new = reply.content["arrays"].to_numpy_ndarrays()  # type: ignore[union-attr]
        squares = [((a - b) ** 2).sum() for a, b in zip(new, start, strict=True)]
        seen.append(float(np.sqrt(sum(squares))))
        return reply

    return mod


def test_client_level_dp_clips_updates_adds_noise_and_accounts(
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        tmp_path,
        **{
            "dp.mode": "client",
            "dp.noise_multiplier": 0.5,
            "dp.clipping_norm": 0.5,
        },
    )
    norms: list[float] = []
    grid = InProcessGrid(make_client_app(cfg, mods=[_update_norms(norms)]), 3)

    run_server(grid, cfg)

    rows = _rows(cfg)
    eps = [r["epsilon_max"] for r in rows[1:]]
    assert eps[0] < eps[1] < eps[2]  # type: ignore[operator]
    assert len(norms) == 9 and max(norms) <= 0.5 + 1e-4
    # Same composition through the pure accountant: three releases at the effective
    # multiplier of the agent's weights (here <= sigma, so epsilon is no smaller).
    acc = RoundAccountant(1e-5)
    uniform = [acc.step(0.5) for _ in range(3)]
    assert eps[2] >= uniform[2] - 1e-6  # type: ignore[operator]


def test_dp_state_roundtrip_and_malformed_state() -> None:
    state = RecordDict()
    save_history(state, [(1.0, 0.1, 7), (2.0, 0.1, 3)])

    assert load_history(state) == [(1.0, 0.1, 7), (2.0, 0.1, 3)]
    state.config_records[STATE_KEY] = ConfigRecord({"sigma": [1.0], "rate": [0.1]})
    assert load_history(state) == []
    assert load_history(RecordDict()) == []


def test_effective_noise_multiplier_for_weighted_means() -> None:
    assert effective_noise_multiplier(1.0, 10, 0.1) == pytest.approx(1.0)
    assert effective_noise_multiplier(1.0, 10, 0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        effective_noise_multiplier(1.0, 10, 0.0)


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        (
            {"secagg.enabled": True, "strategy.name": "fedmedian"},
            "does not compose with strategy.name='fedmedian'.*masked sum",
        ),
        (
            {"secagg.enabled": True, "strategy.name": "fedavg"},
            "legacy-API adapter",
        ),
        (
            {"secagg.enabled": True, "clients_per_round": 2, "num_clients": 4},
            "clients_per_round >= 3",
        ),
        ({"secagg.enabled": True, "secagg.num_shares": 2.5}, "integer >= 3"),
        (
            {
                "secagg.enabled": True,
                "secagg.num_shares": 5.0,
                "secagg.reconstruction_threshold": 5.0,
            },
            "must be below the number of shares",
        ),
        (
            {"dp.mode": "client", "strategy.name": "multikrum"},
            "dp.mode='client' does not compose.*sensitivity of a mean",
        ),
        (
            {"secagg.enabled": True, "defense.enabled": True},
            "does not compose with defense.enabled=true.*masked sum",
        ),
        ({"dp.mode": "sample", "dp.noise_multiplier": 0.0}, "noise_multiplier > 0"),
        ({"dp.mode": "gaussian"}, "dp.mode"),
    ],
)
def test_invalid_privacy_combinations_are_refused(
    flat: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


@pytest.mark.parametrize(
    "flat",
    [
        {"secagg.enabled": True, "dp.mode": "sample"},
        {"secagg.enabled": True, "dp.mode": "client"},
        {"dp.mode": "client", "strategy.name": "fedavg"},
        {"dp.mode": "sample", "strategy.name": "fedmedian"},
    ],
)
def test_valid_privacy_combinations_are_accepted(flat: dict[str, object]) -> None:
    assert RunConfig.from_flat(flat).to_flat()["dp.mode"] == flat.get("dp.mode")
