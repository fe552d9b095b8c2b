"""The comm hub: typed routing, backpressure policies, counters, isolation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from inprocess import InProcessGrid
from support.runs import SHORT

from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import RunConfig
from orchestration.hub import Hub
from orchestration.topics import MonitorEvent, RoundRecord, RoundReport


def _report(r: int) -> RoundReport:
    rec = RoundRecord(r, 0.5, 1.0, 3, 3, 0, 0, "deterministic", 0.1, 10, 10)
    return RoundReport(record=rec, num_rounds=100)


def test_messages_are_routed_by_type_in_order() -> None:
    hub = Hub()
    reports: list[int] = []
    events: list[str] = []
    hub.subscribe(
        RoundReport, lambda m: reports.append(m.round), name="r", delivery="inline"
    )
    hub.subscribe(
        MonitorEvent, lambda m: events.append(m.kind), name="e", delivery="block"
    )

    for r in range(5):
        hub.publish(_report(r))
    hub.publish(MonitorEvent(round=4, kind="plateau", value=0.0))
    assert hub.drain(timeout=5)

    assert reports == [0, 1, 2, 3, 4] and events == ["plateau"]
    stats = hub.stats()
    assert stats["published"] == {"RoundReport": 5, "MonitorEvent": 1}
    assert stats["subscribers"]["r"]["delivered"] == 5
    hub.close()


def test_slow_drop_oldest_subscriber_never_blocks_the_publisher() -> None:
    hub = Hub(maxsize=4)
    release = threading.Event()
    seen: list[int] = []

    def slow(m: RoundReport) -> None:
        release.wait(5)
        seen.append(m.round)

    hub.subscribe(RoundReport, slow, name="slow", delivery="drop_oldest")
    t0 = time.perf_counter()
    for r in range(200):
        hub.publish(_report(r))
    publish_s = time.perf_counter() - t0
    release.set()
    assert hub.drain(timeout=5)

    s = hub.stats()["subscribers"]["slow"]
    assert publish_s < 1.0  # the handler blocks for up to 5 s per message
    assert s["offered"] == 200
    assert s["dropped"] == 200 - s["delivered"] > 150
    assert seen[-1] == 199  # the newest survive, the oldest are dropped
    hub.close()


def test_block_subscriber_loses_nothing_and_counts_waiting() -> None:
    hub = Hub(maxsize=2)
    seen: list[int] = []

    def slowish(m: RoundReport) -> None:
        time.sleep(0.01)
        seen.append(m.round)

    hub.subscribe(RoundReport, slowish, name="b", delivery="block")
    for r in range(20):
        hub.publish(_report(r))
    hub.close()

    s = hub.stats()["subscribers"]["b"]
    assert seen == list(range(20)) and s["dropped"] == 0
    assert s["max_depth"] <= 2 and s["publisher_blocked_s"] > 0


def test_a_failing_subscriber_is_counted_and_does_not_reach_the_publisher() -> None:
    hub = Hub()
    ok: list[int] = []

    def boom(m: RoundReport) -> None:
        raise RuntimeError("subscriber bug")

    hub.subscribe(RoundReport, boom, name="boom", delivery="inline")
    hub.subscribe(
        RoundReport, lambda m: ok.append(m.round), name="ok", delivery="inline"
    )
    hub.publish(_report(1))

    assert ok == [1]
    assert hub.stats()["subscribers"]["boom"]["errors"] == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"delivery": "sometimes"}, "delivery"), ({"maxsize": 0}, "maxsize")],
)
def test_bad_subscription_names_the_setting(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Hub().subscribe(RoundReport, print, name="x", **kw)  # type: ignore[arg-type]


def test_a_slow_logger_in_a_real_run_is_dropped_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logger stuck until the last round: training goes on, its backlog is dropped."""
    from orchestration import session as session_mod

    original = session_mod.RunSession.wire
    release = threading.Event()

    def on_report(m: RoundReport) -> None:
        if m.round == 3:
            release.set()

    def wire(self: session_mod.RunSession, recorder: object) -> None:
        original(self, recorder)  # type: ignore[arg-type]
        self.hub.subscribe(
            RoundReport,
            lambda m: release.wait(60),
            name="slow-logger",
            delivery="drop_oldest",
            maxsize=1,
        )
        self.hub.subscribe(RoundReport, on_report, name="last", delivery="inline")

    monkeypatch.setattr(session_mod.RunSession, "wire", wire)
    cfg = RunConfig.from_flat(
        {**SHORT, "num_rounds": 3, "output_dir": str(tmp_path), "run_name": "r"}
    )
    summary = run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)

    hub = summary["orchestration"]["hub"]  # type: ignore[index]
    slow = hub["subscribers"]["slow-logger"]
    # Round 0's report blocks the logger until round 3 is reported: rounds 1-3
    # arrived meanwhile, the queue holds one, so two were dropped.
    assert slow["offered"] == 4 and slow["dropped"] == 2 and slow["delivered"] == 2
    assert slow["publisher_blocked_s"] == 0.0
    assert summary["rounds"] == 3
    assert hub["subscribers"]["results"]["delivered"] == 4
