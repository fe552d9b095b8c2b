"""Per-round results: centralized evaluation, published as a round report.

:class:`RoundRecorder` is the ``evaluate_fn`` Flower calls after each round; it
evaluates, builds the round's :class:`~orchestration.topics.RoundRecord` and
publishes a :class:`~orchestration.topics.RoundReport` on the comm hub. The results
file (:class:`ResultsWriter`) and the console line (``orchestration.loggers``) are
hub subscribers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from fl_client.task import ArrayDataset, build_model, evaluate
from orchestration.hub import Hub
from orchestration.topics import RoundRecord, RoundReport

from .metering import MeteredGrid
from .privacy_metrics import epsilon_summary
from .strategy import AgentStrategy, RoundFailedError

log = logging.getLogger("agentfl.results")

__all__ = ["ResultsWriter", "RoundRecord", "RoundRecorder", "StopRun"]


class StopRun(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the recorder after a round when the plan ends the run early."""

    def __init__(self, server_round: int, arrays: ArrayRecord, reason: str) -> None:
        super().__init__(f"stopped after round {server_round}: {reason}")
        self.round = server_round
        self.arrays = arrays
        self.reason = reason


class RoundRecorder:
    """The ``evaluate_fn`` given to ``Strategy.start``: evaluates and records.

    Flower calls it before round 1 (``server_round=0``) and after each round. It
    evaluates the global model on the central test set, reads the round's traffic from
    the :class:`MeteredGrid` and, for the agent strategy, its round info, and
    publishes a :class:`RoundReport` on ``hub``. If ``should_stop()`` is true after
    the report's inline subscribers ran, it raises :class:`StopRun`. A round in which
    fewer than ``min_replies`` train replies succeeded (or, for the agent, were
    usable) is recorded as failed with its reasons, the global model unchanged;
    ``max_failed_rounds`` failed rounds in a row raise :class:`RoundFailedError`
    (Flower's own strategies would silently keep the model).
    """

    def __init__(
        self,
        *,
        model_name: str,
        test_set: ArrayDataset,
        grid: MeteredGrid,
        strategy: object,
        hub: Hub,
        num_rounds: int,
        min_replies: int,
        should_stop: Callable[[], str | None] = lambda: None,
        llm_cost: Callable[[], float] = lambda: 0.0,
        max_failed_rounds: int = 1,
    ) -> None:
        self.model_name = model_name
        self.test_set = test_set
        self.grid = grid
        self.strategy = strategy
        self.hub = hub
        self.num_rounds = num_rounds
        self.min_replies = min_replies
        self.should_stop = should_stop
        self.llm_cost = llm_cost
        self.max_failed_rounds = max_failed_rounds
        self.failed_in_a_row = 0
        self.records: list[RoundRecord] = []
        self.first_round = 1
        self.last_arrays: ArrayRecord | None = None
        self._epsilons: dict[str, float] = {}
        self.client_eval: dict[str, float] = {}
        self._t_last = time.perf_counter()
        self._t_start = self._t_last

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate ``arrays``, publish the round's report; maybe stop the run."""
        now = time.perf_counter()
        wall = now - self._t_last
        traffic = self.grid.take_round()
        reason = ""
        if server_round > 0 and traffic.replies - traffic.errors < self.min_replies:
            reason = (
                f"round {server_round}: {traffic.replies - traffic.errors} successful "
                f"train replies of {traffic.sent} sent, fewer than min_replies="
                f"{self.min_replies}. Errors: {traffic.error_reasons}"
            )
        if isinstance(self.strategy, AgentStrategy) and server_round > 0:
            reason = self.strategy.info.failed or reason
        if reason:
            self.failed_in_a_row += 1
            log.warning("round %d failed (global model kept): %s", server_round, reason)
        elif server_round > 0:
            self.failed_in_a_row = 0
        model = build_model(
            self.model_name, self.test_set.input_shape, self.test_set.num_classes
        )
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            loss, acc = evaluate(model, self.test_set)
        if isinstance(self.strategy, AgentStrategy) and server_round > 0:
            info = self.strategy.info
            selected, accepted = len(info.selected), len(info.accepted)
            flagged, failures = len(info.flagged), len(info.failures)
            source = info.sources.get("train", "deterministic")
            if info.fallbacks:
                source = "fallback"
            self._epsilons.update(info.epsilons)  # cumulative, latest per client
            eps_max, eps_mean = epsilon_summary(self._epsilons)
        else:
            eps_max = eps_mean = None
            selected = traffic.sent
            accepted = traffic.replies - traffic.errors
            flagged, failures = 0, traffic.errors + (traffic.sent - traffic.replies)
            source = "baseline" if server_round > 0 else "init"
        client_eval: dict[str, float] = {}
        if isinstance(self.strategy, AgentStrategy):
            # Federated evaluation means (personalization / client eval), if any.
            client_eval = self.strategy.features.take_round_metrics()
            self.client_eval = client_eval or self.client_eval
        rec = RoundRecord(
            round=server_round,
            accuracy=acc,
            loss=loss if math.isfinite(loss) else float("nan"),
            selected=selected,
            accepted=accepted,
            flagged=flagged,
            failures=failures,
            source=source if server_round > 0 else "init",
            wall_s=round(wall, 4),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            sim_time_s=None
            if traffic.sim_time_s is None
            else round(traffic.sim_time_s, 4),
            epsilon_max=eps_max,
            epsilon_mean=eps_mean,
            failed=bool(reason),
            failure_reason=reason,
            extra=client_eval,
        )
        self.records.append(rec)
        self.last_arrays = arrays
        if isinstance(self.strategy, AgentStrategy):
            self.strategy.set_last_accuracy(acc)
            if traffic.timings:
                self.strategy.observe_timings(traffic.timings)
        self.hub.publish(
            RoundReport(
                record=rec,
                num_rounds=self.num_rounds,
                first_round=self.first_round,
                elapsed_s=now - self._t_start,
                arrays=arrays,
                llm_cost_usd=self.llm_cost(),
            )
        )
        self._t_last = time.perf_counter()
        if reason and self.failed_in_a_row >= self.max_failed_rounds:
            raise RoundFailedError(
                f"{self.failed_in_a_row} round(s) in a row failed "
                f"(max_failed_rounds={self.max_failed_rounds}); last: {reason}"
            )
        stop = self.should_stop()
        if stop is not None and server_round > 0:
            raise StopRun(server_round, arrays, stop)
        return MetricRecord({"accuracy": acc, "loss": rec.loss})

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Return the results so far (checkpoint part ``results``)."""
        return {
            "records": [asdict(r) for r in self.records],
            "failed_in_a_row": self.failed_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the results so far; the next round is the first of this process."""
        self.records = [RoundRecord(**r) for r in state["records"]]
        self.failed_in_a_row = int(state.get("failed_in_a_row", 0))
        self.first_round = self.records[-1].round + 1 if self.records else 1


class ResultsWriter:
    """Hub subscriber appending each :class:`RoundReport` to ``results.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, report: RoundReport) -> None:
        """Append the report's record as one JSON line."""
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(report.record.as_dict()) + "\n")
