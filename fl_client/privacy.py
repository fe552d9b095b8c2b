"""The ClientApp's privacy hooks: train-only mods and DP-SGD, chosen by the run config.

:func:`privacy_train_mod` is the one mod given to ``@app.train(mods=[...])``. It reads
the run config of each message (``flwr run`` only hands it over at message time) and
runs the train handler inside the mods that config asks for:

* ``secagg.enabled``: Flower's ``secaggplus_mod`` (outermost: weights, clips,
  quantizes and masks the reply) over :func:`fl_client.secagg.legacy_train_adapter`;
* ``dp.mode=client``: Flower's ``fixedclipping_mod`` (clips ``new - global`` to the
  norm the server's DP wrapper sends), innermost so that it clips what is sent.

Train-only on purpose: Flower's DP mods break evaluate messages when attached to the
whole app, and ``secaggplus_mod`` raises on messages without its configs.

:func:`train_private` is the sample-level path (``dp.mode=sample``): Opacus DP-SGD
with the accountant's history kept in ``context.state``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.client.mod import make_ffn, secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from torch import nn

from orchestration.config import RunConfig

from .dp import EPSILON_METRIC, epsilon_of, load_history, save_history, train_dp_sgd
from .secagg import legacy_train_adapter
from .task.data import ArrayDataset


def train_mods(cfg: RunConfig) -> list[Mod]:
    """Return the train-only mods ``cfg`` needs, outermost first."""
    mods: list[Mod] = []
    if cfg.secagg.enabled:
        mods += [secaggplus_mod, legacy_train_adapter]
    if cfg.dp.mode == "client":
        mods.append(fixedclipping_mod)
    return mods


def privacy_train_mod(resolve: Callable[[Context], RunConfig]) -> Mod:
    """Return a mod that wraps the train handler in the mods of the run's config."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        mods = train_mods(resolve(ctxt))
        if not mods:
            return call_next(msg, ctxt)
        return make_ffn(call_next, mods)(msg, ctxt)

    return mod


def train_private(
    cfg: RunConfig,
    model: nn.Module,
    data: ArrayDataset,
    context: Context,
    *,
    epochs: int,
    lr: float,
    seed: int,
) -> tuple[float, dict[str, float]]:
    """Train with DP-SGD; return the loss and the metrics to report (epsilon).

    The accountant's history is read from and written back to ``context.state``.
    """
    history, loss = load_history(context.state), 0.0
    loss, history = train_dp_sgd(
        model,
        data,
        epochs=epochs,
        lr=lr,
        momentum=cfg.train.momentum,
        batch_size=cfg.train.batch_size,
        seed=seed,
        noise_multiplier=cfg.dp.noise_multiplier,
        max_grad_norm=cfg.dp.clipping_norm,
        history=history,
    )
    save_history(context.state, history)
    return loss, {EPSILON_METRIC: epsilon_of(history, cfg.dp.delta)}
