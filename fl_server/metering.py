"""A ``Grid`` wrapper that measures what crosses it, for any strategy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from .device_grid import DeviceSimulator
from .devices import Timing


def message_bytes(content: RecordDict) -> int:
    """Return the bytes of every array in ``content`` (as Flower serialises them).

    Byte strings in config records count too: SecAgg+ sends its masked vectors and
    key shares that way.
    """
    arrays = sum(rec.count_bytes() for rec in content.array_records.values())
    blobs = 0
    for rec in content.config_records.values():
        for value in rec.values():
            if isinstance(value, bytes):
                blobs += len(value)
            elif isinstance(value, list):
                blobs += sum(len(v) for v in value if isinstance(v, bytes))
    return arrays + blobs


@dataclass
class TrainTraffic:
    """Train messages of the current round: counts, bytes and failures."""

    sent: int = 0
    bytes_down: int = 0
    replies: int = 0
    errors: int = 0
    bytes_up: int = 0
    error_reasons: list[str] = field(default_factory=list)
    sim_time_s: float | None = None
    timings: dict[int, Timing] = field(default_factory=dict)


class MeteredGrid(Grid):
    """Delegate to ``inner``; count train messages and their array bytes.

    Call :meth:`take_round` once per round to read and reset the counters. With
    ``devices``, train messages pass through its simulated devices and deadline
    (:mod:`fl_server.device_grid`) and the counters carry the simulated clock.
    """

    def __init__(self, inner: Grid, devices: DeviceSimulator | None = None) -> None:
        self.inner = inner
        self.devices = devices
        self._traffic = TrainTraffic()

    def take_round(self) -> TrainTraffic:
        """Return this round's counters and start new ones."""
        traffic, self._traffic = self._traffic, TrainTraffic()
        if self.devices is not None:
            traffic.sim_time_s = self.devices.sim_time_s
        return traffic

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate."""
        return self.inner.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegate, counting train messages and replies."""
        msgs = list(messages)
        train = [m for m in msgs if m.metadata.message_type == MessageType.TRAIN]
        t = self._traffic
        t.sent += len(train)
        if self.devices is not None and train:
            rest = [m for m in msgs if m.metadata.message_type != MessageType.TRAIN]
            replies = self._send(rest, timeout) if rest else []
            replies += self.devices.run_round(
                train,
                lambda m: message_bytes(m.content),
                lambda ms: self._send(ms, timeout),
            )
            t.timings = dict(self.devices.clock.timings)
        else:
            replies = self._send(msgs, timeout)
        for r in replies:
            if r.metadata.message_type != MessageType.TRAIN:
                continue
            t.replies += 1
            if r.has_error():
                t.errors += 1
                t.error_reasons.append(r.error.reason or f"error code {r.error.code}")
            else:
                t.bytes_up += message_bytes(r.content)
        return replies

    def _send(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        self._traffic.bytes_down += sum(
            message_bytes(m.content)
            for m in msgs
            if m.metadata.message_type == MessageType.TRAIN
        )
        replies = list(self.inner.send_and_receive(msgs, timeout=timeout))
        if self.devices is not None:
            self.devices.learn(replies)
        return replies
