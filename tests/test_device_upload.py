"""Simulated upload time from the reply's real bytes, and deadlines judged on them.

Every device here is the median one (sigmas 0): 8 Mbit/s = 1e6 bytes per second, and
100 examples at 0.01 s each = 1 s of compute per epoch (``examples`` varies it). The
train message is 1e6 bytes (1 s down); a dense reply is 1e6 bytes (1 s up), an 8-bit
one 250 kB (0.25 s up).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)

from fl_server.device_grid import DeviceSimulator
from fl_server.metering import MeteredGrid, message_bytes
from orchestration.config import DevicesConfig

DOWN = 1_000_000
DENSE, Q8 = 1_000_000, 250_000


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages are built as by a server (as :class:`inprocess.InProcessGrid` does)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _sim(deadline: float = 0.0, partial: bool = False) -> DeviceSimulator:
    cfg = DevicesConfig(
        enabled=True,
        speed_sigma=0.0,
        bandwidth_median_mbps=8.0,
        bandwidth_sigma=0.0,
        example_cost_s=0.01,
        deadline_s=deadline,
        partial_work=partial,
    )
    return DeviceSimulator(cfg, seed=0, default_epochs=1)


def _train(node: int, codec: str = "none", epochs: int = 1, round_: int = 1) -> Message:
    conf = ConfigRecord(
        {"server-round": round_, "local-epochs": epochs, "compression": codec}
    )
    return Message(RecordDict({"config": conf}), message_type="train", dst_node_id=node)


class _Clients:
    """Answers train messages; a reply's size is set per node."""

    def __init__(self, up: dict[int, int]) -> None:
        self.up = up
        self.sent: list[Message] = []

    def send(self, ms: list[Message]) -> list[Message]:
        self.sent += ms
        out = []
        for m in ms:
            metrics = MetricRecord({"train-duration": 0.0})
            reply = Message(RecordDict({"metrics": metrics}), reply_to=m)
            out.append(reply)
        return out

    def bytes_of(self) -> Callable[[Message], int]:
        def size(m: Message) -> int:
            if m.metadata.reply_to_message_id or "metrics" in m.content:
                return self.up[m.metadata.src_node_id]
            return DOWN

        return size

    def dispatched(self) -> list[int]:
        return [m.metadata.dst_node_id for m in self.sent]


def _ok(replies: list[Message]) -> dict[int, float]:
    return {
        r.metadata.src_node_id: float(r.content["metrics"]["train-duration"])
        for r in replies
        if not r.has_error()
    }


def test_a_compressed_upload_shortens_the_client_and_the_round() -> None:
    sim = _sim()
    sim.nodes = {1: (0, 100), 2: (1, 100)}
    clients = _Clients({1: DENSE, 2: Q8})

    replies = sim.run_round(
        [_train(1), _train(2, "q8")], clients.bytes_of(), clients.send
    )

    # 1 s compute + 1 s down + (1 s | 0.25 s) up.
    assert _ok(replies) == pytest.approx({1: 3.0, 2: 2.25})
    assert sim.clock.timings[2].upload_s == pytest.approx(0.25)
    assert sim.clock.timings[2].comm_s == pytest.approx(2.0)  # the link, dense
    assert sim.clock.duration_s == pytest.approx(3.0)

    only_q8 = _sim()
    only_q8.nodes = {2: (1, 100)}
    only_q8.run_round([_train(2, "q8")], clients.bytes_of(), clients.send)
    assert only_q8.clock.duration_s == pytest.approx(2.25)


def test_the_deadline_is_judged_on_the_real_upload() -> None:
    sim = _sim(deadline=2.5)
    sim.nodes = {1: (0, 100), 2: (1, 100)}
    clients = _Clients({1: DENSE, 2: Q8})

    replies = sim.run_round(
        [_train(1), _train(2, "q8")], clients.bytes_of(), clients.send
    )

    # Both could make it with a small enough upload: both are dispatched. The
    # dense reply takes 3.0 s > 2.5 s: late; the 8-bit one 2.25 s: on time.
    assert clients.dispatched() == [1, 2]
    assert _ok(replies) == pytest.approx({2: 2.25})
    late = next(r for r in replies if r.has_error())
    assert late.metadata.src_node_id == 1
    assert "3.00s (upload 1000000 bytes) missed the deadline 2.50s" in (
        late.error.reason
    )
    assert sim.clock.late == {1: 2.5}
    assert sim.clock.timings[1].total_s == pytest.approx(3.0)
    assert sim.clock.duration_s == pytest.approx(2.5)  # waited for it until then


def test_a_client_certain_to_miss_is_not_dispatched() -> None:
    sim = _sim(deadline=2.5)
    sim.nodes = {1: (0, 100), 3: (2, 200)}  # node 3: 2 s of compute
    clients = _Clients({1: Q8, 3: Q8})

    replies = sim.run_round(
        [_train(1, "q8"), _train(3, "q8")], clients.bytes_of(), clients.send
    )

    # 2 s compute + 1 s down > 2.5 s whatever it uploads.
    assert clients.dispatched() == [1]
    assert _ok(replies) == pytest.approx({1: 2.25})
    assert sim.clock.late == {3: 2.5}
    assert "3.00s or more missed the deadline 2.50s" in next(
        r.error.reason for r in replies if r.has_error()
    )


