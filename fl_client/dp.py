"""Sample-level differential privacy: DP-SGD with Opacus, its accountant kept per node.

Opacus' ``PrivacyEngine.make_private`` turns the local SGD loop into DP-SGD (per-sample
gradient clipping to ``max_grad_norm``, Gaussian noise of ``noise_multiplier *
max_grad_norm``, Poisson-sampled batches). Its RDP accountant records one
``(noise_multiplier, sample_rate, steps)`` entry per distinct setting; that history is
stored in the node's ``context.state`` between rounds (:func:`load_history`,
:func:`save_history`), so epsilon keeps growing with every round the client trains
rather than restarting at zero. A client restarted without its state starts a new
history and says so (the epsilon it reports is then a lower bound).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .task.data import ArrayDataset

log = logging.getLogger("agentfl.client.dp")

#: ``context.state`` record holding the accountant's history.
STATE_KEY = "dp-accountant"
#: Metric key of the client's cumulative epsilon.
EPSILON_METRIC = "dp-epsilon"

History = list[tuple[float, float, int]]


def load_history(state: RecordDict) -> History:
    """Return the accountant history kept in ``state`` (empty if none)."""
    rec = state.config_records.get(STATE_KEY)
    if rec is None:
        return []
    sigmas, rates, steps = (rec.get(k, []) for k in ("sigma", "rate", "steps"))
    if not (
        isinstance(sigmas, list)
        and isinstance(rates, list)
        and isinstance(steps, list)
        and len(sigmas) == len(rates) == len(steps)
    ):
        log.warning("dp: accountant state is malformed; starting a new history")
        return []
    out: History = []
    for s, r, n in zip(sigmas, rates, steps, strict=True):
        if not isinstance(s, int | float) or not isinstance(r, int | float):
            return []
        if not isinstance(n, int):
            return []
        out.append((float(s), float(r), n))
    return out


def save_history(state: RecordDict, history: History) -> None:
    """Store ``history`` in ``state`` for the next round."""
    state.config_records[STATE_KEY] = ConfigRecord(
        {
            "sigma": [float(s) for s, _, _ in history],
            "rate": [float(r) for _, r, _ in history],
            "steps": [int(n) for _, _, n in history],
        }
    )


def epsilon_of(history: History, delta: float) -> float:
    """Return the RDP epsilon at ``delta`` of an accountant history (0 if empty)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta)) if history else 0.0


def train_dp_sgd(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    history: History,
) -> tuple[float, History]:
    """Train ``model`` in place with DP-SGD; return the mean loss and the new history.

    ``history`` is the accountant's state before this round; the returned one adds
    this round's steps. The trained weights are those of ``model`` itself (Opacus'
    ``GradSampleModule`` wraps it and shares its parameters, so no ``_module.``
    prefix reaches the reply).

    Raises
    ------
    FloatingPointError
        If the loss becomes non-finite.
    """
    from opacus import PrivacyEngine

    if len(data.y) == 0:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    private, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    loss_fn = nn.CrossEntropyLoss()
    private.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(yb) == 0:  # Poisson sampling may draw an empty batch
                continue
            opt.zero_grad()
            loss = loss_fn(private(xb), yb)
            with warnings.catch_warnings():  # Opacus' hooks on input-free modules
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            opt.step()
            total += float(loss.item()) * len(yb)
            count += len(yb)
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"DP-SGD loss is {mean}; lr={lr} may be too large")
    new_history = [
        (float(s), float(r), int(n)) for s, r, n in engine.accountant.history
    ]
    return mean, new_history
