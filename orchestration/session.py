"""Run-loop glue: wires the hub, monitor, planner, checkpointer and loggers.

One :class:`RunSession` per server run. The round recorder publishes a
``RoundReport`` per round; everything else here is a hub subscriber, called in this
order (all ``inline`` except the loggers, so that the next round starts only after
the results line, the plan and the checkpoint of this round exist):

1. ``results``      -> ``results.jsonl``
2. ``monitor``      -> ``MonitorEvent`` values (published; ``events.jsonl``)
3. ``planner``      -> re-plans on events, moves phases, applies the plan to the
                       strategy, loads the model of a rollback; ``PlanChange`` values
4. ``checkpointer`` -> ``checkpoints/ckpt-<round>.bin`` (``CheckpointSaved``)
5. ``console`` (queued, block), ``tensorboard`` (queued, drop_oldest)

:meth:`RunSession.begin` starts a new run or, with ``resume=<run dir>``, restores the
latest valid checkpoint and returns the round to continue after.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from agent_strategy import DeterministicPolicy
from fl_server.results import ResultsWriter, RoundRecorder
from fl_server.state import (
    LLMState,
    RngState,
    StrategyState,
    arrays_to_numpy,
    numpy_to_arrays,
)
from fl_server.strategy import AgentStrategy

from .checkpoint import (
    Checkpointer,
    CheckpointError,
    config_mismatch,
    write_atomic,
)
from .config import ConfigError, RunConfig
from .hub import Hub
from .loggers import ConsoleProgress, EventLog, TensorBoardScalars
from .monitor import Monitor, Thresholds
from .planner import Plan, Planner, PlannerSettings
from .topics import CheckpointSaved, MonitorEvent, PlanChange, RoundReport

if TYPE_CHECKING:
    from agent_strategy.llm import LLMPolicy

log = logging.getLogger("agentfl.session")

#: Test hook: SIGKILL this process after the train replies of this round arrived.
KILL_ENV = "AGENTFL_TEST_KILL_IN_ROUND"


def resume_dir(cfg: RunConfig) -> Path:
    """Return the run directory named by ``resume``, checked.

    Raises
    ------
    ConfigError
        If it is not a directory holding ``checkpoints/``.
    """
    path = Path(cfg.resume).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"config key 'resume': {cfg.resume!r} is not a directory")
    if not (path / "checkpoints").is_dir():
        raise ConfigError(
            f"config key 'resume': {cfg.resume!r} holds no checkpoints/ directory "
            "(was it written with checkpoint.enabled=true?)"
        )
    return path


class RunSession:
    """The orchestration of one server run (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        strategy: object,
        llm: LLMPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.strategy = strategy
        self.agent = strategy if isinstance(strategy, AgentStrategy) else None
        self.llm = llm
        self.hub = Hub(cfg.hub.queue_size)
        pl = cfg.planner
        self.monitor = Monitor(
            Thresholds(
                plateau_window=pl.plateau_window,
                plateau_delta=pl.plateau_delta,
                divergence_window=pl.divergence_window,
                collapse_drop=pl.collapse_drop,
                attack_flag_share=pl.attack_flag_share,
                storm_failure_share=pl.storm_failure_share,
                target_accuracy=pl.target_accuracy,
                budget_bytes=pl.budget_bytes,
                budget_llm_cost_usd=pl.budget_llm_cost_usd,
                budget_wall_s=pl.budget_wall_s,
            )
        )
        self.planner: Planner | None = None
        if pl.enabled and self.agent is not None:
            a = self.agent
            self.planner = Planner(
                PlannerSettings(
                    num_rounds=cfg.num_rounds,
                    base_epochs=a.local_epochs,
                    min_epochs=a.limits.min_epochs,
                    max_epochs=a.limits.max_epochs,
                    base_max_weight_share=a.limits.max_weight_share,
                    base_weight_trust=a.limits.weight_trust,
                    base_exploration=cfg.policy.exploration,
                    warmup_rounds=pl.warmup_rounds,
                    finetune_rounds=pl.finetune_rounds,
                    lr_backoff=pl.lr_backoff,
                    max_rollbacks=pl.max_rollbacks,
                )
            )
            self._base = (a.lr, a.limits)
        self.checkpointer: Checkpointer | None = None
        if cfg.checkpoint.enabled:
            self.checkpointer = Checkpointer(
                run_dir / "checkpoints", cfg.checkpoint.keep, config=cfg.to_flat()
            )
        self.stop_reason: str | None = None
        self.resume_s: float | None = None
        self.rollbacks: list[dict[str, int]] = []
        self._best_arrays: ArrayRecord | None = None
        self._tensorboard: TensorBoardScalars | None = None
        self._kill_round = int(os.environ.get(KILL_ENV, "0") or 0)

    # ------------------------------------------------------------------ wiring
    def wire(self, recorder: RoundRecorder) -> None:
        """Register the checkpoint parts and subscribe every component."""
        ck, hub = self.checkpointer, self.hub
        if ck is not None:
            ck.register("results", recorder)
            ck.register("monitor", self.monitor)
            ck.register("rng", RngState())
            if self.agent is not None:
                ck.register("strategy", StrategyState(self.agent))
            if self.llm is not None:
                ck.register("llm", LLMState(self.llm))
            if self.planner is not None:
                ck.register("planner", self.planner)
                ck.pin(self.planner.pinned_rounds)
        events = EventLog(self.run_dir / "events.jsonl")
        hub.subscribe(
            RoundReport,
            ResultsWriter(self.run_dir / "results.jsonl"),
            name="results",
            delivery="inline",
        )
        hub.subscribe(RoundReport, self._on_report, name="monitor", delivery="inline")
        hub.subscribe(MonitorEvent, events, name="event-log", delivery="inline")
        hub.subscribe(PlanChange, events, name="plan-log", delivery="inline")
        if self.planner is not None:
            hub.subscribe(
                MonitorEvent, self._on_event, name="planner", delivery="inline"
            )
            hub.subscribe(
                RoundReport, self._on_round, name="planner-rounds", delivery="inline"
            )
        if ck is not None:
            hub.subscribe(
                RoundReport, self._checkpoint, name="checkpointer", delivery="inline"
            )
        hub.subscribe(RoundReport, ConsoleProgress(), name="console", delivery="block")
        if self.cfg.hub.tensorboard:
            self._tensorboard = TensorBoardScalars(self.run_dir / "tensorboard")
            hub.subscribe(
                RoundReport,
                self._tensorboard,
                name="tensorboard",
                delivery="drop_oldest",
            )
        if self.agent is not None and self.planner is not None:
            self._apply(self.planner.plan)

    # ------------------------------------------------------------ start/resume
    def begin(self, initial: ArrayRecord) -> tuple[int, ArrayRecord]:
        """Return ``(rounds already done, model to continue from)``.

        A new run removes stale output files. ``resume`` restores every registered
        part from the newest valid checkpoint, rewrites ``results.jsonl`` from it,
        cuts ``decisions.jsonl`` and ``events.jsonl`` after its round and hands the
        cut decisions to the strategy for replay (the LLM is not asked again).

        Raises
        ------
        CheckpointError
            No valid checkpoint, or one written under a different config.
        """
        t0 = time.perf_counter()
        files = ("results.jsonl", "decisions.jsonl", "events.jsonl")
        if not self.cfg.resume:
            for name in files:
                (self.run_dir / name).unlink(missing_ok=True)
            return 0, initial
        if self.checkpointer is None:
            raise ConfigError("resume needs checkpoint.enabled=true")
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            raise CheckpointError(
                f"resume={self.cfg.resume}: no valid checkpoint in "
                f"{self.checkpointer.directory}"
            )
        diff = config_mismatch(ckpt.config, self.cfg.to_flat())
        if diff:
            raise CheckpointError(
                f"resume={self.cfg.resume}: the checkpoint of round {ckpt.round} was "
                "written under another config; differing keys: " + "; ".join(diff)
            )
        self.checkpointer.restore(ckpt)
        r = ckpt.round
        recorder = self.checkpointer.parts["results"]
        if not isinstance(recorder, RoundRecorder):  # pragma: no cover - wire() sets it
            raise TypeError("the results part is not the round recorder")
        write_atomic(
            self.run_dir / "results.jsonl",
            "".join(json.dumps(r.as_dict()) + "\n" for r in recorder.records).encode(),
        )
        later = _cut_jsonl(self.run_dir / "decisions.jsonl", r)
        _cut_jsonl(self.run_dir / "events.jsonl", r)
        if self.agent is not None:
            self.agent.replay = {(e["round"], e["phase"]): e for e in later}
        if self.planner is not None:
            self._apply(self.planner.plan)
        self.resume_s = time.perf_counter() - t0
        log.info(
            "resuming %s after round %d of %d (checkpoint %s restored in %.3fs; %d "
            "logged decisions to replay)",
            self.run_dir,
            r,
            self.cfg.num_rounds,
            ckpt.path,
            self.resume_s,
            len(later),
        )
        if self.agent is not None and self.agent.restore_arrays is not None:
            arrays, self.agent.restore_arrays = self.agent.restore_arrays, None
            return r, arrays
        return r, numpy_to_arrays(ckpt.arrays)

    def should_stop(self) -> str | None:
        """Return why the run should end now, or None."""
        return self.stop_reason

    def llm_cost(self) -> float:
        """Return the LLM spending so far (0 without an LLM)."""
        return float(self.llm.budget.cost_usd) if self.llm is not None else 0.0

    def maybe_kill(self, server_round: int) -> None:
        """Test hook (``AGENTFL_TEST_KILL_IN_ROUND``): SIGKILL inside that round."""
        if self._kill_round and server_round == self._kill_round:
            import signal

            log.warning("test hook: SIGKILL in round %d", server_round)
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> dict[str, Any]:
        """Drain the hub, close loggers; return the counters for ``summary.json``."""
        self.hub.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        out: dict[str, Any] = {
            "hub": self.hub.stats(),
            "monitor_events": dict(self.monitor.counts),
            "resume_s": self.resume_s,
        }
        if self.checkpointer is not None:
            out["checkpoint"] = self.checkpointer.stats()
        if self.planner is not None:
            out["planner"] = {
                "final_plan": self.planner.plan.label(),
                "replans": self.planner.plan.replans,
                "rollbacks": self.rollbacks,
                "stop_reason": self.stop_reason,
            }
        return out

    # ------------------------------------------------------------- subscribers
    def _on_report(self, report: RoundReport) -> None:
        for event in self.monitor.observe(report):
            self.hub.publish(event)

    def _on_event(self, event: MonitorEvent) -> None:
        assert self.planner is not None
        self.planner.on_event(event)

    def _on_round(self, report: RoundReport) -> None:
        planner, agent = self.planner, self.agent
        assert planner is not None and agent is not None
        planner.on_round(report)
        if planner.best_round == report.round:
            self._best_arrays = report.arrays
        target = planner.take_rollback()
        if target is not None:
            agent.restore_arrays = self._model_of(target)
            self.rollbacks.append({"round": report.round, "to": target})
            log.warning(
                "round %d: divergence; rolling back to the model of round %d",
                report.round,
                target,
            )
        if planner.stop_requested and self.stop_reason is None:
            self.stop_reason = planner.plan.reason
        self._apply(planner.plan)
        for change in planner.take_changes():
            self.hub.publish(change)

    def _model_of(self, server_round: int) -> ArrayRecord:
        ck = self.checkpointer
        if ck is not None and server_round in ck.rounds():
            try:
                return numpy_to_arrays(ck.load(server_round).arrays)
            except CheckpointError as e:
                log.warning("rollback: %s; using the in-memory copy", e)
        if self._best_arrays is None:
            raise CheckpointError(f"rollback: no model of round {server_round}")
        return self._best_arrays

    def _checkpoint(self, report: RoundReport) -> None:
        assert self.checkpointer is not None
        t0 = time.perf_counter()
        path = self.checkpointer.save(report.round, arrays_to_numpy(report.arrays))
        self.hub.publish(
            CheckpointSaved(
                round=report.round,
                path=str(path),
                bytes=self.checkpointer.last_bytes,
                seconds=time.perf_counter() - t0,
            )
        )

    def _apply(self, plan: Plan) -> None:
        """Set the strategy's defaults and guard limits from ``plan``."""
        a = self.agent
        assert a is not None
        base_lr, base = self._base
        a.local_epochs = plan.local_epochs
        a.lr = base_lr * plan.lr_scale
        lr_max = base.lr_max * plan.lr_scale
        if plan.lr_cap is not None:
            lr_max = max(min(lr_max, a.lr * plan.lr_cap), base.lr_min * plan.lr_scale)
        a.limits = base.model_copy(
            update={
                "lr_min": base.lr_min * plan.lr_scale,
                "lr_max": lr_max,
                "max_weight_share": plan.max_weight_share,
                "weight_trust": plan.weight_trust,
            }
        )
        a.plan = {
            "plan": plan.label(),
            "plan_reason": plan.reason,
            "plan_since_round": plan.since_round,
        }
        for policy in {id(a.policy): a.policy, id(a.fallback): a.fallback}.values():
            if isinstance(policy, DeterministicPolicy):
                policy.exploration = plan.exploration
            for inner in getattr(policy, "policies", {}).values():
                if isinstance(inner, DeterministicPolicy):
                    inner.exploration = plan.exploration


def _cut_jsonl(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the lines of rounds ``<= last_round``; return the removed entries."""
    if not path.exists():
        return []
    kept: list[str] = []
    cut: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn line (the run was killed mid-write)", path)
            continue
        if int(entry.get("round", 0)) <= last_round:
            kept.append(line + "\n")
        else:
            cut.append(entry)
    write_atomic(path, "".join(kept).encode())
    return cut
