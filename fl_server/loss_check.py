"""Server-checked loss: each candidate model evaluated on a small server validation set.

With ``defense.enabled`` and ``defense.loss_check_examples > 0`` the agent strategy
evaluates, for every accepted reply, the *candidate* model ``global + update`` on a
validation set the server holds, and gives the policy (and the detectors of
:mod:`agent_strategy.detection`) three numbers per reply:

* ``checked_loss``: the candidate's mean cross-entropy on the validation set;
* ``checked_accuracy``: its accuracy there;
* ``loss_gap``: ``checked_loss - train_loss``, the server's loss minus the loss the
  client reported (a client poisoning its labels reports a low loss on its own,
  flipped labels, while its model is bad on correct ones).

The global model's own loss (``base_loss``) is measured too, once per round.

The validation set
------------------
It must be disjoint from the central test set (the benchmark's accuracy) and from
every client's training data, and building it must change neither, so that the
agent's columns and Flower's see the same clients and the same test set. MNIST-5k
has no example left over (the central test set is 20%, the clients share the rest,
each holding out ``dataset.client_test_fraction`` as its local test split), so the
server's set is a seeded sample of ``loss_check_examples`` examples from the union
of the clients' *held-out test splits*: examples no client trains on and the central
evaluation never uses (they serve only federated evaluation, off in the benchmarks).
In a deployment this is the small clean "root" data set an operator holds (as in
FLTrust, Cao et al., NDSS 2021); the simulation draws it from data it already has.

Cost
----
One forward pass of ``n + 1`` models over the set per round (``torch.no_grad``, one
model reused through :func:`torch.func.functional_call`, no copies of the state
dict); the seconds spent are kept in :attr:`LossChecker.seconds`. Nothing of this
module runs unless the check is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array
from torch.func import functional_call

from fl_client.task import ArrayDataset, build_model, split_for
from orchestration.config import RunConfig

from .validation import ModelSpec

log = logging.getLogger("agentfl.loss_check")


def validation_set(cfg: RunConfig) -> ArrayDataset:
    """Return the server's validation set: a sample of the clients' held-out splits.

    ``cfg.defense.loss_check_examples`` examples (all of them if the splits hold
    fewer) drawn without replacement with the run's seed from the union of the
    clients' local test splits (see the module docstring for why).

    Raises
    ------
    ValueError
        If ``loss_check_examples`` is not positive.
    """
    k = cfg.defense.loss_check_examples
    if k <= 0:
        raise ValueError(f"defense.loss_check_examples must be > 0, got {k}")
    clients, _ = split_for(cfg)
    x = np.concatenate([c.test.x for c in clients])
    y = np.concatenate([c.test.y for c in clients])
    rng = np.random.default_rng([cfg.seed, 0x105])
    idx = np.sort(rng.choice(len(y), size=min(k, len(y)), replace=False))
    return ArrayDataset(x[idx], y[idx], clients[0].test.num_classes)


def mean_loss_and_accuracy(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``logits`` for ``labels``."""
    loss = torch.nn.functional.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return float(loss), float(acc)


def top_class_share(predicted: torch.Tensor | np.ndarray) -> float:
    """Return the share of ``predicted`` (class indices) equal to its commonest class.

    ``1 / num_classes`` at best for a model spreading its predictions evenly, 1.0
    for one predicting a single class.

    Raises
    ------
    ValueError
        If ``predicted`` is empty or not a 1-D array of non-negative integers.
    """
    p = np.asarray(predicted)
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(
            "top_class_share needs a non-empty 1-D array of class indices, got "
            f"shape {p.shape} dtype {p.dtype}"
        )
    if p.min() < 0:
        raise ValueError("class indices must be >= 0")
    return float(np.bincount(p).max() / p.size)


@dataclass(frozen=True)
class CheckedLosses:
    """One round's server-checked losses, one row per update (rows as given)."""

    base_loss: float
    base_accuracy: float
    losses: np.ndarray
    accuracies: np.ndarray
    seconds: float
    top_shares: np.ndarray | None = None

    def fields(self, row: int, train_loss: float) -> dict[str, float]:
        """Return the :class:`~agent_strategy.ReplyFeatures` fields of one row."""
        loss = float(self.losses[row])
        return {
            "checked_loss": loss,
            "checked_accuracy": float(self.accuracies[row]),
            "loss_gap": loss - train_loss,
            **(
                {"checked_top_share": float(self.top_shares[row])}
                if self.top_shares is not None
                else {}
            ),
        }


