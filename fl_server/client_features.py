"""Server side of the client features: upload decoding, personal layers, client eval.

:class:`ClientFeatures` is what :class:`~fl_server.strategy.AgentStrategy` calls from
a few hook lines:

* :meth:`~ClientFeatures.split` / :meth:`~ClientFeatures.merge`: under FedPer and
  FedRep the personal layers never come back, so the strategy aggregates the shared
  arrays only and keeps its own copy of the personal ones (the initial values, sent
  down each round and overwritten by every client with its own; the server's central
  accuracy therefore measures the shared body with an untrained head, not a client's
  model).
* :meth:`~ClientFeatures.train_config`: extra train instructions per client
  (``ef-expected``: the client sent error-feedback updates before and should hold a
  residual).
* :meth:`~ClientFeatures.decode`: a compressed reply is checked and decoded into
  dense weights before validation; a corrupt one raises
  :class:`~fl_server.validation.InvalidReply` with the reason.
* :meth:`~ClientFeatures.evaluate_messages` and
  :meth:`~ClientFeatures.aggregate_evaluate`: federated evaluation of the global and
  the personalized models on the clients' own test splits; the round's means land
  in ``results.jsonl``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

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

from agent_strategy.types import Compression
from fl_client.codec import SPARSE, CodecError, decode, topk_count
from fl_client.compression import META_KEY
from fl_client.personal import LAYER_MODES, personal_keys
from orchestration.config import RunConfig

from .validation import InvalidReply, ModelSpec

log = logging.getLogger("agentfl.strategy")


class ClientFeatures:
    """Compression, personalization and federated evaluation for the agent strategy.

    Parameters
    ----------
    codec : str
        The run's default upload codec (the policy's default allocation).
    topk_fraction : float
        Top-k's share of entries; a reply keeping more is rejected.
    error_feedback : bool
        Whether top-k clients keep a residual.
    personal_mode : str
        ``none``, ``fedper``, ``fedrep`` or ``ditto``.
    personal_layers : str
        FedPer's layer spec (see :func:`fl_client.personal.personal_keys`).
    evaluate_clients : bool
        Federated evaluation even without personalization.
    eval_every : int
        Federated evaluation every this many rounds (and in the last round).
    """

    def __init__(
        self,
        *,
        codec: Compression = "none",
        topk_fraction: float = 0.01,
        error_feedback: bool = True,
        personal_mode: str = "none",
        personal_layers: str = "last",
        evaluate_clients: bool = False,
        eval_every: int = 1,
    ) -> None:
        self.codec: Compression = codec
        self.topk_fraction = topk_fraction
        self.error_feedback = error_feedback
        self.personal_mode = personal_mode
        self.personal_layers = personal_layers
        self.evaluate = evaluate_clients or personal_mode != "none"
        self.eval_every = eval_every
        self.num_rounds = 1
        self.asked: dict[str, str] = {}
        self.ef_clients: set[str] = set()
        self.residuals_missing = 0
        self.round_metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ClientFeatures:
        """Build from the run configuration."""
        c, p = cfg.compression, cfg.personalization
        return cls(
            codec=c.codec,
            topk_fraction=c.topk_fraction,
            error_feedback=c.error_feedback,
            personal_mode=p.mode,
            personal_layers=p.personal_layers,
            evaluate_clients=p.evaluate_clients,
            eval_every=p.eval_every,
        )

    # ------------------------------------------------------------ personal layers
    def split(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Array]]:
        """Return the shared arrays and the server's copy of the personal ones."""
        if self.personal_mode not in LAYER_MODES:
            return arrays, {}
        keys = set(personal_keys(list(arrays.keys()), self.personal_layers))
        shared = ArrayRecord({k: v for k, v in arrays.items() if k not in keys})
        return shared, {k: v for k, v in arrays.items() if k in keys}

    def merge(
        self, arrays: ArrayRecord, kept: dict[str, Array], order: Sequence[str]
    ) -> ArrayRecord:
        """Put the kept personal arrays back, in the model's order ``order``."""
        if not kept:
            return arrays
        both = {**dict(arrays.items()), **kept}
        return ArrayRecord({k: both[k] for k in order})

    # ------------------------------------------------------------ compression
    def train_config(self, cid: str, codec: str) -> dict[str, int | str]:
        """Remember the codec asked of ``cid``; return its extra instructions."""
        self.asked[cid] = codec
        return {"ef-expected": int(cid in self.ef_clients)}

    def decode(
        self, cid: str, content: RecordDict, spec: ModelSpec, global_vec: np.ndarray
    ) -> RecordDict:
        """Return ``content`` with dense weights; raise InvalidReply if corrupt."""
        asked = self.asked.get(cid, "none")
        meta = content.config_records.get(META_KEY)
        if meta is None:
            if asked != "none":
                raise InvalidReply(f"codec mismatch: asked {asked}, got a dense update")
            return content
        codec = meta.get("codec")
        if not isinstance(codec, str) or codec != asked:
            raise InvalidReply(f"codec mismatch: asked {asked}, got {codec!r}")
        names, sizes = meta.get("names"), meta.get("sizes")
        want_sizes = [int(np.prod(s)) for s in spec.shapes]
        if names != list(spec.names) or sizes != want_sizes:
            raise InvalidReply(
                f"compressed update for arrays {names!r} of sizes {sizes!r}, expected "
                f"{list(spec.names)} of sizes {want_sizes}"
            )
        k, bits = meta.get("k"), meta.get("bits")
        if not isinstance(k, int) or not isinstance(bits, int):
            raise InvalidReply(
                f"compression k={k!r} and bits={bits!r} must be integers"
            )
        if len(content.array_records) != 1:
            raise InvalidReply(
                f"expected 1 ArrayRecord, got {len(content.array_records)}"
            )
        record = next(iter(content.array_records.values()))
        try:
            arrays = {name: arr.numpy() for name, arr in record.items()}
        except Exception as e:  # noqa: BLE001 - undecodable bytes reject the reply
            raise InvalidReply(f"compressed arrays cannot be read: {e}") from e
        max_k = (
            topk_count(int(sum(want_sizes)), self.topk_fraction)
            if codec in SPARSE
            else None
        )
        try:
            update = decode(
                arrays, codec=codec, sizes=want_sizes, k=k, bits=bits, max_k=max_k
            )
        except CodecError as e:
            raise InvalidReply(f"corrupt compressed update: {e}") from e
        if codec in SPARSE and self.error_feedback:
            self.ef_clients.add(cid)
        metrics = next(iter(content.metric_records.values()), MetricRecord())
        if metrics.get("ef-residual-missing", 0):
            self.residuals_missing += 1
            log.warning("client %s lost its error-feedback residual; plain top-k", cid)
        out = spec.to_record(global_vec + update)
        return RecordDict({"arrays": out, **dict(content.metric_records.items())})

    # ------------------------------------------------------------ evaluation
    def evaluate_messages(
        self, server_round: int, arrays: ArrayRecord, node_ids: Sequence[int]
    ) -> list[Message]:
        """Evaluate messages for every client, on evaluation rounds."""
        self.round_metrics = {}
        if not self.evaluate or not (
            server_round % self.eval_every == 0 or server_round >= self.num_rounds
        ):
            return []
        cfg = ConfigRecord({"server-round": server_round})
        return [
            Message(
                RecordDict({"arrays": arrays, "config": cfg}),
                message_type=MessageType.EVALUATE,
                dst_node_id=nid,
            )
            for nid in node_ids
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Mean (over clients) global and personalized accuracy; kept for results."""
        rows: list[dict[str, Any]] = []
        errors = 0
        for reply in replies:
            if reply.has_error():
                errors += 1
                log.warning(
                    "round %d: evaluation failed on a client: %s",
                    server_round,
                    reply.error.reason,
                )
                continue
            m = next(iter(reply.content.metric_records.values()), MetricRecord())
            acc = m.get("eval-acc")
            if not isinstance(acc, int | float) or not math.isfinite(acc):
                errors += 1
                log.warning("round %d: evaluation reply without eval-acc", server_round)
                continue
            rows.append(dict(m))
        if not rows:
            return None
        out: dict[str, float] = {
            "client_eval_n": float(len(rows)),
            "client_eval_errors": float(errors),
            "client_global_acc": float(np.mean([r["eval-acc"] for r in rows])),
        }
        personal = [r["personal-acc"] for r in rows if "personal-acc" in r]
        if personal:
            out["client_personal_acc"] = float(np.mean(personal))
            out["client_personal_acc_min"] = float(np.min(personal))
            out["client_personalized"] = float(
                sum(int(r.get("personalized", 0)) for r in rows)
            )
        self.round_metrics = out
        return MetricRecord(dict(out))

    def take_round_metrics(self) -> dict[str, float]:
        """Return this round's federated evaluation means (empty if none) and reset."""
        out, self.round_metrics = self.round_metrics, {}
        return out
