"""What a client does around plain local training: personalization and compression.

Called from the ClientApp's handlers by a few hook lines:
:func:`before_train` (load personal layers), :func:`local_train` (FedRep's two phases,
else plain training), :func:`after_train` (keep personal layers, train the Ditto
model, encode the upload) and :func:`personal_metrics` (evaluate the model the client
would actually use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from orchestration.config import RunConfig

from . import personal
from .compression import META_KEY, Upload, compress_upload
from .task import ArrayDataset, evaluate


def before_train(cfg: RunConfig, model: nn.Module, state: RecordDict) -> None:
    """FedPer, FedRep: put the client's own layers over the received global ones."""
    if cfg.personalization.mode in personal.LAYER_MODES:
        personal.load_layers(model, state)


def local_train(
    cfg: RunConfig,
    model: nn.Module,
    fit: Callable[..., float],
    *,
    epochs: int,
    proximal_mu: float,
) -> tuple[float, dict[str, float]]:
    """Train ``model`` locally; return the loss and extra metrics.

    FedRep trains the head (``head_epochs``, body frozen) and then the body
    (``epochs``, head frozen): the loss is the body phase's, ``head-loss`` the head
    phase's. Every other mode trains the whole model for ``epochs``.
    """
    p = cfg.personalization
    if p.mode != "fedrep":
        return fit(model, epochs=epochs, proximal_mu=proximal_mu), {}
    keys = personal.personal_keys(list(model.state_dict()), p.personal_layers)
    head_loss, loss = personal.train_rep(
        model,
        keys,
        fit,
        head_epochs=p.head_epochs,
        body_epochs=epochs,
        proximal_mu=proximal_mu,
    )
    return loss, {"head-loss": head_loss}


def after_train(
    cfg: RunConfig,
    model: nn.Module,
    received: ArrayRecord,
    conf: ConfigRecord,
    state: RecordDict,
    *,
    build: Callable[[], nn.Module],
    fit: Callable[..., float],
    seed: int,
) -> Upload:
    """Return what the train reply carries, after the personalization steps.

    Parameters
    ----------
    model : nn.Module
        The locally trained model.
    received : ArrayRecord
        The global model this round started from.
    conf : ConfigRecord
        The server's instructions: ``compression`` (codec), ``ef-expected``.
    build : callable
        Returns a fresh model holding the received global weights.
    fit : callable
        ``fit(model, epochs=..., proximal_mu=..., anchor=...)`` trains locally.
    seed : int
        Seeds the stochastic rounding of the codec.
    """
    p = cfg.personalization
    if p.mode in personal.LAYER_MODES:
        keys = personal.personal_keys(list(received.keys()), p.personal_layers)
        arrays = personal.keep_layers(model, keys, state)
    else:
        arrays = ArrayRecord(model.state_dict())
    extra: dict[str, int | float] = {}
    if p.mode == "ditto":
        anchor = personal.anchor_of(build())
        own = build()
        personal.load_model(own, state)
        extra["personal-loss"] = fit(
            own, epochs=p.ditto_epochs, proximal_mu=p.ditto_lambda, anchor=anchor
        )
        personal.store_model(own, state)
    codec = conf.get("compression", "none")
    upload = compress_upload(
        arrays,
        received,
        str(codec),
        fraction=cfg.compression.topk_fraction,
        error_feedback=cfg.compression.error_feedback,
        ef_expected=bool(conf.get("ef-expected", 0)),
        state=state,
        rng=np.random.default_rng(seed),
    )
    return Upload(upload.arrays, upload.meta, {**upload.metrics, **extra})


def reply_records(upload: Upload) -> dict[str, Any]:
    """Return the records of a train reply besides its metrics."""
    out: dict[str, Any] = {"arrays": upload.arrays}
    if upload.meta is not None:
        out[META_KEY] = upload.meta
    return out


def personal_metrics(
    cfg: RunConfig,
    build: Callable[[], nn.Module],
    state: RecordDict,
    test: ArrayDataset,
) -> dict[str, int | float]:
    """Evaluate the personalized model on the local test split (empty if off)."""
    mode = cfg.personalization.mode
    if mode == "none":
        return {}
    model = build()
    if mode in personal.LAYER_MODES:
        has_own = personal.load_layers(model, state)
    else:
        has_own = personal.load_model(model, state)
    loss, acc = evaluate(model, test)
    return {"personal-loss": loss, "personal-acc": acc, "personalized": int(has_own)}
