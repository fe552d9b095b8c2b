"""Personalization on the client: personal layers (FedPer) and a Ditto personal model.

* ``fedper``: the arrays named by ``personalization.personal_layers`` (by default the
  final layer) are the client's own. They are kept in ``context.state`` between rounds,
  loaded over the received global ones before training and evaluation, and never
  uploaded: the reply carries the shared body only.
* ``fedrep`` (Collins et al., ICML 2021): the same split and storage as ``fedper``,
  but local training has two phases (:func:`train_rep`): the head (the personal
  layers) for ``personalization.head_epochs`` with the body frozen, then the body for
  the allocated local epochs with the head frozen. Only the body is uploaded.
* ``ditto``: the global model is trained and uploaded as usual; besides it the client
  keeps a full personal model in ``context.state``, trained each round on the local data
  with the proximal term ``lambda / 2 * ||v - w_global||^2`` to the received global.

The model a client would actually use is the personalized one (global body + own head,
or the Ditto model); before its first training round it is the global model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

LAYERS_KEY = "personal.layers"
MODEL_KEY = "personal.model"
#: Modes whose personal layers stay on the client (only the body is uploaded).
LAYER_MODES = frozenset({"fedper", "fedrep"})


def personal_keys(names: Sequence[str], spec: str) -> tuple[str, ...]:
    """Return the array names that stay on the client.

    ``spec`` is ``"last"`` (every array of the last module, e.g. the final linear
    layer's weight and bias) or comma-separated name prefixes (``"head.2"``).

    Raises
    ------
    ValueError
        If ``spec`` selects nothing, or everything (nothing would be shared).
    """
    names = list(names)
    if not names:
        raise ValueError("the model has no arrays")
    if spec.strip() == "last":
        module = names[-1].rsplit(".", 1)[0]
        keys = [n for n in names if n.rsplit(".", 1)[0] == module]
    else:
        prefixes = [p.strip() for p in spec.split(",") if p.strip()]
        keys = [
            n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)
        ]
    if not keys:
        raise ValueError(
            f"personalization.personal_layers={spec!r} matches no array; names: "
            f"{', '.join(names)}"
        )
    if len(keys) == len(names):
        raise ValueError(
            f"personalization.personal_layers={spec!r} matches every array; "
            "nothing would be shared"
        )
    return tuple(keys)


def load_layers(model: nn.Module, state: RecordDict) -> bool:
    """Load the client's personal layers over ``model``; False if it has none yet."""
    record = state.array_records.get(LAYERS_KEY)
    if record is None:
        return False
    model.load_state_dict(record.to_torch_state_dict(), strict=False)
    return True


def keep_layers(
    model: nn.Module, keys: Sequence[str], state: RecordDict
) -> ArrayRecord:
    """Store the personal layers in ``state``; return the shared arrays to upload."""
    sd = model.state_dict()
    state[LAYERS_KEY] = ArrayRecord({k: sd[k] for k in keys})
    kept = set(keys)
    return ArrayRecord({k: v for k, v in sd.items() if k not in kept})


def load_model(model: nn.Module, state: RecordDict) -> bool:
    """Load the Ditto personal model into ``model``; False if it has none yet."""
    record = state.array_records.get(MODEL_KEY)
    if record is None:
        return False
    model.load_state_dict(record.to_torch_state_dict())
    return True


def store_model(model: nn.Module, state: RecordDict) -> None:
    """Keep ``model`` as the Ditto personal model."""
    state[MODEL_KEY] = ArrayRecord(model.state_dict())


def anchor_of(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``model``'s parameters (the proximal anchor)."""
    return [p.detach().clone() for p in model.parameters()]


def train_rep(
    model: nn.Module,
    keys: Sequence[str],
    fit: Callable[..., float],
    *,
    head_epochs: int,
    body_epochs: int,
    proximal_mu: float = 0.0,
) -> tuple[float, float]:
    """FedRep's local update: the head with the body frozen, then the reverse.

    Parameters
    ----------
    model : nn.Module
        Global body with the client's own head loaded; trained in place.
    keys : sequence of str
        The head's array names (:func:`personal_keys`); buffers among them are not
        trained.
    fit : callable
        ``fit(model, epochs=..., proximal_mu=...)`` trains the parameters that
        require gradients and returns the mean loss.
    head_epochs, body_epochs : int
        Epochs of each phase (``personalization.head_epochs``, the allocated local
        epochs).
    proximal_mu : float
        FedProx term of the body phase, anchored at the received body.

    Returns
    -------
    tuple of float
        Mean training loss of the head phase and of the body phase.

    Raises
    ------
    ValueError
        If an epoch count is below 1 or ``keys`` names no parameter of ``model``.
    """
    if head_epochs < 1 or body_epochs < 1:
        raise ValueError(
            f"head_epochs={head_epochs} and body_epochs={body_epochs} must be >= 1"
        )
    params = dict(model.named_parameters())
    head = set(keys) & set(params)
    if not head:
        raise ValueError(f"no parameter of the model is personal: {list(keys)}")
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        for name, p in params.items():
            p.requires_grad_(name in head)
        head_loss = fit(model, epochs=head_epochs)
        for name, p in params.items():
            p.requires_grad_(name not in head)
        body_loss = fit(model, epochs=body_epochs, proximal_mu=proximal_mu)
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])
    return head_loss, body_loss
