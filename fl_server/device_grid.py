"""Apply simulated devices to a round's train messages, for any strategy.

:class:`DeviceSimulator` sits inside :class:`~fl_server.metering.MeteredGrid`, which
every strategy (the agent and Flower's baselines) sends its messages through, so the
same profiles, dropouts and deadline hold for all of them. Everything is simulated on
the server, before dispatch, from the seed and the client's partition id:

* a client that drops out of the round is not sent its message; the strategy gets an
  error reply (``simulated dropout``), as from a node gone offline;
* a client whose simulated finish time exceeds the deadline (``devices.deadline_s``,
  or the message's shorter ``deadline-s``: a strategy may end a client's round
  earlier, never later) is not sent its message either (its work would arrive too
  late); the strategy gets an error reply
  (``missed the deadline``) -- unless ``partial_work`` is set: then its message asks
  for the whole local epochs that fit, and it is dropped only if not even one does;
* a dispatched client's reply has its ``train-duration`` metric replaced by the
  simulated time, so a policy sees simulated durations.

Node ids are random per run: the partition id and training-set size of each node come
from the roll call (``query`` messages), captured when a strategy sends one and sent
by the simulator itself for nodes it has not seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


@dataclass
class _Plan:
    send: list[Message] = field(default_factory=list)
    refused: list[Message] = field(default_factory=list)


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
        ``bytes_of`` measures a message's arrays (downloaded once, uploaded once).
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
        replies = send(plan.send) if plan.send else []
        for r in replies:
            t = clock.timings.get(r.metadata.src_node_id)
            if t is not None and not r.has_error():
                metrics = r.content.metric_records.get("metrics")
                if metrics is not None and "train-duration" in metrics:
                    metrics["train-duration"] = t.total_s
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
        timing = client_timing(
            self.profile(pid),
            examples=examples,
            epochs=epochs,
            bytes_moved=2 * bytes_of(m),
            example_cost_s=self.cfg.example_cost_s,
        )
        deadline = self.cfg.deadline_s
        asked = cfg.get("deadline-s")
        if (
            deadline > 0
            and isinstance(asked, int | float)
            and not isinstance(asked, bool)
            and 0 < asked < deadline
        ):
            deadline = float(asked)  # a strategy may ask for less, never for more
        if deadline > 0 and timing.total_s > deadline:
            fit = (
                epochs_within(deadline, timing, epochs) if self.cfg.partial_work else 0
            )
            if fit < 1:
                clock.late[nid] = deadline
                clock.timings[nid] = timing
                plan.refused.append(
                    _error(
                        m,
                        f"simulated straggler: {timing.total_s:.2f}s missed the "
                        f"deadline {deadline:.2f}s",
                    )
                )
                return
            clock.shortened[nid] = fit
            timing = Timing(timing.epoch_s * fit, timing.comm_s, fit)
            m = _with_epochs(m, fit)
        clock.timings[nid] = timing
        plan.send.append(m)


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
