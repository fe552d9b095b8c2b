"""Loggers as comm-hub subscribers: console progress line, TensorBoard, event log.

The results file is written by ``fl_server.results.ResultsWriter`` (also a
subscriber). These loggers take the hub's typed values only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .topics import MonitorEvent, PlanChange, RoundReport

log = logging.getLogger("agentfl.results")


def progress_line(report: RoundReport) -> str:
    """Return the one-line progress summary of a round (with its ETA)."""
    rec = report.record
    return (
        f"round {rec.round:3d}/{report.num_rounds}  acc {rec.accuracy:.4f}  "
        f"loss {rec.loss:.4f}  selected {rec.selected:2d}  accepted {rec.accepted:2d}  "
        f"flagged {rec.flagged}  failed {rec.failures}  source {rec.source:<13s}  "
        f"{rec.wall_s:.2f}s  eta {report.eta_s():.0f}s"
    )


class ConsoleProgress:
    """Logs :func:`progress_line` for every round report."""

    def __call__(self, report: RoundReport) -> None:
        """Log the round's line."""
        log.info("%s", progress_line(report))


class EventLog:
    """Appends monitor events and plan changes to ``events.jsonl`` (and logs them)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, item: MonitorEvent | PlanChange) -> None:
        """Append one line: ``{"type": "event"|"plan", ...}``."""
        kind = "event" if isinstance(item, MonitorEvent) else "plan"
        entry: dict[str, Any] = {"type": kind, **asdict(item)}
        if isinstance(item, MonitorEvent):
            log.info("round %d: monitor: %s (%s)", item.round, item.kind, item.detail)
        else:
            log.info(
                "round %d: plan -> %s (%s) %s",
                item.round,
                item.phase,
                item.reason,
                item.changes,
            )
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")


class TensorBoardScalars:
    """Writes each round's numbers as TensorBoard scalars under ``log_dir``.

    Raises
    ------
    RuntimeError
        If the ``tensorboard`` package is not installed (``hub.tensorboard=true``).
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "hub.tensorboard=true needs the 'tensorboard' package: "
                "pip install 'tensorboard>=2.15,<3'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, report: RoundReport) -> None:
        """Add the round's scalars."""
        rec, r = report.record, report.record.round
        for key in ("accuracy", "loss", "selected", "accepted", "flagged", "failures"):
            self.writer.add_scalar(f"round/{key}", getattr(rec, key), r)
        self.writer.add_scalar("round/bytes", rec.bytes_up + rec.bytes_down, r)
        self.writer.add_scalar("round/wall_s", rec.wall_s, r)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()
