"""Compressed uploads and personalization end to end, real ClientApp in process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from inprocess import InProcessGrid
from support.client_runs import capture_train_replies, tiny_config
from support.factories import plain_train_obs

from agent_strategy import DeterministicPolicy, guard
from fl_client.client_app import make_client_app
from fl_client.compression import RESIDUAL_KEY
from fl_client.personal import LAYERS_KEY, MODEL_KEY, personal_keys
from fl_server.server_app import run_server
from orchestration.config import ConfigError, RunConfig

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _results(cfg: RunConfig) -> list[dict[str, object]]:
    path = Path(cfg.output_dir) / cfg.run_name / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(cfg: RunConfig, mods: list[Mod] | None = None) -> InProcessGrid:
    grid = InProcessGrid(make_client_app(cfg, mods=mods), cfg.num_clients)
    run_server(grid, cfg)
    return grid


def test_compressed_runs_learn_with_compact_uploads(tmp_path: Path) -> None:
    dense = tiny_config(tmp_path, "dense")
    _run(dense)
    base = _results(dense)
    for codec, fraction, ratio in (("q8", 0.01, 3.9), ("topk", 0.05, 9.0)):
        cfg = tiny_config(
            tmp_path,
            codec,
            **{"compression.codec": codec, "compression.topk_fraction": fraction},
        )
        replies: list[Message] = []
        _run(cfg, [capture_train_replies(replies)])
        rows = _results(cfg)
        assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2, codec
        assert all(r["failures"] == 0 and r["accepted"] == 4 for r in rows[1:])
        # Bytes are counted from the messages: far fewer than the dense run's.
        up = sum(int(r["bytes_up"]) for r in rows)  # type: ignore[call-overload]
        dense_up = sum(int(r["bytes_up"]) for r in base)  # type: ignore[call-overload]
        assert dense_up / up >= ratio, (codec, dense_up / up)
        record = replies[0].content.array_records["arrays"]
        meta = replies[0].content.config_records["compression"]
        assert meta["codec"] == codec
        dtypes = {k: record[k].numpy().dtype for k in record}
        if codec == "q8":
            assert dtypes == {"codes": np.uint8, "qparams": np.float32}
        else:
            assert dtypes == {"indices": np.uint32, "values": np.float32}
            assert record["indices"].numpy().size == meta["k"]


def _tamper(kind: str, pid: int = 0) -> Mod:
    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctx)
        if msg.metadata.message_type != "train" or ctx.node_config["partition-id"]:
            return reply
        rec = reply.content.array_records["arrays"]
        arrays = {k: rec[k].numpy() for k in rec}
        if kind == "index":
            arrays["indices"] = arrays["indices"] + np.uint32(10**7)
        elif kind == "length":
            arrays["values"] = arrays["values"][:-1]
        elif kind == "bits":
            reply.content.config_records["compression"]["bits"] = 3
        elif kind == "codec":
            reply.content.config_records["compression"]["codec"] = "q4"
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    return mod


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("index", "out of range"),
        ("length", "values, expected"),
        ("bits", "bit width 3"),
        ("codec", "codec mismatch"),
    ],
)
def test_corrupt_compressed_update_is_rejected(
    tmp_path: Path, kind: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, kind, num_rounds=1, **{"compression.codec": "topk"})

    _run(cfg, [_tamper(kind)])

    rows = _results(cfg)
    assert rows[1]["failures"] == 1 and rows[1]["accepted"] == 3
    assert rows[1]["accuracy"] > rows[0]["accuracy"]  # type: ignore[operator]
    rejected = [
        r.getMessage() for r in caplog.records if "client c0:" in r.getMessage()
    ]
    assert len(rejected) == 1 and "rejected" in rejected[0], rejected
    assert reason in rejected[0]


def test_missing_residual_falls_back_to_plain_topk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def forget(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        if (
            msg.metadata.message_type == "train"
            and ctx.node_config["partition-id"] == 0
            and RESIDUAL_KEY in ctx.state
        ):
            del ctx.state[RESIDUAL_KEY]  # as after a node restart
        return call_next(msg, ctx)

    replies: list[Message] = []
    cfg = tiny_config(tmp_path, "restart", **{"compression.codec": "topk"})
    _run(cfg, [forget, capture_train_replies(replies)])
    missing = [
        int(r.content.metric_records["metrics"]["ef-residual-missing"])  # type: ignore[call-overload]
        for r in replies
    ]
    assert sum(missing) == 2  # client 0 in rounds 2 and 3
    rows = _results(cfg)
    assert all(r["failures"] == 0 for r in rows[1:])
    assert "error-feedback residual missing" in caplog.text


def test_personal_layers_never_leave_the_client(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "fedper", **{"personalization.mode": "fedper"})
    replies: list[Message] = []
    grid = _run(cfg, [capture_train_replies(replies)])
    assert replies
    for reply in replies:
        keys = set(reply.content.array_records["arrays"].keys())
        assert keys == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    for ctx in grid.contexts.values():
        assert set(ctx.state.array_records[LAYERS_KEY].keys()) == {
            "net.5.weight",
            "net.5.bias",
        }
    rows = _results(cfg)
    assert all("client_personal_acc" in r for r in rows[1:])
    assert float(rows[-1]["client_personal_acc"]) > 0.5  # type: ignore[arg-type]


def test_ditto_reports_global_and_personal_accuracy(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "ditto",
        **{"personalization.mode": "ditto", "compression.codec": "q8"},
    )
    replies: list[Message] = []
    grid = _run(cfg, [capture_train_replies(replies)])
    assert all("personal-loss" in r.content.metric_records["metrics"] for r in replies)
    assert all(MODEL_KEY in ctx.state for ctx in grid.contexts.values())
    last = _results(cfg)[-1]
    assert last["client_eval_n"] == 4
    assert 0 < float(last["client_global_acc"]) <= 1  # type: ignore[arg-type]
    assert 0 < float(last["client_personal_acc"]) <= 1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [("compression.codec", "q8"), ("personalization.mode", "fedper")],
)
def test_baselines_refuse_client_features(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match="needs strategy.name='agent'"):
        RunConfig.from_flat({"strategy.name": "fedavg", key: value})


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        ("last", ("net.5.weight", "net.5.bias")),
        ("net.3, net.5.bias", ("net.3.weight", "net.3.bias", "net.5.bias")),
    ],
)
def test_personal_keys(spec: str, keys: tuple[str, ...]) -> None:
    names = [f"net.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")]
    assert personal_keys(names, spec) == keys


@pytest.mark.parametrize(("spec", "match"), [("head", "matches no"), ("net", "every")])
def test_personal_keys_refuses_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        personal_keys(["net.1.weight", "net.1.bias"], spec)


def test_policy_allocates_the_run_codec() -> None:
    obs = plain_train_obs(default_compression="topk")
    decision = guard(DeterministicPolicy(seed=0).decide(obs), obs).decision
    assert {a.compression for a in decision.allocations.values()} == {"topk"}
