"""Simulated devices end to end on the real ClientApp, in process (no Ray).

Speeds are drawn log-normally from the seed; bandwidth is made huge so a client's
simulated time is ``examples x epochs x example_cost_s / speed``, and the deadline is
put between the slowest client and the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessGrid

from fl_client.client_app import make_client_app
from fl_client.task import split_for
from fl_server.devices import draw_profile, drops_out
from fl_server.server_app import run_server
from orchestration.config import RunConfig

COST = 0.01


def _cfg(tmp_path: Path, strategy: str, **kw: object) -> RunConfig:
    flat: dict[str, object] = {
        "dataset.name": "digits",
        "model.name": "mlp",
        "num_clients": 4,
        "clients_per_round": 4,
        "num_rounds": 2,
        "output_dir": str(tmp_path),
        "run_name": strategy,
        "strategy.name": strategy,
        "policy.name": "deterministic",
        "policy.exploration": 0.0,
        "devices.enabled": True,
        "devices.speed_sigma": 1.0,
        "devices.bandwidth_median_mbps": 1e9,
        "devices.bandwidth_sigma": 0.0,
        "devices.example_cost_s": COST,
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def _compute_s(cfg: RunConfig) -> dict[int, float]:
    """Simulated compute seconds of one epoch per partition id."""
    clients, _ = split_for(cfg)
    out = {}
    for pid, split in enumerate(clients):
        speed = draw_profile(
            cfg.seed,
            pid,
            speed_sigma=cfg.devices.speed_sigma,
            bandwidth_median_bps=1.0,
            bandwidth_sigma=0.0,
        ).speed
        out[pid] = len(split.train.y) * COST / speed
    return out


def _rows(cfg: RunConfig) -> list[dict[str, Any]]:
    path = Path(cfg.output_dir) / cfg.run_name / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(cfg: RunConfig) -> tuple[InProcessGrid, dict[str, Any], list[dict[str, Any]]]:
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)
    summary = run_server(grid, cfg)
    return grid, summary, _rows(cfg)


def _trained(grid: InProcessGrid) -> list[tuple[int, int]]:
    """(partition id, local epochs) of every train message the clients got."""
    return [
        (
            grid.nodes[m.metadata.dst_node_id],
            int(m.content.config_records["config"]["local-epochs"]),
        )
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]


def _split_deadline(cfg: RunConfig, epochs: int = 1) -> tuple[int, float, float]:
    """The slowest client and a deadline between it and the next slowest."""
    t = {p: s * epochs for p, s in _compute_s(cfg).items()}
    order = sorted(t, key=lambda p: t[p])
    slow, second = order[-1], order[-2]
    assert t[slow] > 1.2 * t[second], "seed gives no clear straggler"
    return slow, (t[slow] + t[second]) / 2, t[second]


@pytest.mark.parametrize("strategy", ["agent", "fedavg"])
def test_deadline_drops_the_late_client_and_the_round_aggregates(
    tmp_path: Path, strategy: str
) -> None:
    probe = _cfg(tmp_path, strategy)
    slow, deadline, second = _split_deadline(probe)
    cfg = _cfg(tmp_path, strategy, **{"devices.deadline_s": deadline})

    grid, summary, rows = _run(cfg)

    assert slow not in {p for p, _ in _trained(grid)}  # never dispatched
    assert len(_trained(grid)) == 2 * 3
    for r in rows[1:]:
        assert r["accepted"] == 3 and r["failures"] == 1
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1
    # Each round waited for the straggler until the deadline.
    assert [r["sim_time_s"] for r in rows] == pytest.approx(
        [0.0, deadline, 2 * deadline], rel=1e-3
    )
    assert summary["sim_time_s"] == pytest.approx(2 * deadline, rel=1e-3)


def test_without_a_straggler_the_round_lasts_as_long_as_the_slowest(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "fedavg", num_rounds=1)
    slowest = max(_compute_s(cfg).values())

    _, _, rows = _run(cfg)

    assert rows[1]["accepted"] == 4
    assert rows[1]["sim_time_s"] == pytest.approx(slowest, rel=1e-3)


def test_agent_gives_the_late_client_fewer_epochs_next_round(tmp_path: Path) -> None:
    probe = _cfg(tmp_path, "agent", **{"train.local_epochs": 2})
    one_epoch = _compute_s(probe)
    slow = max(one_epoch, key=lambda p: one_epoch[p])
    others = max(v for p, v in one_epoch.items() if p != slow)
    # Two epochs of the slow client miss the deadline; one fits, as do others' two.
    deadline = max(1.5 * one_epoch[slow], 2.2 * others)
    assert deadline < 2 * one_epoch[slow], "seed gives no clear straggler"
    cfg = _cfg(
        tmp_path,
        "agent",
        **{"train.local_epochs": 2, "devices.deadline_s": deadline},
    )

    grid, _, rows = _run(cfg)

    sent = _trained(grid)
    # Round 1: late at 2 epochs, not dispatched; round 2: allocated one epoch.
    assert sorted(p for p, _ in sent[:3]) == sorted(set(range(4)) - {slow})
    assert (slow, 2) not in sent and sent[3:].count((slow, 1)) == 1
    assert rows[1]["accepted"] == 3 and rows[2]["accepted"] == 4
    decisions = [
        json.loads(x)
        for x in (Path(cfg.output_dir) / "agent" / "decisions.jsonl")
        .read_text()
        .splitlines()
    ]
    alloc = decisions[2]["decision"]["allocations"]
    assert decisions[2]["phase"] == "train" and decisions[2]["round"] == 2
    assert alloc[f"c{slow}"]["local_epochs"] == 1
    assert all(a["local_epochs"] == 2 for c, a in alloc.items() if c != f"c{slow}")


def test_partial_work_trains_the_epochs_that_fit(tmp_path: Path) -> None:
    probe = _cfg(tmp_path, "fedavg", **{"train.local_epochs": 3})
    one_epoch = _compute_s(probe)
    slow = max(one_epoch, key=lambda p: one_epoch[p])
    others = max(v for p, v in one_epoch.items() if p != slow)
    deadline = max(1.2 * one_epoch[slow], 3.1 * others)
    assert deadline < 2 * one_epoch[slow], "seed gives no clear straggler"
    cfg = _cfg(
        tmp_path,
        "fedavg",
        num_rounds=1,
        **{
            "train.local_epochs": 3,
            "devices.deadline_s": deadline,
            "devices.partial_work": True,
        },
    )

    grid, _, rows = _run(cfg)

    assert sorted(_trained(grid)) == sorted(
        [(p, 1 if p == slow else 3) for p in range(4)]
    )
    assert rows[1]["accepted"] == 4
    # Nobody missed the deadline: the round ends with the slowest reply.
    assert rows[1]["sim_time_s"] == pytest.approx(
        max(one_epoch[slow], 3 * others), rel=1e-3
    )


def test_dropouts_are_the_seeded_ones_and_do_not_hold_the_round(
    tmp_path: Path,
) -> None:
    def gone_in(seed: int) -> dict[int, set[int]]:
        return {
            r: {p for p in range(4) if drops_out(seed, r, p, 0.4)} for r in (1, 2, 3)
        }

    # The first seed whose rounds each lose one or two of the four clients.
    seed = next(
        s for s in range(50) if all(1 <= len(g) <= 2 for g in gone_in(s).values())
    )
    gone = gone_in(seed)
    cfg = _cfg(tmp_path, "fedavg", seed=seed, num_rounds=3, **{"devices.dropout": 0.4})

    grid, _, rows = _run(cfg)

    sent = [p for p, _ in _trained(grid)]
    dispatched = [set(range(4)) - gone[r] for r in (1, 2, 3)]
    sizes = [len(d) for d in dispatched]
    assert set(sent[: sizes[0]]) == dispatched[0]
    assert sorted(sent) == sorted(p for d in dispatched for p in d)
    compute = _compute_s(cfg)
    clock = 0.0
    for r in (1, 2, 3):
        assert rows[r]["failures"] == len(gone[r])
        clock += max(compute[p] for p in dispatched[r - 1])
        assert rows[r]["sim_time_s"] == pytest.approx(clock, rel=1e-3)


def test_a_strategy_may_ask_for_a_shorter_deadline_never_a_longer_one() -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fl_server.device_grid import DeviceSimulator
    from orchestration.config import DevicesConfig

    cfg = DevicesConfig(
        enabled=True,
        speed_sigma=0.0,
        bandwidth_median_mbps=1e9,
        bandwidth_sigma=0.0,
        example_cost_s=0.1,
        deadline_s=10.0,
    )
    sim = DeviceSimulator(cfg, seed=0, default_epochs=1)
    sim.nodes = {1: (0, 50), 2: (1, 50), 3: (2, 50)}  # 5 s of compute each

    def msg(node: int, deadline: float | None) -> Message:
        conf = ConfigRecord({"server-round": 1, "local-epochs": 1})
        if deadline is not None:
            conf["deadline-s"] = deadline
        content = RecordDict({"config": conf})
        return Message(content, message_type="train", dst_node_id=node)

    def send(ms: list[Message]) -> list[Message]:
        metrics = MetricRecord({"train-duration": 0.0})
        return [Message(RecordDict({"metrics": metrics}), reply_to=m) for m in ms]

    replies = sim.run_round(
        [msg(1, None), msg(2, 4.0), msg(3, 50.0)], lambda m: 0, send
    )

    ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
    assert ok == {1, 3}  # node 2 asked for 4 s and needs 5 s
    assert sim.clock.late == {2: 4.0}
    assert sim.clock.duration_s == pytest.approx(5.0)
