"""Apply simulated devices to a round's train messages, for any strategy.

:class:`DeviceSimulator` sits inside :class:`~fl_server.metering.MeteredGrid`, which
every strategy (the agent and Flower's baselines) sends its messages through, so the
same profiles, dropouts and deadline hold for all of them. Everything is simulated on
the server from the seed and the client's partition id:

* a client that drops out of the round is not sent its message; the strategy gets an
  error reply (``simulated dropout``), as from a node gone offline;
* a client's time is its compute, its download (the train message's bytes) and its
  upload: the *reply's* bytes, measured like the bytes up
  (:func:`~fl_server.metering.message_bytes`), over its bandwidth -- a compressed
  upload takes less time;
* the deadline is ``devices.deadline_s``, or the message's shorter ``deadline-s`` (a
  strategy may end a client's round earlier, never later). A reply whose compute,
  download and real upload exceed it is late: the strategy gets an error reply
  (``simulated straggler ... missed the deadline``) instead, the round waited until
  the deadline, and its bytes do not count as uploaded. A client certain to miss the
  deadline is not even sent its message (its work would arrive too late): certain
  means that even the smallest upload measured so far for its codec and this model
  (none measured: an empty one) would not make it. So the deadline is always judged
  on real bytes; the prediction only saves the work of hopeless clients;
* with ``partial_work`` a late client is asked for the whole local epochs that fit
  (its upload predicted by that smallest measured upload for its codec, or a dense
  one if none was measured), and is dropped only if not even one epoch can fit; its
  reply is still judged on its real bytes;
* a dispatched client's reply has its ``train-duration`` metric replaced by the
  simulated time, so a policy sees simulated durations.

Node ids are random per run: the partition id and training-set size of each node come
from the roll call (``query`` messages), captured when a strategy sends one and sent
by the simulator itself for nodes it has not seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from flwr.app import (
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from orchestration.config import DevicesConfig

from .devices import (
    DeviceProfile,
    Timing,
    client_timing,
    draw_profile,
    drops_out,
    epochs_within,
    round_duration,
)

log = logging.getLogger("agentfl.devices")

SendFn = Callable[[list[Message]], list[Message]]


@dataclass
class RoundClock:
    """What the simulator decided in one round."""

    round: int = 0
    timings: dict[int, Timing] = field(default_factory=dict)
    dropped_out: list[int] = field(default_factory=list)
    late: dict[int, float] = field(default_factory=dict)
    shortened: dict[int, int] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Dispatch:
    """A message sent, with what its reply is judged by."""

    message: Message
    timing: Timing
    deadline_s: float
    bandwidth_bps: float
    upload_key: tuple[str, int]


@dataclass
class _Plan:
    send: list[Message] = field(default_factory=list)
    refused: list[Message] = field(default_factory=list)
    sent: dict[int, _Dispatch] = field(default_factory=dict)


class DeviceSimulator:
    """Simulated devices and deadline for the train messages of every round.

    Parameters
    ----------
    cfg : DevicesConfig
        Profiles, dropout, deadline and partial work.
    seed : int
        The run's seed; with a partition id it fixes a client's device.
    default_epochs : int
        Local epochs assumed when a train message names none.
    """

    def __init__(self, cfg: DevicesConfig, seed: int, default_epochs: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.default_epochs = default_epochs
        self.nodes: dict[int, tuple[int, int]] = {}
        self.sim_time_s = 0.0
        self.rounds = 0
        self.clock = RoundClock()
        self.smallest_upload: dict[tuple[str, int], int] = {}
        """Smallest reply (bytes) measured per (codec, train message bytes)."""

    # ------------------------------------------------------------------ lookups
    def profile(self, partition_id: int) -> DeviceProfile:
        """Return the device of client ``partition_id``."""
        return draw_profile(
            self.seed,
            partition_id,
            speed_sigma=self.cfg.speed_sigma,
            bandwidth_median_bps=self.cfg.bandwidth_median_mbps * 1e6 / 8,
            bandwidth_sigma=self.cfg.bandwidth_sigma,
        )

    def learn(self, replies: Iterable[Message]) -> None:
        """Record the partition id and data size from roll-call replies."""
        for r in replies:
            if r.metadata.message_type != MessageType.QUERY or r.has_error():
                continue
            m = r.content.metric_records.get("metrics", MetricRecord())
            pid, n = m.get("partition-id"), m.get("num-examples")
            if isinstance(pid, int) and isinstance(n, int) and pid >= 0 and n >= 0:
                self.nodes[r.metadata.src_node_id] = (pid, n)

    # ------------------------------------------------------------------ a round
    def run_round(
        self, train: list[Message], bytes_of: Callable[[Message], int], send: SendFn
    ) -> list[Message]:
        """Decide, dispatch and answer one round's train messages; advance the clock.

        ``send`` dispatches messages to the clients and returns their replies;
        ``bytes_of`` measures a message's contents: the train message's (downloaded)
        and the reply's (uploaded).
        """
        unknown = sorted({m.metadata.dst_node_id for m in train} - set(self.nodes))
        if unknown:
            roll = [
                Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in unknown
            ]
            self.learn(send(roll))
        self.rounds += 1
        server_round = self._round_of(train)
        clock = RoundClock(round=server_round)
        plan = _Plan()
        for m in train:
            self._plan_one(m, server_round, bytes_of, clock, plan)
        replies = [
            self._judge(r, plan, bytes_of, clock)
            for r in (send(plan.send) if plan.send else [])
        ]
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        clock.duration_s = round_duration(
            (clock.timings[n].total_s for n in ok if n in clock.timings),
            clock.late.values(),
        )
        self.sim_time_s += clock.duration_s
        self.clock = clock
        log.info(
            "round %d simulated %.2fs (total %.1fs): %d dispatched, %d dropped out, "
            "%d late, %d shortened",
            server_round,
            clock.duration_s,
            self.sim_time_s,
            len(plan.send),
            len(clock.dropped_out),
            len(clock.late),
            len(clock.shortened),
        )
        return list(replies) + plan.refused

    def _round_of(self, train: list[Message]) -> int:
        for m in train:
            cfg = m.content.config_records.get("config", ConfigRecord())
            r = cfg.get("server-round")
            if isinstance(r, int) and not isinstance(r, bool) and r > 0:
                return r
        return self.rounds

    def _plan_one(
        self,
        m: Message,
        server_round: int,
        bytes_of: Callable[[Message], int],
        clock: RoundClock,
        plan: _Plan,
    ) -> None:
        nid = m.metadata.dst_node_id
        if nid not in self.nodes:
            plan.refused.append(_error(m, "device unknown: the node missed roll call"))
            return
        pid, examples = self.nodes[nid]
        if drops_out(self.seed, server_round, pid, self.cfg.dropout):
            clock.dropped_out.append(nid)
            plan.refused.append(
                _error(
                    m,
                    "simulated dropout: device unavailable",
                    ErrorCode.NODE_UNAVAILABLE,
                )
            )
            return
        cfg = m.content.config_records.get("config", ConfigRecord())
        epochs = cfg.get("local-epochs", self.default_epochs)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            epochs = self.default_epochs
        deadline = self.cfg.deadline_s
        asked = cfg.get("deadline-s")
        if (
            deadline > 0
            and isinstance(asked, int | float)
            and not isinstance(asked, bool)
            and 0 < asked < deadline
        ):
            deadline = float(asked)  # a strategy may ask for less, never for more
        codec = cfg.get("compression", "none")
        down = bytes_of(m)
        key = (codec if isinstance(codec, str) else "none", down)
        known_up = self.smallest_upload.get(key)
        profile = self.profile(pid)

        def timing_for(up: int | None) -> Timing:
            return client_timing(
                profile,
                examples=examples,
                epochs=epochs,
                bytes_down=down,
                bytes_up=up,
                example_cost_s=self.cfg.example_cost_s,
            )

        # Best guess of the upload: the smallest seen for this codec and model, else
        # a dense one. A client is refused only if certain to be late: even the
        # smallest upload seen (none seen: 0 bytes) would miss the deadline.
        guess, least = timing_for(known_up), timing_for(known_up or 0)
        fit = epochs
        if deadline > 0 and self.cfg.partial_work and guess.total_s > deadline:
            fit = epochs_within(deadline, guess, epochs) or min(
                1, epochs_within(deadline, least, epochs)
            )
        if fit < epochs:
            guess = replace(guess, compute_s=guess.epoch_s * fit, epochs=fit)
            least = replace(least, compute_s=least.epoch_s * fit, epochs=fit)
        if deadline > 0 and (fit < 1 or least.total_s > deadline):
            clock.late[nid] = deadline
            clock.timings[nid] = guess
            plan.refused.append(
                _error(
                    m,
                    f"simulated straggler: {least.total_s:.2f}s or more missed the "
                    f"deadline {deadline:.2f}s",
                )
            )
            return
        if fit < epochs:
            clock.shortened[nid] = fit
            m = _with_epochs(m, fit)
        timing = guess
        clock.timings[nid] = timing
        plan.send.append(m)
        plan.sent[nid] = _Dispatch(m, timing, deadline, profile.bandwidth_bps, key)

    def _judge(
        self,
        reply: Message,
        plan: _Plan,
        bytes_of: Callable[[Message], int],
        clock: RoundClock,
    ) -> Message:
        """Time ``reply`` with its real upload; return it, or a late error reply."""
        nid = reply.metadata.src_node_id
        sent = plan.sent.get(nid)
        if sent is None or reply.has_error():
            return reply
        up = bytes_of(reply)
        least = self.smallest_upload.get(sent.upload_key)
        self.smallest_upload[sent.upload_key] = up if least is None else min(least, up)
        timing = replace(sent.timing, upload_s=up / sent.bandwidth_bps)
        clock.timings[nid] = timing
        if sent.deadline_s > 0 and timing.total_s > sent.deadline_s:
            clock.late[nid] = sent.deadline_s
            return _error(
                sent.message,
                f"simulated straggler: {timing.total_s:.2f}s (upload {up} bytes) "
                f"missed the deadline {sent.deadline_s:.2f}s",
            )
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None and "train-duration" in metrics:
            metrics["train-duration"] = timing.total_s
        return reply


def _error(
    m: Message, reason: str, code: int = ErrorCode.REPLY_MESSAGE_UNAVAILABLE
) -> Message:
    """Return the error reply the strategy gets for a message never answered."""
    return Message(Error(code=code, reason=reason), reply_to=m)


def _with_epochs(m: Message, epochs: int) -> Message:
    """Return a copy of train message ``m`` asking for ``epochs`` local epochs.

    Flower's strategies send one shared ``RecordDict`` to every node: the copy keeps
    the other messages unchanged.
    """
    content = RecordDict(dict(m.content.items()))
    cfg = ConfigRecord(dict(content.config_records.get("config", ConfigRecord())))
    cfg["local-epochs"] = epochs
    content["config"] = cfg
    return Message(
        content,
        message_type=m.metadata.message_type,
        dst_node_id=m.metadata.dst_node_id,
    )
