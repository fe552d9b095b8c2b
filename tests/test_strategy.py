"""The agent strategy end to end on the real ClientApp, in process (no Ray)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from inprocess import InProcessGrid
from support.runs import same_model

from agent_strategy import Decision, Observation
from fl_client.client_app import make_client_app
from fl_server.server_app import build_strategy, run_server
from fl_server.strategy import AgentStrategy, RoundFailedError
from orchestration.config import RunConfig


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 6,
        "clients_per_round": 4,
        "num_rounds": 3,
        "output_dir": str(tmp_path),
        "run_name": "run",
        "train.lr": 0.05,
        "policy.name": "deterministic",
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _fail_mod(pids: set[int], kind: str):  # type: ignore[no-untyped-def]
    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        pid = int(ctx.node_config["partition-id"])
        if msg.metadata.message_type != "train" or pid not in pids:
            return call_next(msg, ctx)
        if kind == "raise":
            raise RuntimeError(f"client {pid} crashed")
        if kind == "error":
            return Message(
                Error(code=0, reason=f"client {pid} is broken"), reply_to=msg
            )
        reply = call_next(msg, ctx)
        arrays = reply.content["arrays"]
        # The same keys, shapes and dtypes: only the values are bad.
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}
        )
        return reply

    return mod


def _results(cfg: RunConfig) -> list[dict[str, object]]:
    path = Path(cfg.output_dir) / cfg.run_name / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_agent_run_learns_and_writes_results(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)

    summary = run_server(grid, cfg)

    rows = _results(cfg)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(r["selected"] == 4 and r["accepted"] == 4 for r in rows[1:])
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    run_dir = tmp_path / "run"
    assert (run_dir / "model.pt").exists()
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["flwr"] == "1.42.0" and env["git_revision"]
    decisions = [
        json.loads(x) for x in (run_dir / "decisions.jsonl").read_text().splitlines()
    ]
    assert [(d["round"], d["phase"]) for d in decisions] == [
        (r, p) for r in (1, 2, 3) for p in ("train", "aggregate")
    ]
    assert all(d["source"] == "deterministic" for d in decisions)
    # Each aggregate decision carries the features it was decided on: one per
    # reply, with the server's update norm, and the train decisions none.
    for d in decisions:
        if d["phase"] == "train":
            assert "replies" not in d
            continue
        ids = [r["id"] for r in d["replies"]]
        assert sorted(ids) == sorted(d["decision"]["weights"]) and len(ids) == 4
        assert all(r["update_norm"] > 0 and r["num_examples"] > 0 for r in d["replies"])


@pytest.mark.parametrize("kind", ["raise", "error", "nan"])
def test_a_bad_client_is_counted_and_the_round_goes_on(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, clients_per_round=6)
    grid = InProcessGrid(make_client_app(cfg, mods=[_fail_mod({0}, kind)]), 6)

    run_server(grid, cfg)

    rows = _results(cfg)
    assert all(r["failures"] == 1 and r["accepted"] == 5 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    if kind == "nan":  # rejected by the norms' finiteness check, array named
        rejections = [
            r.getMessage()
            for r in caplog.records
            if "client c0: rejected: array" in r.getMessage()
        ]
        assert len(rejections) == 3 and "has non-finite values" in rejections[0]


def test_too_few_replies_stop_the_run_naming_the_failures(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, clients_per_round=6, min_replies=3)
    grid = InProcessGrid(
        make_client_app(cfg, mods=[_fail_mod({0, 1, 2, 3}, "raise")]), 6
    )

    with pytest.raises(
        RoundFailedError, match=r"in a row failed.*round 3: only 2 usable replies.*c0: "
    ):
        run_server(grid, cfg)


class _Raising:
    name = "raising"

    def decide(self, obs: Observation) -> Decision:
        raise TimeoutError("the model took too long")


class _Lying:
    name = "lying"

    def decide(self, obs: Observation) -> Decision:
        return Decision.model_construct(
            selected=("c99", "c0", "c0"),
            allocations={},
            weights={"c0": float("nan"), "c1": -1e9, "c42": 1e30},
            flags=(),
            rationale="trust me",
            source="llm",
        )


def test_a_raising_policy_falls_back_every_round(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    grid = InProcessGrid(make_client_app(cfg), 6)
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    strategy.policy = _Raising()

    arrays = _initial(cfg)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=2)

    assert strategy.total_fallbacks == 4
    log = [
        json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()
    ]
    assert {d["source"] for d in log} == {"fallback"}
    assert all("TimeoutError" in d["fallback_reason"] for d in log)


def test_a_lying_policy_is_contained_by_the_guard(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    grid = InProcessGrid(make_client_app(cfg), 6)
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    strategy.policy = _Lying()

    result = strategy.start(grid=grid, initial_arrays=_initial(cfg), num_rounds=2)

    vec = np.concatenate([a.ravel() for a in result.arrays.to_numpy_ndarrays()])
    assert np.all(np.isfinite(vec))
    log = [
        json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()
    ]
    train = [d for d in log if d["phase"] == "train"]
    assert all(d["decision"]["selected"][0] == "c0" for d in train)
    assert all(len(d["decision"]["selected"]) >= cfg.min_replies for d in train)
    assert all(any("ineligible c99" in c for c in d["guard_changes"]) for d in train)


def _initial(cfg: RunConfig) -> ArrayRecord:
    from fl_client.task import build_model, load_dataset

    d = load_dataset(cfg.dataset.name)
    return ArrayRecord(build_model(cfg.model.name, d.input_shape, 10).state_dict())


def test_no_client_answering_the_roll_call_is_a_clear_error(tmp_path: Path) -> None:
    def no_query(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == "query":
            raise RuntimeError("no partition here")
        return call_next(msg, ctx)

    cfg = _cfg(tmp_path)
    grid = InProcessGrid(make_client_app(cfg, mods=[no_query]), 6)

    with pytest.raises(RoundFailedError, match="0 clients answered the roll call"):
        run_server(grid, cfg)


def test_the_global_model_is_decoded_again_only_for_a_new_record(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, clients_per_round=6)
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    first = _initial(cfg)
    replies = grid.send_and_receive(
        strategy.configure_train(1, first, ConfigRecord(), grid)
    )
    returned, _ = strategy.aggregate_train(1, replies)
    assert returned is not None
    decoded = np.concatenate([a.ravel() for a in returned.to_numpy_ndarrays()])
    # Flower hands the returned record back: the cached vector is that record.
    list(strategy.configure_train(2, returned, ConfigRecord(), grid))
    assert strategy._global is not None
    np.testing.assert_array_equal(strategy._global, decoded)
    # A different record (a caller's own) is decoded, not ignored.
    zeros = ArrayRecord([np.zeros_like(a) for a in returned.to_numpy_ndarrays()])
    list(strategy.configure_train(3, zeros, ConfigRecord(), grid))
    assert not np.any(strategy._global)


class _LateNodes(InProcessGrid):
    """Nodes that connect one by one, as SuperNodes started after the run."""

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.polls = 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(self.nodes)[: self.polls]


def test_the_strategy_waits_for_late_nodes_then_runs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, num_rounds=1, min_replies=3)
    grid = _LateNodes(make_client_app(cfg), cfg.num_clients)
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    strategy.node_poll_s = 0.01

    messages = list(strategy.configure_train(1, _initial(cfg), ConfigRecord(), grid))

    assert grid.polls == 3  # 1, 2, then 3 nodes connected: enough
    assert len(messages) == 3


def test_waiting_for_nodes_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, num_rounds=1, min_replies=3)
    grid = InProcessGrid(make_client_app(cfg), 2)  # only 2 nodes ever
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    strategy.node_poll_s, strategy.roll_call_timeout_s = 0.01, 0.2

    with pytest.raises(RoundFailedError, match="fewer than min_replies=3"):
        strategy.configure_train(1, _initial(cfg), ConfigRecord(), grid)
    assert any(
        "2 node(s) connected after 0 s, fewer than min_replies=3" in r.getMessage()
        for r in caplog.records
    )


class _ReversedGrid(InProcessGrid):
    """Hands the round's replies back last first (another arrival order)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(super().send_and_receive(messages, timeout=timeout))[::-1]


def test_the_aggregate_does_not_depend_on_the_replies_arrival_order(
    tmp_path: Path,
) -> None:
    # Rows are filled in client-id order whatever the arrival order, so a run is
    # bitwise the same when its replies arrive in another order.
    a = _cfg(tmp_path, run_name="in-order")
    b = _cfg(tmp_path, run_name="reversed")
    run_server(InProcessGrid(make_client_app(a), a.num_clients), a)
    run_server(_ReversedGrid(make_client_app(b), b.num_clients), b)

    assert same_model(
        tmp_path / "in-order" / "model.pt", tmp_path / "reversed" / "model.pt"
    )
    assert [r["accuracy"] for r in _results(a)] == [r["accuracy"] for r in _results(b)]
