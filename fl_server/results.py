"""Per-round results: centralized evaluation, one JSON line per round, progress."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord

from fl_client.task import ArrayDataset, build_model, evaluate

from .metering import MeteredGrid
from .strategy import AgentStrategy, RoundFailedError

log = logging.getLogger("agentfl.results")


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``results.jsonl``."""

    round: int
    accuracy: float
    loss: float
    selected: int
    accepted: int
    flagged: int
    failures: int
    source: str
    wall_s: float
    bytes_up: int
    bytes_down: int
    failed: bool = False
    failure_reason: str = ""


class RoundRecorder:
    """The ``evaluate_fn`` given to ``Strategy.start``: evaluates and records.

    Flower calls it before round 1 (``server_round=0``) and after each round. It
    evaluates the global model on the central test set, reads the round's traffic from
    the :class:`MeteredGrid` and, for the agent strategy, its round info, appends a
    :class:`RoundRecord` to ``results.jsonl`` and logs a progress line. A round in which
    fewer than ``min_replies`` train replies succeeded (or, for the agent, were
    usable) is recorded as failed with its reasons, the global model unchanged;
    ``max_failed_rounds`` failed rounds in a row raise :class:`RoundFailedError`.
    """

    def __init__(
        self,
        *,
        model_name: str,
        test_set: ArrayDataset,
        grid: MeteredGrid,
        strategy: object,
        results_path: Path,
        num_rounds: int,
        min_replies: int,
        max_failed_rounds: int = 1,
    ) -> None:
        self.model_name = model_name
        self.test_set = test_set
        self.grid = grid
        self.strategy = strategy
        self.results_path = results_path
        self.num_rounds = num_rounds
        self.min_replies = min_replies
        self.max_failed_rounds = max_failed_rounds
        self.failed_in_a_row = 0
        self.records: list[RoundRecord] = []
        self._t_last = time.perf_counter()
        self._t_start = self._t_last

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate ``arrays``, append the round's record, log progress."""
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
        else:
            selected = traffic.sent
            accepted = traffic.replies - traffic.errors
            flagged, failures = 0, traffic.errors + (traffic.sent - traffic.replies)
            source = "baseline" if server_round > 0 else "init"
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
            failed=bool(reason),
            failure_reason=reason,
        )
        self.records.append(rec)
        with self.results_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(rec)) + "\n")
        if reason and self.failed_in_a_row >= self.max_failed_rounds:
            raise RoundFailedError(
                f"{self.failed_in_a_row} round(s) in a row failed "
                f"(max_failed_rounds={self.max_failed_rounds}); last: {reason}"
            )
        if isinstance(self.strategy, AgentStrategy):
            self.strategy.set_last_accuracy(acc)
        self._progress(rec, now)
        self._t_last = time.perf_counter()
        return MetricRecord({"accuracy": acc, "loss": rec.loss})

    def _progress(self, rec: RoundRecord, now: float) -> None:
        elapsed = now - self._t_start
        eta = elapsed / rec.round * (self.num_rounds - rec.round) if rec.round else 0.0
        log.info(
            "round %3d/%d  acc %.4f  loss %.4f  selected %2d  accepted %2d  "
            "flagged %d  failed %d  source %-13s  %.2fs  eta %.0fs",
            rec.round,
            self.num_rounds,
            rec.accuracy,
            rec.loss,
            rec.selected,
            rec.accepted,
            rec.flagged,
            rec.failures,
            rec.source,
            rec.wall_s,
            eta,
        )
