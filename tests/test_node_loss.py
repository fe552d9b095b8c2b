"""Nodes that fail the roll call or go offline mid-run (agent strategy, in process)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from inprocess import InProcessGrid

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 4,
        "clients_per_round": 4,
        "min_replies": 2,
        "num_rounds": 5,
        "output_dir": str(tmp_path),
        "run_name": "run",
        "policy.name": "deterministic",
        "policy.exploration": 0.0,
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _results(cfg: RunConfig) -> list[dict[str, object]]:
    path = Path(cfg.output_dir) / cfg.run_name / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


class DyingGrid(InProcessGrid):
    """Partition ``victim`` dies in train round ``die_in``: no reply, then offline.

    With ``superlink_error`` the SuperLink answers for it (``NODE_UNAVAILABLE``, sent
    from the SuperLink's own id), as Flower does once the node's heartbeat lapses.
    """

    def __init__(self, *a: object, victim: int, die_in: int, superlink_error: bool):
        super().__init__(*a)  # type: ignore[arg-type]
        self.victim = next(n for n, p in self.nodes.items() if p == victim)
        self.die_in = die_in
        self.superlink_error = superlink_error
        self.train_rounds = 0
        self.dead = False
        self.count = 0

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.nodes if not (self.dead and n == self.victim)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:  # as Flower's grid: every pushed message gets an id
            self.count += 1
            m.metadata.__dict__["_message_id"] = f"msg-{self.count}"
        if any(m.metadata.message_type == "train" for m in messages):
            self.train_rounds += 1
            self.dead = self.dead or self.train_rounds == self.die_in
        lost = [
            m for m in messages if self.dead and m.metadata.dst_node_id == self.victim
        ]
        live = [m for m in messages if all(m is not x for x in lost)]
        self.sent.extend(lost)
        replies = list(super().send_and_receive(live, timeout=timeout))
        if self.superlink_error:
            for m in lost:
                err = Message(
                    Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"),
                    reply_to=m,
                )
                err.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(err)
        return replies


def _run(
    tmp_path: Path, superlink_error: bool
) -> tuple[DyingGrid, list[dict[str, object]]]:
    cfg = _cfg(tmp_path)
    grid = DyingGrid(
        make_client_app(cfg), 4, victim=2, die_in=2, superlink_error=superlink_error
    )
    summary = run_server(grid, cfg)
    assert summary["rounds"] == 5
    return grid, _results(cfg)


def _trained_per_round(grid: DyingGrid) -> list[set[int]]:
    rounds: dict[int, set[int]] = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            r = int(m.content.config_records["config"]["server-round"])
            rounds.setdefault(r, set()).add(grid.nodes[m.metadata.dst_node_id])
    return [rounds[r] for r in sorted(rounds)]


def test_a_node_dying_in_round_2_is_a_failure_then_left_out(tmp_path: Path) -> None:
    grid, rows = _run(tmp_path, superlink_error=False)

    assert [r["failures"] for r in rows[1:]] == [0, 1, 0, 0, 0]
    assert rows[2]["accepted"] == 3
    trained = _trained_per_round(grid)
    assert trained[1] == {0, 1, 2, 3}
    assert all(2 not in t for t in trained[2:])  # offline: not selected again
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]


def test_superlink_error_for_the_dead_node_is_mapped_to_its_client(
    tmp_path: Path, caplog: object
) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="agentfl.strategy")  # type: ignore[attr-defined]
    _, rows = _run(tmp_path, superlink_error=True)

    assert [r["failures"] for r in rows[1:]] == [0, 1, 0, 0, 0]
    text = caplog.text  # type: ignore[attr-defined]
    assert "client c2: client error: Node Unavailable" in text
    assert "unexpected node" not in text


def test_failed_roll_call_is_retried_with_backoff_not_every_round(
    tmp_path: Path,
) -> None:
    def no_query_on_3(
        msg: Message, ctx: Context, call_next: ClientAppCallable
    ) -> Message:
        if (
            msg.metadata.message_type == "query"
            and ctx.node_config["partition-id"] == 3
        ):
            raise RuntimeError("partition 3 has no data")
        return call_next(msg, ctx)

    cfg = _cfg(tmp_path, num_rounds=6)
    grid = InProcessGrid(make_client_app(cfg, mods=[no_query_on_3]), 4)

    run_server(grid, cfg)

    bad = next(n for n, p in grid.nodes.items() if p == 3)
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    # Rounds 1 and 3 (then 7): not in each of the 6 rounds.
    assert sum(m.metadata.dst_node_id == bad for m in queries) == 2
    assert len(queries) == 3 + 2
    assert all(r["selected"] == 3 for r in _results(cfg)[1:])
