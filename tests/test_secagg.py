"""SecAgg+ (Flower's secaggplus_mod + SecAggPlusWorkflow) under the agent strategy.

In process (real ClientApp and the real workflow, no Ray) for the protocol's
arithmetic and a client dying mid-protocol; one Ray simulation for the real engine.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from inprocess import InProcessGrid

from fl_client.client_app import make_client_app
from fl_client.secagg import (
    NAMES_KEY,
    USED_WEIGHT_KEY,
    WEIGHT_KEY,
    SecAggAdapterError,
    to_fitres,
    to_message_api,
)
from fl_server.secagg_strategy import integer_weights
from fl_server.server_app import run_server
from fl_server.strategy import RoundFailedError
from orchestration.config import RunConfig
from orchestration.runner import run_experiment


class LegacyInProcessGrid(InProcessGrid):
    """The in-process grid, plus what the legacy SecAgg+ workflow needs.

    A ``run`` with an id, and one copy of each message per node: the workflow sends
    one ``RecordDict`` object to every node and ``secaggplus_mod`` edits what it gets,
    which over a real transport each node receives as its own copy.
    """

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return SimpleNamespace(run_id=1)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return super().send_and_receive(
            [copy.deepcopy(m) for m in messages], timeout=timeout
        )


def _cfg(tmp_path: Path, name: str, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 5,
        "clients_per_round": 5,
        "num_rounds": 2,
        "output_dir": str(tmp_path),
        "run_name": name,
        "policy.name": "deterministic",
        "policy.exploration": 0.0,
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _run_inprocess(cfg: RunConfig, mods: list | None = None) -> Path:  # type: ignore[type-arg]
    grid = LegacyInProcessGrid(make_client_app(cfg, mods=mods), cfg.num_clients)
    run_server(grid, cfg)
    return Path(cfg.output_dir) / cfg.run_name


def _model(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / "model.pt")
    return torch.cat([v.flatten() for v in state.values()])


def _rows(run_dir: Path, name: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def _die_at(stage: str, pid: int, round_: int):  # type: ignore[no-untyped-def]
    """A mod making client ``pid`` raise when ``stage`` of round ``round_`` comes."""

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (
            configs is not None
            and configs.get(Key.STAGE) == stage
            and int(ctx.node_config["partition-id"]) == pid
            and msg.metadata.group_id == str(round_)
        ):
            raise ConnectionError(f"client {pid} died at {stage}")
        return call_next(msg, ctx)

    return mod


def test_secagg_aggregate_equals_the_plain_weighted_mean(tmp_path: Path) -> None:
    plain = _run_inprocess(_cfg(tmp_path, "plain"))
    secure = _run_inprocess(_cfg(tmp_path, "secagg", **{"secagg.enabled": True}))

    diff = (_model(plain) - _model(secure)).abs().max().item()
    rounds = json.loads((secure / "secagg.json").read_text())
    # Quantization step 2*8/2**22 ~ 4e-6 per coordinate and client, weights rounded
    # to 1e-4 of a share; two rounds of that stay far below 1e-3.
    assert diff < 1e-3, diff
    assert [r["distinct_payloads"] for r in rounds] == [1, 1]
    assert all(r["contributions"] == 5 and r["dropped"] == 0 for r in rounds)
    assert all(
        sum(r["assigned_weights"].values()) in range(9995, 10006) for r in rounds
    )
    rows = _rows(secure, "results.jsonl")
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # type: ignore[operator]
    assert all(r["bytes_up"] > 0 for r in rows[1:])  # masked vectors are counted


def test_secagg_round_completes_when_a_client_dies_mid_protocol(
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        tmp_path,
        "dropout",
        **{"secagg.enabled": True, "secagg.reconstruction_threshold": 3.0},
    )

    run_dir = _run_inprocess(cfg, mods=[_die_at(Stage.COLLECT_MASKED_VECTORS, 2, 1)])

    rounds = json.loads((run_dir / "secagg.json").read_text())
    assert rounds[0]["selected"] == 5 and rounds[0]["contributions"] == 4
    assert rounds[0]["dropped"] == 1 and rounds[1]["dropped"] == 0
    rows = _rows(run_dir, "results.jsonl")
    assert rows[1]["failures"] == 1 and rows[1]["accepted"] == 4
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # type: ignore[operator]
    decisions = _rows(run_dir, "decisions.jsonl")
    assert any(d["phase"] == "aggregate" for d in decisions)


def test_secagg_run_fails_loudly_below_the_reconstruction_threshold(
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        tmp_path,
        "halt",
        **{
            "num_clients": 4,
            "clients_per_round": 4,
            "secagg.enabled": True,
            "secagg.num_shares": 3.0,
            "secagg.reconstruction_threshold": 2.0,
        },
    )
    mods = [_die_at(Stage.COLLECT_MASKED_VECTORS, pid, 1) for pid in (0, 1, 2)]

    with pytest.raises(RoundFailedError, match="SecAgg\\+ protocol halted"):
        _run_inprocess(cfg, mods=mods)


def test_integer_weights_keep_the_shares() -> None:
    w = integer_weights({"c0": 1.0, "c1": 3.0})

    assert w == {"c0": 2500, "c1": 7500}
    with pytest.raises(ValueError, match="not all 0"):
        integer_weights({"c0": 0.0})


def test_secagg_ray_simulation_matches_the_plain_run(tmp_path: Path) -> None:
    plain = _run_inprocess(_cfg(tmp_path, "plain", num_clients=4, clients_per_round=4))
    cfg = _cfg(
        tmp_path, "ray", num_clients=4, clients_per_round=4, **{"secagg.enabled": True}
    )

    summary = run_experiment(cfg)

    run_dir = Path(str(summary["run_dir"]))
    rounds = json.loads((run_dir / "secagg.json").read_text())
    assert [r["distinct_payloads"] for r in rounds] == [1, 1]
    assert (_model(plain) - _model(run_dir)).abs().max().item() < 1e-3


def test_secagg_composes_with_client_level_dp(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "secagg-dp",
        num_clients=4,
        clients_per_round=4,
        **{
            "secagg.enabled": True,
            "dp.mode": "client",
            "dp.noise_multiplier": 0.3,
            "dp.clipping_norm": 0.5,
        },
    )

    run_dir = _run_inprocess(cfg)

    rows = _rows(run_dir, "results.jsonl")
    eps = [r["epsilon_max"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1]  # type: ignore[operator]
    rounds = json.loads((run_dir / "secagg.json").read_text())
    assert [r["distinct_payloads"] for r in rounds] == [1, 1]
    # Four clipped updates (norm <= 0.5) averaged, plus noise: the aggregate moves,
    # but the clipped part alone cannot exceed the clipping norm.
    assert all(r["aggregate_update_norm"] > 0 for r in rounds)


def _fitins(config: dict[str, object]) -> RecordDict:
    params = ndarrays_to_parameters([np.zeros((2, 2), np.float32)])
    return compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({WEIGHT_KEY: 5}, "lacks 'secagg-names'"),
        ({NAMES_KEY: "w", WEIGHT_KEY: -1}, "integer >= 0"),
        ({NAMES_KEY: "w", WEIGHT_KEY: 1.5}, "integer >= 0"),
        ({NAMES_KEY: "w,b", WEIGHT_KEY: 1}, "1 arrays but 2 names"),
    ],
)
def test_adapter_rejects_malformed_secagg_configs(
    config: dict[str, object], match: str
) -> None:
    with pytest.raises(SecAggAdapterError, match=match):
        to_message_api(_fitins(config))


def test_adapter_round_trip_sends_the_update_and_the_weight() -> None:
    content, names, weight = to_message_api(_fitins({NAMES_KEY: "w", WEIGHT_KEY: 7}))
    glob = content["arrays"]
    new = ArrayRecord({"w": Array(np.full((2, 2), 0.25, np.float32))})
    reply = RecordDict({"arrays": new, "metrics": MetricRecord({"train-loss": 1.0})})

    fitres = compat.recorddict_to_fitres(
        to_fitres(reply, glob, names, weight),
        keep_input=True,  # type: ignore[arg-type]
    )

    assert names == ["w"] and fitres.num_examples == 7
    np.testing.assert_allclose(parameters_to_ndarrays(fitres.parameters)[0], 0.25)
    assert fitres.metrics == {"train-loss": 1.0, USED_WEIGHT_KEY: 7}
