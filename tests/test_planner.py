"""Monitor events, planner re-plans, and a planted divergence that is rolled back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from inprocess import InProcessGrid
from support.runs import SHORT

from agent_strategy import Decision, DeterministicPolicy, Observation
from fl_client.client_app import make_client_app
from fl_server.policy_setup import PolicySetup
from fl_server.server_app import _run_server
from orchestration.config import ConfigError, RunConfig
from orchestration.monitor import Monitor, Thresholds
from orchestration.planner import Planner, PlannerSettings, phase_of, replan
from orchestration.topics import MonitorEvent, RoundRecord, RoundReport


def _rep(
    r: int,
    acc: float,
    loss: float = 1.0,
    *,
    flagged: int = 0,
    failures: int = 0,
    nbytes: int = 0,
) -> RoundReport:
    rec = RoundRecord(
        r, acc, loss, 10, 10 - flagged, flagged, failures, "deterministic", 1.0,
        nbytes, 0,
    )  # fmt: skip
    return RoundReport(record=rec, num_rounds=50)


def _kinds(mon: Monitor, reports: list[RoundReport]) -> list[list[str]]:
    return [[e.kind for e in mon.observe(rep)] for rep in reports]


def _settings(**kw: object) -> PlannerSettings:
    base: dict[str, object] = dict(
        num_rounds=20,
        base_epochs=1,
        min_epochs=1,
        max_epochs=3,
        base_max_weight_share=0.5,
        base_weight_trust=3.0,
        base_exploration=0.2,
    )
    base.update(kw)
    return PlannerSettings(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- monitor
def test_monitor_divergence_on_nan_collapse_and_rising_loss() -> None:
    kinds = _kinds(Monitor(), [_rep(0, 0.1), _rep(1, 0.8), _rep(2, math.nan, math.nan)])
    assert kinds[-1] == ["divergence"]
    kinds = _kinds(Monitor(), [_rep(0, 0.1), _rep(1, 0.8), _rep(2, 0.5)])
    assert kinds[-1] == ["divergence"]  # 0.5 < 0.8 - 0.2
    losses = [0.5, 0.4, 0.5, 0.7, 0.9]
    reps = [_rep(i, 0.6, x) for i, x in enumerate(losses)]
    assert _kinds(Monitor(Thresholds(plateau_window=50)), reps)[-1] == ["divergence"]


def test_monitor_plateau_fires_once_per_window() -> None:
    mon = Monitor(Thresholds(plateau_window=3, plateau_delta=0.01))
    accs = [0.1, 0.5, 0.6, 0.601, 0.602, 0.603, 0.604, 0.605, 0.606]
    kinds = _kinds(mon, [_rep(i, a) for i, a in enumerate(accs)])
    fired = [i for i, k in enumerate(kinds) if "plateau" in k]
    assert fired == [5, 8]


def test_monitor_attack_storm_target_and_budget() -> None:
    t = Thresholds(target_accuracy=0.9, budget_bytes=100)
    mon = Monitor(t)
    mon.observe(_rep(0, 0.1))
    assert [e.kind for e in mon.observe(_rep(1, 0.5, flagged=4))] == [
        "suspected_attack"
    ]
    assert [e.kind for e in mon.observe(_rep(2, 0.6, failures=6))] == [
        "straggler_storm"
    ]
    assert [e.kind for e in mon.observe(_rep(3, 0.95, nbytes=150))] == [
        "target_reached",
        "budget_exhausted",
    ]
    assert mon.observe(_rep(4, 0.96, nbytes=150)) == []  # each fires once


# ---------------------------------------------------------------- planner
def test_phases_follow_the_round() -> None:
    s = _settings(warmup_rounds=2, finetune_rounds=3)
    assert [phase_of(r, s) for r in (1, 2, 3, 17, 18, 20)] == [
        "warmup",
        "warmup",
        "exploit",
        "exploit",
        "finetune",
        "finetune",
    ]


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("plateau", {"local_epochs": 2}),
        ("divergence", {"rollback_to": 4, "lr_scale": 0.5, "lr_cap": 1.0}),
        ("suspected_attack", {"weight_trust": 2.25, "max_weight_share": 0.375}),
        ("straggler_storm", {"local_epochs": 1}),
        ("target_reached", {"stop": True}),
        ("budget_exhausted", {"stop": True}),
    ],
)
def test_replan_per_event(kind: str, expect: dict[str, object]) -> None:
    p = Planner(_settings()).plan
    new = replan(p, MonitorEvent(round=6, kind=kind, value=0.0), _settings(), good=4)  # type: ignore[arg-type]
    for key, value in expect.items():
        assert getattr(new, key) == value
    assert new.reason == kind and new.since_round == 6 and new.replans == 1


def test_planner_limits_rollbacks_and_saves_its_state() -> None:
    planner = Planner(_settings(max_rollbacks=1))
    planner.on_round(_rep(1, 0.7))
    planner.on_event(MonitorEvent(round=2, kind="divergence", value=0.1))
    assert planner.take_rollback() == 1 and planner.take_rollback() is None
    planner.on_event(MonitorEvent(round=3, kind="divergence", value=0.1))
    assert planner.take_rollback() is None  # max_rollbacks reached: tighten only
    assert planner.plan.lr_scale == 0.25

    clone = Planner(_settings(max_rollbacks=1))
    clone.load_state_dict(json.loads(json.dumps(planner.state_dict())))
    assert clone.plan == planner.plan and clone.rollbacks == 1


def test_planner_phases_must_fit_the_run() -> None:
    with pytest.raises(ConfigError, match="warmup_rounds"):
        RunConfig.from_flat({"num_rounds": 4, "planner.warmup_rounds": 5})


# ---------------------------------------------------------------- planted divergence
class _BlowUp:
    """The deterministic policy, but lr=5 for every client from round 4 on."""

    name = "blowup"

    def __init__(self, inner: DeterministicPolicy, from_round: int) -> None:
        self.inner, self.from_round = inner, from_round
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        d = self.inner.decide(obs)
        if obs.phase == "train" and obs.round >= self.from_round:
            allocs = {
                c: a.model_copy(update={"lr": 5.0}) for c, a in d.allocations.items()
            }
            d = d.model_copy(update={"allocations": allocs})
        return d


def _planted(
    tmp_path: Path, planner: bool
) -> tuple[list[dict[str, float]], Path, _BlowUp]:
    cfg = RunConfig.from_flat(
        {
            **SHORT,
            "num_rounds": 7,
            "output_dir": str(tmp_path),
            "run_name": f"p{int(planner)}",
            "policy.lr_factor_max": 100.0,  # the guard lets lr=5 through
            "planner.enabled": planner,
        }
    )
    det = DeterministicPolicy(seed=0, exploration=0.2)
    policy = _BlowUp(det, from_round=4)
    grid = InProcessGrid(make_client_app(cfg), cfg.num_clients)
    _run_server(grid, cfg, PolicySetup(policy, det))  # type: ignore[arg-type]
    run_dir = tmp_path / cfg.run_name
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    return rows, run_dir, policy


def test_planted_divergence_is_rolled_back_and_the_run_recovers(
    tmp_path: Path,
) -> None:
    rows, run_dir, policy = _planted(tmp_path, planner=True)
    good = rows[3]["accuracy"]

    assert rows[4]["accuracy"] < good - 0.2  # lr=5 in round 4 blew the model up
    assert all(r["accuracy"] >= good - 0.05 for r in rows[5:])  # recovered
    events = [
        json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()
    ]
    assert {"type": "event", "round": 4, "kind": "divergence"}.items() <= events[
        0
    ].items()
    plan = events[1]
    assert plan["type"] == "plan" and plan["changes"]["rollback_to"] == 3
    assert plan["changes"]["lr_cap"] == 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["orchestration"]["planner"]["rollbacks"] == [{"round": 4, "to": 3}]
    # The policy saw the new plan and why: and its lr=5 was held to the new cap.
    later = [o for o in policy.seen if o.round >= 5]
    assert all(o.plan == "exploit-divergence" for o in later)
    assert all(o.plan_reason == "divergence" and o.plan_since_round == 4 for o in later)
    assert all(o.limits.lr_max <= 0.05 for o in later if o.phase == "train")

    control, _, _ = _planted(tmp_path, planner=False)
    assert control[-1]["accuracy"] < good - 0.2  # without the planner: no recovery


def test_target_reached_stops_the_run_early_with_a_complete_summary(
    tmp_path: Path,
) -> None:
    cfg = RunConfig.from_flat(
        {
            **SHORT,
            "num_rounds": 6,
            "output_dir": str(tmp_path),
            "run_name": "t",
            "planner.enabled": True,
            "planner.target_accuracy": 0.6,
        }
    )
    from fl_server.server_app import run_server

    summary = run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)

    rows = [
        json.loads(x)
        for x in (tmp_path / "t" / "results.jsonl").read_text().splitlines()
    ]
    assert summary["stopped_early"] == "target_reached"
    assert rows[-1]["accuracy"] >= 0.6 > max(r["accuracy"] for r in rows[:-1])
    assert summary["rounds"] == rows[-1]["round"] < 6
    assert (tmp_path / "t" / "model.pt").exists()