def test_the_smallest_upload_measured_predicts_certain_misses() -> None:
    sim = _sim(deadline=2.3)
    sim.nodes = {1: (0, 100), 2: (1, 120), 3: (2, 120)}  # nodes 2, 3: 1.2 s compute
    clients = _Clients({1: Q8, 2: Q8, 3: DENSE})

    sim.run_round([_train(1, "q8")], clients.bytes_of(), clients.send)
    assert sim.smallest_upload == {("q8", DOWN): Q8}
    replies = sim.run_round(
        [_train(2, "q8", round_=2), _train(3, "none", round_=2)],
        clients.bytes_of(),
        clients.send,
    )

    # Node 2: 1.2 + 1 + 0.25 (the q8 upload measured) = 2.45 s > 2.3 s, not sent.
    # Node 3: no dense upload measured yet, 1.2 + 1 = 2.2 s might fit: sent, and
    # late on its real 1e6 bytes (3.2 s).
    assert clients.dispatched() == [1, 3]
    assert _ok(replies) == {}
    assert sim.clock.late == {2: 2.3, 3: 2.3}
    assert sim.clock.timings[3].total_s == pytest.approx(3.2)
    assert sim.smallest_upload[("none", DOWN)] == DENSE


def test_partial_work_fits_the_epochs_to_the_predicted_upload() -> None:
    sim = _sim(deadline=4.0, partial=True)
    sim.nodes = {1: (0, 100)}
    clients = _Clients({1: Q8})

    first = sim.run_round([_train(1, "q8", epochs=3)], clients.bytes_of(), clients.send)
    second = sim.run_round(
        [_train(1, "q8", epochs=3, round_=2)], clients.bytes_of(), clients.send
    )

    epochs = [int(m.content["config"]["local-epochs"]) for m in clients.sent]
    # Round 1, upload unknown, assumed dense: 3 + 2 = 5 s > 4 s; 2 epochs fit
    # (2 + 2 = 4 s); the real reply takes 2 + 1.25 = 3.25 s. Round 2 knows the
    # 0.25 s upload: 3 + 1.25 = 4.25 s > 4 s, still 2 epochs.
    assert epochs == [2, 2]
    assert _ok(first) == pytest.approx({1: 3.25})
    assert _ok(second) == pytest.approx({1: 3.25})
    assert sim.clock.shortened == {1: 2}


def test_metered_grid_times_the_reply_by_message_bytes() -> None:
    """Through MeteredGrid: the sizes are those of the messages' arrays."""
    sim = _sim()
    sim.nodes = {1: (0, 100), 2: (1, 100)}
    model = ArrayRecord({"w": Array(np.zeros(250_000, np.float32))})
    codes = ArrayRecord({"codes": Array(np.zeros(250_000, np.uint8))})

    class Inner:
        def send_and_receive(
            self, messages: list[Message], *, timeout: float | None = None
        ) -> list[Message]:
            out = []
            for m in messages:
                arrays = model if m.metadata.dst_node_id == 1 else codes
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord()})
                out.append(Message(content, reply_to=m))
            return out

    grid = MeteredGrid(Inner(), sim)  # type: ignore[arg-type]
    msgs = [
        Message(
            RecordDict({"arrays": model, "config": ConfigRecord({"server-round": 1})}),
            message_type="train",
            dst_node_id=n,
        )
        for n in (1, 2)
    ]

    list(grid.send_and_receive(msgs))

    down = message_bytes(msgs[0].content)
    up_q8 = message_bytes(RecordDict({"arrays": codes}))
    assert down > 1_000_000 and up_q8 > 250_000  # plus npy headers and keys
    t1, t2 = sim.clock.timings[1], sim.clock.timings[2]
    assert t1.total_s == pytest.approx(1.0 + 2 * down / 1e6)
    assert t2.total_s == pytest.approx(1.0 + (down + up_q8) / 1e6)
    assert grid.take_round().bytes_up == down + up_q8


def test_a_real_run_with_8_bit_uploads_is_shorter_by_the_bytes_saved(
    tmp_path: Path,
) -> None:
    """The real ClientApp in process: float32 vs q8 uploads on identical devices."""
    from inprocess import InProcessGrid

    from fl_client.client_app import make_client_app
    from fl_server.server_app import run_server
    from orchestration.config import RunConfig

    def run(codec: str) -> dict[str, float]:
        cfg = RunConfig.from_flat(
            {
                "dataset.name": "digits",
                "model.name": "mlp",
                "num_clients": 3,
                "clients_per_round": 3,
                "num_rounds": 1,
                "output_dir": str(tmp_path),
                "run_name": codec,
                "policy.name": "deterministic",
                "compression.codec": codec,
                "devices.enabled": True,
                "devices.speed_sigma": 0.0,
                "devices.bandwidth_sigma": 0.0,
                "devices.bandwidth_median_mbps": 0.08,  # 10 kB/s
            }
        )
        summary = run_server(InProcessGrid(make_client_app(cfg), 3), cfg)
        return {"sim": summary["sim_time_s"], "up": summary["bytes_up"]}

    dense, q8 = run("none"), run("q8")

    # Same devices and compute: the slowest client is the same one, and its round
    # is shorter by its upload saved, (bytes dense - bytes q8) / 3 clients / 1e4.
    saved_s = (dense["up"] - q8["up"]) / 3 / 1e4
    assert saved_s > 1.0
    assert dense["sim"] - q8["sim"] == pytest.approx(saved_s, rel=1e-3)
