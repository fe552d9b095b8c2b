"""``SecAggStrategy``: the agent brain behind Flower's legacy API, for SecAgg+.

Flower runs SecAgg+ (``SecAggPlusWorkflow``) only with a legacy
``flwr.server.strategy.Strategy``. This adapter is that strategy, and it delegates
every decision to the same :class:`~fl_server.strategy.AgentStrategy` (roll call,
observation, policy, guard, client states, decision log), so the agent behaves as it
does without secure aggregation wherever that is still possible:

* **selection and allocation** (``configure_fit``): unchanged; the agent's own
  ``configure_train`` builds the per-client configs (epochs, lr, deadline).
* **weights** are fixed *before* training, because ``secaggplus_mod`` multiplies each
  update by its weight before masking: the policy's aggregate phase is asked with
  features made of what clients *reported* in earlier rounds (examples, loss,
  duration); the guarded shares travel to each client as an integer
  (``secagg-weight``, in units of ``1 / WEIGHT_SCALE``). The unmasked sum the
  workflow hands :meth:`aggregate_fit` is then already the policy-weighted mean.
* **detection** uses reported quantities only (loss, duration, examples, the weight
  the client says it used): flags update the client's history and so steer later
  selection, but cannot remove a contribution already inside the sum.
* the server never holds an individual update: every ``FitRes`` the workflow passes
  carries the same aggregate; :attr:`rounds` records that it did (one distinct payload
  per round).

What the agent cannot do under SecAgg+: measure update norms or cosines, run a robust
rule (median, trimmed mean, Krum), or drop a flagged update from this round's
aggregate (see ``docs/privacy.md``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_stdv,
)

from agent_strategy import ReplyFeatures
from fl_client.secagg import NAMES_KEY, USED_WEIGHT_KEY, WEIGHT_KEY

from .aggregation import flatten_arrays, l2_norms, unflatten_vector
from .privacy import RoundAccountant, effective_noise_multiplier
from .privacy_metrics import record_reported_epsilon
from .strategy import AgentStrategy, RoundFailedError

log = logging.getLogger("agentfl.secagg")

#: Integer weight units per unit share; also the workflow's ``max_weight``.
WEIGHT_SCALE = 10_000
#: ``Observation.plan`` shown to the policy when it weights before masking.
PLAN_NOTE = (
    "secagg: weights are fixed before training from reported metrics; "
    "update_norm and cosine_to_median are not observable (placeholders 0 and 1)"
)


def integer_weights(
    shares: dict[str, float], scale: int = WEIGHT_SCALE
) -> dict[str, int]:
    """Return ``shares`` (non-negative, any sum) as integers summing to about ``scale``.

    Raises
    ------
    ValueError
        If a share is negative or non-finite, or all are zero.
    """
    vals = np.array(list(shares.values()), dtype=float)
    if not np.all(np.isfinite(vals)) or np.any(vals < 0) or vals.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0: {shares}")
    ints = np.rint(vals / vals.sum() * scale).astype(int)
    return {cid: int(w) for cid, w in zip(shares, ints, strict=True)}


@dataclass
class ClientDPNoise:
    """Client-level DP composed with SecAgg+ (``dp.mode=client``).

    Clients clip ``new - global`` to ``clipping_norm`` with Flower's
    ``fixedclipping_mod`` before masking; the server adds Flower's Gaussian noise
    (std ``noise_multiplier * clipping_norm / num_sampled``) to the unmasked
    aggregate, and accounts as :class:`~fl_server.privacy.AgentClientDP` does.
    """

    noise_multiplier: float
    clipping_norm: float
    num_sampled: int
    delta: float
    seed: int = 0
    ledger: RoundAccountant = field(init=False)

    def __post_init__(self) -> None:
        """Start the accountant."""
        self.ledger = RoundAccountant(self.delta)

    def apply(self, delta: np.ndarray, shares: list[float]) -> tuple[np.ndarray, float]:
        """Return the noised aggregate update and the cumulative epsilon."""
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled)
        noised = [delta.copy()]
        add_gaussian_noise_inplace(noised, stdv)
        sigma = effective_noise_multiplier(
            self.noise_multiplier, self.num_sampled, max(shares) if shares else 1.0
        )
        return noised[0], self.ledger.step(sigma)


class SecAggStrategy(LegacyStrategy):
    """Legacy-API adapter of :class:`AgentStrategy` for Flower's SecAgg+ workflow.

    Parameters
    ----------
    agent : AgentStrategy
        The brain: policy, guard, client states, round info, decision log. Its
        ``limits.rules`` become ``("weighted",)`` (logged once if they were not): a
        robust rule needs the individual updates, so the guard turns any other choice
        into the weighted mean, recorded in the decision log.
    grid : Grid
        Used for the agent's roll call (legacy ``configure_fit`` gets no grid).
    initial : ArrayRecord
        The initial global model (names, shapes, dtypes come from it).
    evaluate_fn : callable
        ``(server_round, arrays) -> MetricRecord`` with ``accuracy`` and ``loss``
        (the run's :class:`~fl_server.results.RoundRecorder`).
    train_config : dict
        Base train config sent to every client (the agent adds its allocation).
    client_dp : ClientDPNoise, optional
        Client-level DP noise and accounting (``dp.mode=client``).
    """

    def __init__(
        self,
        agent: AgentStrategy,
        *,
        grid: Grid,
        initial: ArrayRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
        train_config: dict[str, Scalar] | None = None,
        client_dp: ClientDPNoise | None = None,
    ) -> None:
        super().__init__()
        if agent.limits.rules != ("weighted",):
            # The masked sum is all the server gets: only the weighted mean applies.
            log.warning(
                "SecAgg+: the server sees only the masked sum, so a robust rule "
                "cannot be applied; aggregation limited to the weighted mean "
                "(defense.rules %s not used)",
                ",".join(agent.limits.rules),
            )
            agent.limits = agent.limits.model_copy(update={"rules": ("weighted",)})
        self.agent = agent
        self.grid = grid
        self.names = list(initial.keys())
        self.initial = initial
        self.evaluate_fn = evaluate_fn
        self.train_config = dict(train_config or {})
        self.client_dp = client_dp
        if client_dp is not None:
            self.train_config[KEY_CLIPPING_NORM] = client_dp.clipping_norm
        self.assigned: dict[str, int] = {}
        self.rounds: list[dict[str, Any]] = []
        self._aggregated: set[int] = set()

    def __repr__(self) -> str:
        """Name the adapter in Flower's logs."""
        return "SecAggStrategy(AgentStrategy)"

    # --------------------------------------------------------------- legacy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """Return the initial global model."""
        return ndarrays_to_parameters(self.initial.to_numpy_ndarrays())

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Select and allocate with the agent, then fix each client's weight."""
        arrays = self.named(parameters)
        messages = list(
            self.agent.configure_train(
                server_round,
                arrays,
                ConfigRecord(dict(self.train_config)),
                self.grid,
            )
        )
        by_node = {c.node_id: cid for cid, c in self.agent.clients.items()}
        selected = [by_node[m.metadata.dst_node_id] for m in messages]
        self.assigned = self._preweights(server_round, selected)
        proxies = {p.node_id: p for p in client_manager.all().values()}
        instructions = []
        for msg, cid in zip(messages, selected, strict=True):
            proxy = proxies.get(msg.metadata.dst_node_id)
            if proxy is None:
                self.agent._fail(cid, "node not registered with the client manager")
                continue
            config: dict[str, Scalar] = dict(msg.content["config"])  # type: ignore[arg-type]
            config[NAMES_KEY] = ",".join(self.names)
            config[WEIGHT_KEY] = self.assigned[cid]
            instructions.append((proxy, FitIns(parameters, config)))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Apply the unmasked weighted mean update; detect from reported metrics."""
        agent = self.agent
        if agent._global is None or agent._spec is None:
            raise RuntimeError("aggregate_fit called before configure_fit")
        digests = {_digest(res.parameters) for _, res in results}
        by_node = {c.node_id: cid for cid, c in agent.clients.items()}
        reported: dict[str, dict[str, Scalar]] = {}
        for proxy, res in results:
            cid = by_node.get(proxy.node_id)
            if cid is None or cid not in agent.info.selected:
                log.warning("round %d: result from an unexpected node", server_round)
                continue
            reported[cid] = dict(res.metrics)
        for cid in agent.info.selected:
            if cid not in reported and cid not in agent.info.failures:
                agent._fail(cid, "dropped out of the SecAgg+ protocol")
        if not agent._require(len(reported), server_round, "SecAgg+ contributions"):
            return None, {}  # round recorded as failed; the global model is kept
        if len(digests) != 1:
            raise RuntimeError(
                f"round {server_round}: {len(digests)} distinct payloads reached the "
                "strategy; SecAgg+ must hand it one aggregate"
            )
        delta = flatten_arrays(parameters_to_ndarrays(results[0][1].parameters))
        if delta.size != agent._global.size or not np.all(np.isfinite(delta)):
            raise RoundFailedError(
                f"round {server_round}: the unmasked aggregate has {delta.size} values "
                f"(expected {agent._global.size}) or non-finite ones; a client may "
                "have overflowed secagg.clipping_range"
            )
        if self.client_dp is not None:
            total = sum(self.assigned.get(c, 0) for c in reported) or 1
            shares = [self.assigned.get(c, 0) / total for c in reported]
            delta, eps = self.client_dp.apply(delta, shares)
            agent.info.epsilons["server"] = eps
        for cid, m in reported.items():
            record_reported_epsilon(agent.info.epsilons, cid, m)
        features = self._reported_features(server_round, reported)
        self._detect(server_round, features)
        accepted = [f.id for f in features]
        agent.info.accepted = accepted
        self._update_states(features)
        new_global = agent._global + delta
        self._aggregated.add(server_round)
        self.rounds.append(
            {
                "round": server_round,
                "selected": len(agent.info.selected),
                "contributions": len(results),
                "dropped": len(agent.info.selected) - len(reported),
                "failures_reported_by_workflow": len(failures),
                "distinct_payloads": len(digests),
                "assigned_weights": dict(self.assigned),
                "aggregate_update_norm": float(l2_norms(delta[None, :])[0]),
            }
        )
        losses = [float(f.train_loss) for f in features]
        weights = [self.assigned.get(c, 0) for c in accepted]
        metrics: dict[str, Scalar] = {
            "train-loss": float(np.average(losses, weights=weights))
            if sum(weights) > 0
            else float(np.mean(losses)),
            "accepted": len(accepted),
            "flagged": len(agent.info.flagged),
            "failures": len(agent.info.failures),
        }
        out = unflatten_vector(
            new_global, list(agent._spec.shapes), list(agent._spec.dtypes)
        )
        return ndarrays_to_parameters(out), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Federated evaluation is off; the server evaluates centrally."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[Any],
        failures: list[Any],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate centrally; a round whose SecAgg+ protocol halted fails the run."""
        if server_round > 0 and server_round not in self._aggregated:
            detail = "; ".join(
                f"{c}: {r}" for c, r in sorted(self.agent.info.failures.items())
            )
            raise RoundFailedError(
                f"round {server_round}: the SecAgg+ protocol halted before unmasking "
                "(too few clients left to reach secagg.reconstruction_threshold). "
                f"Failures: {detail or 'none reported'}"
            )
        res = self.evaluate_fn(server_round, self.named(parameters))
        if res is None:
            return None
        loss = float(res.get("loss", math.nan))  # type: ignore[arg-type]
        return loss, {"accuracy": float(res.get("accuracy", math.nan))}  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helpers
    def named(self, parameters: Parameters) -> ArrayRecord:
        """Return legacy ``parameters`` as an ``ArrayRecord`` with the model's names."""
        nds = parameters_to_ndarrays(parameters)
        return ArrayRecord(
            {n: Array(np.asarray(a)) for n, a in zip(self.names, nds, strict=True)}
        )

    def _preweights(self, server_round: int, selected: list[str]) -> dict[str, int]:
        """Ask the policy for weights from what the selected clients reported."""
        feats = []
        for cid in selected:
            st = self.agent.clients[cid].state
            feats.append(
                ReplyFeatures(
                    id=cid,
                    num_examples=max(st.num_examples, 1),
                    train_loss=st.last_loss if st.last_loss is not None else 0.0,
                    duration_s=st.last_duration_s or 0.0,
                    # The server never sees the update: no geometry (None), and
                    # no norm (0 stands for "not measured"; docs/privacy.md).
                    update_norm=0.0,
                    cosine_to_median=None,
                )
            )
        decision = self.agent._decide(
            self.agent.aggregate_observation(
                server_round, tuple(feats), {"plan": PLAN_NOTE}
            )
        )
        shares = {cid: decision.weights.get(cid, 0.0) for cid in selected}
        if sum(shares.values()) <= 0:
            shares = {cid: 1.0 for cid in selected}
        weights = integer_weights(shares)
        log.info(
            "round %d: SecAgg+ weights fixed before masking: %s", server_round, weights
        )
        return weights

    def _reported_features(
        self, server_round: int, reported: dict[str, dict[str, Scalar]]
    ) -> tuple[ReplyFeatures, ...]:
        feats = []
        for cid in sorted(reported, key=lambda c: int(c[1:])):
            m = reported[cid]
            n, loss, dur, pid = (
                m.get("num-examples"),
                m.get("train-loss"),
                m.get("train-duration"),
                m.get("partition-id"),
            )
            if pid != int(cid[1:]):
                self.agent._fail(cid, f"reported partition-id {pid!r} != {cid}")
            ok = (
                isinstance(n, int)
                and n > 0
                and isinstance(loss, int | float)
                and math.isfinite(loss)
                and isinstance(dur, int | float)
                and math.isfinite(dur)
                and dur >= 0
            )
            if not ok:
                # Its (weighted) update is already in the sum: it can only be flagged.
                self.agent.info.flagged[cid] = f"faulty: malformed metrics {m!r:.120}"
                continue
            feats.append(
                ReplyFeatures(
                    id=cid,
                    num_examples=int(n),  # type: ignore[arg-type]
                    train_loss=float(loss),  # type: ignore[arg-type]
                    duration_s=float(dur),  # type: ignore[arg-type]
                    # The server never sees the update: no geometry (None), and
                    # no norm (0 stands for "not measured"; docs/privacy.md).
                    update_norm=0.0,
                    cosine_to_median=None,
                )
            )
            used = m.get(USED_WEIGHT_KEY)
            if used != self.assigned.get(cid):
                self.agent.info.flagged[cid] = (
                    f"faulty: used weight {used!r}, assigned {self.assigned.get(cid)}"
                )
        if not feats:
            raise RoundFailedError(
                f"round {server_round}: no SecAgg+ contributor reported usable metrics"
            )
        return tuple(feats)

    def _detect(self, server_round: int, features: tuple[ReplyFeatures, ...]) -> None:
        """Flag from reported metrics (they steer later rounds, not this sum)."""
        obs = self.agent.aggregate_observation(
            server_round, features, {"plan": PLAN_NOTE}
        )
        decision = self.agent._decide(obs)
        if self.agent.telemetry is not None:
            self.agent.telemetry.after_aggregate(obs, decision)
        for f in decision.flags:
            self.agent.info.flagged.setdefault(f.id, f"{f.kind}: {f.reason}")

    def _update_states(self, features: tuple[ReplyFeatures, ...]) -> None:
        flagged = set(self.agent.info.flagged)
        for f in features:
            client = self.agent.clients[f.id]
            st = client.state
            client.state = st.model_copy(
                update={
                    "num_examples": f.num_examples,
                    "last_loss": f.train_loss,
                    "last_duration_s": f.duration_s,
                    "rounds_accepted": st.rounds_accepted + 1,
                    "times_flagged": st.times_flagged + int(f.id in flagged),
                }
            )


def _digest(parameters: Parameters) -> str:
    h = hashlib.sha256()
    for t in parameters.tensors:
        h.update(t)
    return h.hexdigest()
