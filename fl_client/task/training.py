"""Local training and evaluation loops (plain PyTorch)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .data import ArrayDataset


def _batches(
    data: ArrayDataset, batch_size: int, rng: np.random.Generator | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(data.y)) if rng is not None else np.arange(len(data.y))
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    return [
        (x[order[i : i + batch_size]], y[order[i : i + batch_size]])
        for i in range(0, len(order), batch_size)
    ]


def train(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
) -> float:
    """Train ``model`` in place with SGD; return the mean training loss.

    With ``proximal_mu > 0`` the FedProx term ``mu / 2 * ||w - w_start||^2`` is added
    to the loss, ``w_start`` being the weights the model had on entry, or ``anchor``
    (one tensor per parameter) if given: Ditto's proximal term to the global model.

    Raises
    ------
    FloatingPointError
        If the loss becomes non-finite (a diverging learning rate, bad data).
    """
    if len(data.y) == 0:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    if proximal_mu <= 0:
        anchor = []
    elif anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in _batches(data, batch_size, rng):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            objective = loss
            if anchor:
                prox = sum(
                    ((p - a) ** 2).sum()
                    for p, a in zip(model.parameters(), anchor, strict=True)
                )
                objective = loss + 0.5 * proximal_mu * prox
            objective.backward()
            opt.step()
            total += float(loss.item()) * len(yb)
            count += len(yb)
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss is {mean}; lr={lr} may be too large")
    return mean


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ArrayDataset, batch_size: int = 512
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of ``model`` on ``data``."""
    if len(data.y) == 0:
        raise ValueError("no evaluation examples")
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    for xb, yb in _batches(data, batch_size, None):
        logits = model(xb)
        total += float(loss_fn(logits, yb).item())
        correct += int((logits.argmax(1) == yb).sum().item())
    return total / len(data.y), correct / len(data.y)