class LossChecker:
    """Evaluates candidate models ``global + update`` on the server's validation set.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the run's architecture; its weights are never used (every
        evaluation passes its own through ``functional_call``).
    data : ArrayDataset
        The validation set.
    batch_size : int
        Examples per forward pass.
    """

    def __init__(
        self, model: torch.nn.Module, data: ArrayDataset, batch_size: int = 512
    ) -> None:
        if len(data.y) == 0:
            raise ValueError("the loss check needs at least one validation example")
        self.model = model.eval()
        self.x = torch.from_numpy(np.ascontiguousarray(data.x))
        self.y = torch.from_numpy(np.ascontiguousarray(data.y))
        self.batch_size = batch_size
        self.seconds = 0.0
        self.rounds = 0
        self.models_evaluated = 0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LossChecker | None:
        """Return the run's checker, or None when defense or the check is off."""
        if not cfg.defense.enabled or cfg.defense.loss_check_examples <= 0:
            return None
        data = validation_set(cfg)
        model = build_model(cfg.model.name, data.input_shape, data.num_classes, 0)
        log.info("loss check: %d server validation examples", len(data.y))
        return cls(model, data)

    def _evaluate(self, params: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """Return the loss, the accuracy and the top-class share of one model."""
        loss = acc = 0.0
        predicted = []
        for i in range(0, len(self.y), self.batch_size):
            xb, yb = self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            logits = functional_call(self.model, params, (xb,))
            lb, ab = mean_loss_and_accuracy(logits, yb)
            loss += lb * len(yb)
            acc += ab * len(yb)
            predicted.append(logits.argmax(1))
        share = top_class_share(torch.cat(predicted).numpy())
        return loss / len(self.y), acc / len(self.y), share

    @torch.no_grad()
    def check(
        self,
        global_: np.ndarray,
        updates: np.ndarray,
        spec: ModelSpec,
        kept: Mapping[str, Array] | None = None,
    ) -> CheckedLosses:
        """Return the losses of ``global_`` and of ``global_ + row`` for each row.

        Parameters
        ----------
        global_ : numpy.ndarray
            The flattened shared arrays of the global model.
        updates : numpy.ndarray
            One row per reply: ``new - global`` (float32).
        spec : ModelSpec
            Names and shapes of the shared arrays (the order of ``global_``).
        kept : mapping of str to Array, optional
            Arrays the server keeps and does not aggregate (personal layers): the
            server's copies complete every candidate.
        """
        start = time.perf_counter()
        fixed = {
            k: torch.from_numpy(np.ascontiguousarray(v.numpy()))
            for k, v in (kept or {}).items()
        }
        bounds = np.cumsum([0, *spec.counts])

        def params(vec: np.ndarray) -> dict[str, torch.Tensor]:
            out = dict(fixed)
            for name, shape, a, b in zip(
                spec.names, spec.shapes, bounds[:-1], bounds[1:], strict=True
            ):
                out[name] = torch.from_numpy(vec[a:b]).view(shape)
            return out

        base = np.ascontiguousarray(global_, dtype=np.float32)
        base_loss, base_acc, _ = self._evaluate(params(base))
        base_loss = base_loss if np.isfinite(base_loss) else np.inf
        n = updates.shape[0]
        losses, accs, shares = np.empty(n), np.empty(n), np.empty(n)
        candidate = np.empty_like(base)
        for i in range(n):
            np.add(base, updates[i], out=candidate)
            losses[i], accs[i], shares[i] = self._evaluate(params(candidate))
        # A candidate whose weights overflow scores NaN: as bad as it gets.
        losses[~np.isfinite(losses)] = np.inf
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.rounds += 1
        self.models_evaluated += n + 1
        return CheckedLosses(base_loss, base_acc, losses, accs, seconds, shares)

    def stats(self) -> dict[str, float | int]:
        """Return the validation set size and the time spent so far."""
        return {
            "examples": len(self.y),
            "rounds": self.rounds,
            "models_evaluated": self.models_evaluated,
            "seconds": round(self.seconds, 3),
            "seconds_per_round": round(self.seconds / self.rounds, 4)
            if self.rounds
            else 0.0,
        }
