"""``AgentStrategy``: a Flower Message-API strategy whose decisions come from a policy.

Each round the strategy builds an :class:`~agent_strategy.Observation`, asks the policy,
passes the answer through :func:`~agent_strategy.guard`, and acts on the guarded
decision: one train message per selected client with its own config, then validation
of every reply, server-measured features, a second policy call for weights and flags,
and a weighted aggregate. A failing policy never fails a round: the deterministic
policy answers instead, and the fallback is counted and logged.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from agent_strategy import (
    ClientState,
    Decision,
    DeterministicPolicy,
    Limits,
    Observation,
    Policy,
    ReplyFeatures,
    ReputationParams,
    guard,
    next_state,
)

from .aggregation import flatten_arrays, l2_norms
from .client_features import ClientFeatures
from .combine import combine
from .devices import Timing
from .features import update_features
from .loss_check import LossChecker
from .privacy_metrics import record_client_epsilon
from .validation import (
    InvalidReply,
    ModelSpec,
    ValidReply,
    finite_rows,
    non_finite_array,
    validate_train_reply,
)

log = logging.getLogger("agentfl.strategy")


class Telemetry(Protocol):
    """Optional hooks of an LLM-backed policy (see ``fl_server.policy_setup``)."""

    def record(self, obs: Observation) -> dict[str, Any] | None:
        """Return the LLM call made for ``obs``, or None."""
        ...

    def after_aggregate(self, obs: Observation, decision: Decision) -> None:
        """Observe a finished round."""
        ...


class RoundFailedError(RuntimeError):
    """Too few usable replies (roll call), or too many failed rounds in a row."""


@dataclass
class RoundInfo:
    """What happened in one round, for the results file and the progress line."""

    selected: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    flagged: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    fallbacks: int = 0
    weights: dict[str, float] = field(default_factory=dict)  # shares applied
    epsilons: dict[str, float] = field(default_factory=dict)  # DP: fl_server.privacy
    rejected: list[str] = field(default_factory=list)
    failed: str = ""
    aggregation: str = "weighted"


@dataclass
class _Client:
    node_id: int
    state: ClientState
    registered_examples: int = 0


class AgentStrategy(Strategy):
    """Flower strategy driven by a :class:`~agent_strategy.Policy`.

    Parameters
    ----------
    policy : Policy
        Answers both phases of each round.
    clients_per_round : int
        Clients the policy is asked to select (``target_clients``).
    min_replies : int
        A round with fewer accepted replies fails (the global model stays).
    limits : Limits
        Hard limits enforced by the guard on every decision.
    local_epochs, lr : int, float
        Default allocation shown to the policy.
    fallback : Policy, optional
        Answers when ``policy`` raises; a :class:`DeterministicPolicy` by default.
    decision_log : Path, optional
        A JSONL file receiving one line per round and phase.
    telemetry : Telemetry, optional
        LLM call records for the decision log, and the round history the LLM sees.
    features : ClientFeatures, optional
        Upload compression, personal layers, federated evaluation (off by default).
    reputation : ReputationParams, optional
        Turns on per-client reputation: rejected or malicious-flagged replies
        lower it and repeated ones exclude the client for a while (a faulty flag
        drops the reply and leaves the reputation as it was).
    trim_beta, krum_byzantine : float, int
        Parameters of the ``trimmed`` and ``krum`` aggregation rules.
    update_geometry : bool
        Measure each reply's cosine to the coordinate median, Krum ratio and rank,
        and duplicates (:func:`fl_server.features.update_features`). Off, those
        features are ``None`` and only the norm is measured: for policies that never
        read them (the deterministic policy without defense), as they cost more
        server time than the rest of the round's strategy code.
    roll_call_timeout_s : float
        How long the roll call of new nodes waits for answers (Ray actors may take
        minutes to start on a loaded machine; the server app passes
        ``round_timeout_s``). A node that fails it is asked again only after 2, 4,
        8, ... (at most 32) rounds. Also the longest the strategy waits for
        ``min_replies`` nodes to be connected at all (SuperNodes starting after the
        run), polling every ``node_poll_s`` (1 s).

    A round with fewer than ``min_replies`` usable replies fails: the global model
    stays, ``info.failed`` gives the reasons (the recorder logs it and stops the run
    after ``max_failed_rounds`` in a row).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        clients_per_round: int,
        min_replies: int,
        limits: Limits,
        local_epochs: int,
        lr: float,
        fallback: Policy | None = None,
        decision_log: Path | None = None,
        telemetry: Telemetry | None = None,
        roll_call_timeout_s: float = 120.0,
        features: ClientFeatures | None = None,
        reputation: ReputationParams | None = None,
        trim_beta: float = 0.2,
        krum_byzantine: int = 2,
        update_geometry: bool = True,
        loss_check: LossChecker | None = None,
    ) -> None:
        if min_replies > clients_per_round:
            raise ValueError("min_replies must be at most clients_per_round")
        self.policy = policy
        self.fallback = fallback or DeterministicPolicy()
        self.clients_per_round = clients_per_round
        self.min_replies = min_replies
        self.limits = limits
        self.local_epochs = local_epochs
        self.lr = lr
        self.decision_log = decision_log
        self._log_fh: TextIO | None = None
        self.telemetry = telemetry
        self.roll_call_timeout_s = roll_call_timeout_s
        self.node_poll_s = 1.0  # while waiting for SuperNodes to connect
        self._roll_call_retry: dict[int, tuple[int, int]] = {}  # node: (fails, round)
        self._sent: dict[str, Message] = {}  # this round's train messages by client
        self.features = features or ClientFeatures()
        self.reputation = reputation
        self.trim_beta = trim_beta
        self.krum_byzantine = krum_byzantine
        self.update_geometry = update_geometry
        self.loss_check = loss_check  # fl_server.loss_check; None: off
        self.history: list[dict[str, Any]] = []
        self.decisions = 0
        self.llm_latencies: list[float] = []
        self.fallback_reasons: dict[str, int] = {}
        self.clients: dict[str, _Client] = {}
        self.total_fallbacks = 0
        self.total_failures = 0
        self.info = RoundInfo()
        self._global: np.ndarray | None = None
        self._spec: ModelSpec | None = None
        self._order: list[str] = []
        self._kept: dict[str, Array] = {}
        self._num_rounds = 1
        self._last_accuracy: float | None = None
        self._returned: ArrayRecord | None = None
        self._buffer: np.ndarray | None = None  # the round's update matrix
        # Orchestration hooks (orchestration.session): the plan shown to the
        # policy, a model to restart from (rollback), decisions to replay (resume).
        self.plan: dict[str, Any] = {"plan": "default"}
        self.restore_arrays: ArrayRecord | None = None
        self.replay: dict[tuple[int, str], dict[str, Any]] = {}

    # ----------------------------------------------------------------- Flower API
    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "AgentStrategy: policy=%s fallback=%s clients_per_round=%d "
            "min_replies=%d limits=%s",
            getattr(self.policy, "name", type(self.policy).__name__),
            getattr(self.fallback, "name", type(self.fallback).__name__),
            self.clients_per_round,
            self.min_replies,
            self.limits.model_dump(),
        )

    def set_num_rounds(self, num_rounds: int) -> None:
        """Tell the strategy how many rounds the run has (shown to the policy)."""
        self._num_rounds = num_rounds
        self.features.num_rounds = num_rounds

    def set_last_accuracy(self, accuracy: float | None) -> None:
        """Record the latest centralized accuracy (shown to the policy)."""
        self._last_accuracy = accuracy

    def observe_timings(self, timings: Mapping[int, Timing]) -> None:
        """Record the simulated durations of a round's clients, by node id.

        Late clients (dropped at the deadline) are included, so the policy learns
        who is slow (see :mod:`fl_server.device_grid`).
        """
        by_node = {c.node_id: c for c in self.clients.values()}
        for nid, t in timings.items():
            client = by_node.get(nid)
            if client is not None:
                client.state = client.state.model_copy(
                    update={
                        "last_duration_s": t.total_s,
                        "epoch_s": t.epoch_s,
                        "comm_s": t.comm_s,
                    }
                )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Roll-call new nodes, ask the policy whom to train and how."""
        self.info = RoundInfo()
        if self.restore_arrays is not None:
            arrays, self.restore_arrays = self.restore_arrays, None
        self._sent = {}
        online = self._register_nodes(grid, server_round)
        if arrays is not self._returned:
            # Flower hands back the record aggregate_train returned; only a new one
            # (round 1, a restored or a caller's own) needs splitting and decoding.
            self._order = list(arrays.keys())
            shared, self._kept = self.features.split(arrays)
            self._spec = ModelSpec.of(shared)
            self._global = flatten_arrays(shared.to_numpy_ndarrays())
        eligible = [c.state for c in self._ordered_clients() if c.node_id in online]
        if len(eligible) < self.min_replies:
            raise RoundFailedError(
                f"round {server_round}: {len(eligible)} clients answered the roll "
                f"call, fewer than min_replies={self.min_replies}; are the SuperNodes "
                "connected and started with a partition-id?"
            )
        limits = self.limits.model_copy(
            update={
                "min_clients": min(self.limits.min_clients, len(eligible)),
                "max_clients": min(self.clients_per_round, len(eligible)),
            }
        )
        obs = Observation(
            phase="train",
            round=server_round,
            num_rounds=max(self._num_rounds, server_round),
            target_clients=min(self.clients_per_round, len(eligible)),
            default_epochs=self.local_epochs,
            default_lr=self.lr,
            default_compression=self.features.codec,
            topk_fraction=self.features.topk_fraction,
            limits=limits,
            clients=tuple(eligible),
            last_accuracy=self._last_accuracy,
            **self.plan,
        )
        decision = self._decide(obs)
        self.info.selected = list(decision.selected)
        messages = []
        # Clients given the same instructions share one content, as Flower's own
        # strategies share one RecordDict across a round's messages (Flower
        # validates every key of a ConfigRecord; most allocations are equal).
        contents: dict[tuple[Any, ...], RecordDict] = {}
        base = dict(config)
        for cid in decision.selected:
            alloc = decision.allocations[cid]
            client = self.clients[cid]
            client.state = client.state.model_copy(
                update={
                    "rounds_selected": client.state.rounds_selected + 1,
                    "last_selected_round": server_round,
                }
            )
            values = {
                "server-round": server_round,
                "local-epochs": alloc.local_epochs,
                "lr": alloc.lr,
                "deadline-s": alloc.deadline_s,
                "compression": alloc.compression,
                **self.features.train_config(cid, alloc.compression),
            }
            key = tuple(values.items())
            content = contents.get(key)
            if content is None:
                cfg = ConfigRecord({**base, **values})
                content = contents[key] = RecordDict({"arrays": arrays, "config": cfg})
            self._sent[cid] = Message(
                content, message_type=MessageType.TRAIN, dst_node_id=client.node_id
            )
            messages.append(self._sent[cid])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, ask the policy for weights and flags, aggregate."""
        if self._global is None or self._spec is None:
            raise RuntimeError("aggregate_train called before configure_train")
        by_node = {c.node_id: cid for cid, c in self.clients.items()}
        # The SuperLink answers for a node that stopped sending heartbeats; the
        # grid gave each sent message its id.
        by_msg = {m.metadata.message_id: c for c, m in self._sent.items()}
        valid: dict[str, ValidReply] = {}
        replies = list(replies)
        # One float32 row per selected client, in client-id order, filled by
        # validation: no per-reply copies, and the rows are already in the order
        # the policy's ids (and so the aggregate) take, whatever the arrival order.
        # The buffer is kept for the next round (nothing holds its rows after this
        # call), which spares the allocator and page faults a fresh one each round.
        slot_of = {
            c: i
            for i, c in enumerate(sorted(self.info.selected, key=lambda c: int(c[1:])))
        }
        matrix = self._matrix(len(slot_of))
        content_of: dict[str, RecordDict] = {}
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id) or by_msg.get(
                reply.metadata.reply_to_message_id
            )
            if cid is None or cid not in slot_of:
                log.warning(
                    "round %d: reply from unexpected node ignored", server_round
                )
                continue
            if cid in valid:
                log.warning("round %d: second reply from %s ignored", server_round, cid)
                continue
            if reply.has_error():
                self._fail(cid, f"client error: {reply.error.reason}")
                continue
            try:
                content = self.features.decode(
                    cid, reply.content, self._spec, self._global
                )
                checked = validate_train_reply(
                    content,
                    self._spec,
                    out=matrix[slot_of[cid]],
                    max_examples=2 * self.clients[cid].registered_examples or None,
                    check_finite=False,  # below, from the norms
                )
            except InvalidReply as e:
                self._fail(cid, f"rejected: {e}", rejected=True)
                continue
            if checked.partition_id != int(cid[1:]):
                self._fail(
                    cid,
                    f"rejected: partition-id {checked.partition_id} != {cid}",
                    rejected=True,
                )
                continue
            valid[cid] = checked
            content_of[cid] = reply.content
        # The rows of the valid replies, in client-id order; a copy only when a
        # selected client is missing.
        present = [slot for c, slot in slot_of.items() if c in valid]
        updates = matrix if len(present) == len(slot_of) else matrix[present]
        row_of = {c: i for i, c in enumerate(c for c in slot_of if c in valid)}
        updates -= self._global
        # The norms are the finiteness check (one pass for both; a row whose
        # float32 sum overflows is summed again in float64, so the test is exact);
        # a row with NaN or inf is rejected before any feature or aggregate sees it.
        norms = l2_norms(updates)
        finite = finite_rows(norms**2)
        if not finite.all():
            for cid, row in list(row_of.items()):
                if not finite[row]:
                    name = non_finite_array(updates[row] + self._global, self._spec)
                    self._fail(
                        cid,
                        f"rejected: array {name!r} has non-finite values (or an "
                        "update beyond the float32 range)",
                        rejected=True,
                    )
                    del valid[cid]
            keep = [row for row in row_of.values() if finite[row]]
            updates, norms = updates[keep], norms[keep]
            row_of = {c: i for i, c in enumerate(c for c in row_of if c in valid)}
        for cid in valid:  # accepted replies only, as before the finiteness check
            record_client_epsilon(self.info.epsilons, cid, content_of[cid])
        for cid in self.info.selected:
            if cid not in valid and cid not in self.info.failures:
                self._fail(cid, "no reply before the round timeout")
        if not self._require(len(valid), server_round, "replies"):
            self._update_states(server_round, valid, set(), set())
            return None, None

        ids = sorted(valid, key=lambda c: int(c[1:]))
        feats = update_features(updates, geometry=self.update_geometry, norms=norms)
        lc = (
            self.loss_check.check(self._global, updates, self._spec, self._kept)
            if self.loss_check is not None
            else None
        )

        def geo(name: str, c: str) -> Any:
            return feats[name][row_of[c]].item() if name in feats else None

        features = tuple(
            ReplyFeatures(
                id=c,
                num_examples=valid[c].num_examples,
                registered_examples=self.clients[c].registered_examples or None,
                train_loss=valid[c].train_loss,
                duration_s=valid[c].duration_s,
                update_norm=float(feats["update_norm"][row_of[c]]),
                cosine_to_median=geo("cosine_to_median", c),
                krum_ratio=geo("krum_ratio", c),
                distance_rank=geo("distance_rank", c),
                duplicates=geo("duplicates", c),
                **(lc.fields(row_of[c], valid[c].train_loss) if lc else {}),
            )
            for c in ids
        )
        obs = self.aggregate_observation(server_round, features)
        decision = self._decide(obs)
        if self.telemetry is not None:
            self.telemetry.after_aggregate(obs, decision)
        self.info.flagged = {f.id: f"{f.kind}: {f.reason}" for f in decision.flags}
        accepted = [c for c in ids if c in decision.weights]
        bad = {f.id for f in decision.flags if f.kind == "malicious"}
        faulty = {f.id for f in decision.flags if f.kind == "faulty"} - bad
        if not self._require(len(accepted), server_round, "unflagged replies"):
            self._update_states(server_round, valid, set(), bad, faulty)
            return None, None
        self.info.accepted = accepted
        self.info.aggregation = decision.aggregation
        rows = [row_of[c] for c in accepted]
        weights = np.array([decision.weights[c] for c in accepted])
        self.info.weights = dict(zip(accepted, weights / weights.sum(), strict=True))
        kept = updates if rows == list(range(len(ids))) else updates[rows]
        new_global = self._global + combine(
            kept,
            weights,
            decision.aggregation,
            trim_beta=self.trim_beta,
            krum_byzantine=self.krum_byzantine,
        )
        self._update_states(server_round, valid, set(accepted), bad, faulty)

        arrays = self.features.merge(
            self._spec.to_record(new_global), self._kept, self._order
        )
        self._global, self._returned = new_global, arrays
        w_loss = float(
            np.average([valid[c].train_loss for c in accepted], weights=weights)
        )
        metrics = MetricRecord(
            {
                "train-loss": w_loss,
                "accepted": len(accepted),
                "flagged": len(self.info.flagged),
                "failures": len(self.info.failures),
                "ef-residuals-missing": self.features.residuals_missing,
            }
        )
        return arrays, metrics

    def _matrix(self, rows: int) -> np.ndarray:
        """Return a float32 ``(rows, model size)`` buffer, reused across rounds."""
        assert self._global is not None
        size = self._global.size
        buf = self._buffer
        if buf is None or buf.shape[0] < rows or buf.shape[1] != size:
            buf = self._buffer = np.empty((max(rows, 1), size), dtype=np.float32)
        return buf[:rows]

    def aggregate_observation(
        self,
        server_round: int,
        replies: tuple[ReplyFeatures, ...],
        plan: Mapping[str, Any] | None = None,
    ) -> Observation:
        """Return the aggregate-phase observation of ``replies`` (ordered by id).

        ``plan`` replaces the planner's fields (the SecAgg+ adapter's own note).
        """
        return Observation(
            phase="aggregate",
            round=server_round,
            num_rounds=max(self._num_rounds, server_round),
            target_clients=max(len(replies), 1),
            default_epochs=self.local_epochs,
            default_lr=self.lr,
            default_compression=self.features.codec,
            topk_fraction=self.features.topk_fraction,
            limits=self.limits.model_copy(update={"min_clients": self.min_replies}),
            clients=tuple(self.clients[f.id].state for f in replies),
            replies=replies,
            last_accuracy=self._last_accuracy,
            **(self.plan if plan is None else plan),
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation when personalization (or client eval) is on."""
        nodes = [c.node_id for c in self._ordered_clients()]
        return self.features.evaluate_messages(server_round, arrays, nodes)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Mean global and personalized accuracy on the clients' test splits."""
        return self.features.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ helpers
    def _ordered_clients(self) -> list[_Client]:
        return [self.clients[c] for c in sorted(self.clients, key=lambda c: int(c[1:]))]

    def _wait_for_nodes(self, grid: Grid, server_round: int) -> set[int]:
        """Return the online node ids once at least ``min_replies`` are connected.

        SuperNodes may connect after the run starts (Flower's own strategies wait for
        them too, without a limit): poll every ``node_poll_s`` and log progress, for
        at most ``roll_call_timeout_s``; then the caller's roll call decides.
        """
        online = set(grid.get_node_ids())
        start, last_log = time.monotonic(), -math.inf
        while len(online) < self.min_replies:
            waited = time.monotonic() - start
            if waited >= self.roll_call_timeout_s:
                log.warning(
                    "round %d: %d node(s) connected after %.0f s, fewer than "
                    "min_replies=%d",
                    server_round,
                    len(online),
                    waited,
                    self.min_replies,
                )
                break
            if time.monotonic() - last_log >= 10:  # at once, then every 10 s
                log.info(
                    "Waiting for nodes to connect: %d connected (minimum required: "
                    "%d; giving up after %g s)",
                    len(online),
                    self.min_replies,
                    self.roll_call_timeout_s,
                )
                last_log = time.monotonic()
            time.sleep(self.node_poll_s)
            online = set(grid.get_node_ids())
        return online

    def _register_nodes(self, grid: Grid, server_round: int) -> set[int]:
        """Ask online nodes not seen before for their partition id and data size.

        Returns the ids of the nodes online now (only they are eligible this round).
        """
        online = self._wait_for_nodes(grid, server_round)
        known = {c.node_id for c in self.clients.values()}
        new = sorted(
            nid
            for nid in online - known
            if self._roll_call_retry.get(nid, (0, 0))[1] <= server_round
        )
        if not new:
            return online
        msgs = [
            Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid)
            for nid in new
        ]
        unanswered = set(new)
        replies = grid.send_and_receive(msgs, timeout=self.roll_call_timeout_s)
        by_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        for reply in replies:
            src = reply.metadata.src_node_id
            # An error the SuperLink sends for an unavailable node comes from it.
            nid = (
                src
                if src in new
                else by_msg.get(reply.metadata.reply_to_message_id, src)
            )
            unanswered.discard(nid)
            if reply.has_error():
                self._roll_call_failed(nid, server_round, str(reply.error.reason))
                continue
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            pid, n = metrics.get("partition-id"), metrics.get("num-examples")
            if not isinstance(pid, int) or not isinstance(n, int) or pid < 0 or n < 0:
                self._roll_call_failed(nid, server_round, "malformed ids")
                continue
            cid = f"c{pid}"
            if cid in self.clients and self.clients[cid].node_id not in online:
                self.clients[cid].node_id = reply.metadata.src_node_id  # resumed
                continue
            if cid in self.clients:
                log.warning(
                    "roll call: two nodes claim partition %d; keeping the first", pid
                )
                continue
            self.clients[cid] = _Client(
                node_id=reply.metadata.src_node_id,
                state=ClientState(id=cid, num_examples=n),
                registered_examples=n,
            )
        for nid in sorted(unanswered):
            self._roll_call_failed(
                nid, server_round, f"no answer within {self.roll_call_timeout_s:g} s"
            )
        log.info("roll call: %d clients registered", len(self.clients))
        return online

    def _roll_call_failed(self, node_id: int, server_round: int, reason: str) -> None:
        """Log a failed roll call; ask that node again after 2**failures rounds."""
        fails = self._roll_call_retry.get(node_id, (0, 0))[0] + 1
        retry = server_round + min(2**fails, 32)
        self._roll_call_retry[node_id] = (fails, retry)
        log.warning(
            "roll call: node %d failed (%s); asked again in round %d",
            node_id,
            reason,
            retry,
        )

    def _decide(self, obs: Observation) -> Decision:
        start = time.perf_counter()
        fallback_reason = ""
        logged = self.replay.pop((obs.round, obs.phase), None)
        if logged is not None:  # resumed run: reuse the decision logged before
            raw = Decision.model_validate(logged["decision"])
            fallback_reason = logged.get("fallback_reason") or ""
        else:
            try:
                raw = self.policy.decide(obs)
            except Exception as e:  # noqa: BLE001 - any policy failure falls back
                fallback_reason = f"policy raised {type(e).__name__}: {e}"
                raw = self.fallback.decide(obs).model_copy(
                    update={"source": "fallback"}
                )
        guarded = guard(raw, obs)
        latency = time.perf_counter() - start
        decision = guarded.decision
        call = self.telemetry.record(obs) if self.telemetry is not None else None
        if logged is not None:
            call = logged.get("llm")
        if call is not None:
            self.llm_latencies.append(float(call["latency_s"]))
            fallback_reason = fallback_reason or (call.get("fallback_reason") or "")
        self.decisions += 1
        if decision.source == "fallback":
            reason = fallback_reason or "the policy answered with its fallback"
            kind = reason.split(":", 1)[0]
            self.fallback_reasons[kind] = self.fallback_reasons.get(kind, 0) + 1
            self.total_fallbacks += 1
            self.info.fallbacks += 1
            log.warning(
                "round %d %s: fallback to the deterministic policy (%s)",
                obs.round,
                obs.phase,
                reason,
            )
        self.info.sources[obs.phase] = decision.source
        if guarded.changes:
            log.info(
                "round %d %s guard: %s",
                obs.round,
                obs.phase,
                "; ".join(guarded.changes),
            )
        if self.decision_log is not None:
            entry: dict[str, Any] = {
                "round": obs.round,
                "phase": obs.phase,
                "source": decision.source,
                "fallback_reason": fallback_reason,
                "latency_s": round(latency, 6),
                "rationale": decision.rationale,
                "decision": decision.model_dump(mode="json"),
                "guard_changes": list(guarded.changes),
            }
            if obs.phase == "aggregate":
                # The server-measured features the weights and flags were decided
                # on: a detector can be audited, or retuned offline, from the log.
                entry["replies"] = [
                    r.model_dump(mode="json", exclude_none=True) for r in obs.replies
                ]
            if call is not None:
                entry["llm"] = {
                    k: call[k]
                    for k in (
                        "latency_s",
                        "attempts",
                        "prompt_tokens",
                        "completion_tokens",
                        "cost_usd",
                        "prompt_sha256",
                        "response_sha256",
                        "guard_changes",
                    )
                    if k in call
                }
            if self._log_fh is None:
                # One handle for the run (opening the file costs more than the
                # write); every line is flushed, so a killed run keeps its
                # decisions for the resume's replay.
                self._log_fh = self.decision_log.open("a", encoding="utf-8")
                weakref.finalize(self, self._log_fh.close)
            self._log_fh.write(json.dumps(entry) + "\n")
            self._log_fh.flush()
        return decision

    def close(self) -> None:
        """Close the decision log (reopened on the next decision, if any)."""
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def policy_stats(self) -> dict[str, Any]:
        """Return decision counts, the fallback rate and LLM latency percentiles."""
        stats: dict[str, Any] = {
            "decisions": self.decisions,
            "fallbacks": self.total_fallbacks,
            "fallback_rate": self.total_fallbacks / self.decisions
            if self.decisions
            else 0.0,
            "fallback_reasons": dict(self.fallback_reasons),
            "llm_calls": len(self.llm_latencies),
        }
        # The guard's corrections of LLM answers (agent_strategy.llm.policy).
        corrections = getattr(getattr(self.telemetry, "llm", None), "corrections", None)
        if corrections is not None:
            stats["llm_corrections"] = dict(corrections)
        if self.llm_latencies:
            lat = np.array(self.llm_latencies)
            stats["llm_latency_p50_s"] = float(np.percentile(lat, 50))
            stats["llm_latency_p95_s"] = float(np.percentile(lat, 95))
        return stats

    def _fail(self, cid: str, reason: str, rejected: bool = False) -> None:
        self.info.failures[cid] = reason
        if rejected:
            self.info.rejected.append(cid)
        self.total_failures += 1
        state = self.clients[cid].state
        self.clients[cid].state = state.model_copy(
            update={"failures": state.failures + 1}
        )
        log.warning("client %s: %s", cid, reason)

    def _require(self, count: int, server_round: int, what: str) -> bool:
        """Return True if ``count`` suffices; else record the round as failed."""
        if count >= self.min_replies:
            return True
        detail = "; ".join(f"{c}: {r}" for c, r in sorted(self.info.failures.items()))
        self.info.failed = (
            f"round {server_round}: only {count} usable {what}, fewer than "
            f"min_replies={self.min_replies}; global model kept. Failures: "
            f"{detail or 'none'}"
        )
        log.warning("%s", self.info.failed)
        return False

    def _update_states(
        self,
        server_round: int,
        valid: dict[str, ValidReply],
        accepted: set[str],
        bad: set[str],
        faulty: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Update the client states, reputation and history after a round.

        ``bad``: flagged malicious (with the rejected, bad rounds for reputation);
        ``faulty``: flagged faulty (a broken update, dropped): neither a bad nor a
        good round, so it gives no record (``agent_strategy.detection``).
        """
        flagged = set(self.info.flagged)
        for cid, reply in valid.items():
            st = self.clients[cid].state
            self.clients[cid].state = st.model_copy(
                update={
                    "num_examples": reply.num_examples,
                    "last_loss": reply.train_loss,
                    "last_duration_s": reply.duration_s,
                    "rounds_accepted": st.rounds_accepted + int(cid in accepted),
                    "times_flagged": st.times_flagged + int(cid in flagged),
                }
            )
        if self.reputation is not None:
            for cid in sorted({*valid, *self.info.rejected}):
                if cid in faulty and cid not in self.info.rejected:
                    continue
                self.clients[cid].state = next_state(
                    self.clients[cid].state,
                    round_=server_round,
                    bad=cid in bad or cid in self.info.rejected,
                    params=self.reputation,
                )
        self.history.append(
            {
                "round": server_round,
                "replied": sorted({*valid, *self.info.rejected}),
                "rejected": sorted(self.info.rejected),
                "flagged": sorted(bad),
                "faulty": sorted(faulty),
                "excluded": sorted(
                    c
                    for c, cl in self.clients.items()
                    if cl.state.excluded_until > server_round
                ),
            }
        )
