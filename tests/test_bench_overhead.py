"""The round-overhead benchmark's paired (same-round) FedAvg accounting."""

from __future__ import annotations

import time
from typing import Any

import pytest

from experiments import bench_overhead as bo


def test_paired_summary_known_medians() -> None:
    rows = [
        {"round": 1, "server_s": 9.0, "paired_server_s": 1.0},  # round 1 left out
        *(
            {
                "round": r,
                "server_s": 0.21,
                "server_cpu_s": 0.20,
                "paired_server_s": 0.20,
                "paired_server_cpu_s": 0.20,
                "strategy_s": 0.03,
                "fedavg_strategy_s": 0.02,
                "fedavg_configure_s": 0.001,
                "fedavg_aggregate_s": 0.019,
            }
            for r in (2, 3, 4)
        ),
    ]

    got = bo.paired_summary([{"rounds": rows}])

    assert got["rounds"] == 3
    assert got["ratio_server"] == pytest.approx(1.05)
    assert got["ratio_server_per_round"] == pytest.approx(1.05)
    assert got["ratio_server_cpu"] == pytest.approx(1.0)
    assert got["extra_strategy_s"] == pytest.approx(0.01)
    assert bo.paired_summary([{"rounds": [{"round": 2, "server_s": 1.0}]}]) == {}


def test_shadow_time_inside_the_round_is_left_out_of_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int]] = []

    def slow(phase: str) -> Any:
        def fn(strategy: Any, server_round: int, *args: Any) -> None:
            calls.append((phase, server_round))
            time.sleep(0.02)

        return fn

    shadow = bo.Shadow()
    shadow.configure, shadow.aggregate = slow("configure"), slow("aggregate")
    shadow.reset(strategy=object())
    monkeypatch.setattr(bo, "SHADOW", shadow)
    clock = bo.Clock()
    monkeypatch.setattr(bo, "CLOCK", clock)

    rt = clock.begin(3)
    bo.SHADOW.run("aggregate", 3, [])  # inside the agent's round span
    rt.end = rt.start + 1.0
    bo.SHADOW.run("configure", 4, None)  # before round 4 begins: outside any span

    assert calls == [("aggregate", 3), ("configure", 4)]
    assert rt.shadow_in_span_s >= 0.02 and rt.shadow_in_span_s < 0.04
    assert rt.server_s == pytest.approx(1.0 - rt.shadow_in_span_s)
    assert shadow.times[4]["configure_s"] >= 0.02
    assert clock.current is rt  # restored after the shadow ran
