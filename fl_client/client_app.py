"""The Flower ClientApp: local training and evaluation on one partition.

The module-level ``app`` reads the run configuration from Flower (``flwr run``);
:func:`make_client_app` binds an explicit :class:`RunConfig` instead, for the
programmatic simulation entry point where Flower's ``run_config`` is empty.

Every train reply carries one ``ArrayRecord`` (the new local weights; with compression
the encoded update plus a ``compression`` ConfigRecord, see :mod:`fl_client.features`;
under FedPer the shared layers only) and one ``MetricRecord`` with ``num-examples``,
``train-loss``, ``train-duration`` and ``partition-id``, so that Flower's own
strategies can aggregate it as well.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TypeVar

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from orchestration.config import RunConfig

from . import features
from .attacks import attacker_for
from .node_config import data_path, threads
from .privacy import privacy_train_mod, train_private
from .task import build_model, evaluate, split_for, train
from .task.local_data import local_split
from .task.partition import ClientSplit

_Num = TypeVar("_Num", int, float)


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            "node_config lacks an integer 'partition-id'; start the SuperNode with "
            '--node-config "partition-id=N num-partitions=M"'
        ) from e


def _client_data(cfg: RunConfig, context: Context) -> tuple[int, ClientSplit]:
    pid = _partition_id(context)
    n = int(context.node_config.get("num-partitions", cfg.num_clients))
    if n != cfg.num_clients:
        raise ValueError(
            f"node_config num-partitions={n} but the run has num_clients="
            f"{cfg.num_clients}; they must match"
        )
    if not 0 <= pid < n:
        raise ValueError(f"partition-id={pid} outside 0..{n - 1}")
    path = data_path(context.node_config)
    if path is not None:  # device-local data instead of a simulated partition
        d = cfg.dataset
        return pid, local_split(path, d.name, d.client_test_fraction, cfg.seed + pid)
    clients, _ = split_for(cfg)
    return pid, clients[pid]


def _number(conf: ConfigRecord, key: str, default: _Num, kind: type[_Num]) -> _Num:
    """Read a numeric server instruction, with a clear error if it is malformed."""
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config {key!r} must be a number, got {value!r}")
    return kind(value)


def _model(cfg: RunConfig, split: ClientSplit, arrays: ArrayRecord) -> torch.nn.Module:
    model = build_model(
        cfg.model.name, split.train.input_shape, split.train.num_classes
    )
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def make_client_app(
    cfg: RunConfig | None = None, mods: list[Mod] | None = None
) -> ClientApp:
    """Return a ClientApp bound to ``cfg`` (or reading Flower's run config if None).

    Parameters
    ----------
    cfg : RunConfig, optional
        The run configuration; ``None`` reads ``context.run_config`` (``flwr run``).
    mods : list of Mod, optional
        Flower mods wrapped around every handler (e.g. for tests or privacy).
    """
    app = ClientApp(mods=mods or [])

    def resolve(context: Context) -> RunConfig:
        run_cfg = cfg if cfg is not None else RunConfig.from_flat(context.run_config)
        torch.set_num_threads(threads(context.node_config, run_cfg.client.threads))
        return run_cfg

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Answer the server's roll call: partition id and training-set size."""
        run_cfg = resolve(context)
        pid, split = _client_data(run_cfg, context)
        metrics = MetricRecord(
            {"partition-id": pid, "num-examples": len(split.train.y)}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train(mods=[privacy_train_mod(resolve)])  # SecAgg+ / client DP, train only
    def train_handler(msg: Message, context: Context) -> Message:
        """Train the received model on the local partition; reply with new weights."""
        run_cfg = resolve(context)
        pid, split = _client_data(run_cfg, context)
        conf = msg.content.config_records.get("config", ConfigRecord())
        epochs = _number(conf, "local-epochs", run_cfg.train.local_epochs, int)
        lr = _number(conf, "lr", run_cfg.train.lr, float)
        server_round = _number(conf, "server-round", 0, int)
        received = msg.content.array_records["arrays"]
        model = _model(run_cfg, split, received)
        features.before_train(run_cfg, model, context.state)
        # Simulated adversary (off unless attack.kind is set): see attacks.py.
        attacker = attacker_for(run_cfg, pid, server_round)
        seed_pid, train_set = (
            (pid, split.train)
            if attacker is None
            else attacker.training_set(
                split.train, lambda p: split_for(run_cfg)[0][p].train
            )
        )
        seed = run_cfg.seed * 1_000_003 + server_round * 1009 + seed_pid
        fit = partial(
            train,
            data=train_set,
            lr=lr,
            momentum=run_cfg.train.momentum,
            batch_size=run_cfg.train.batch_size,
            seed=seed,
        )
        train_metrics: dict[str, float] = {}
        start = time.perf_counter()
        if run_cfg.dp.mode == "sample":  # DP-SGD (Opacus), accountant in context.state
            loss, train_metrics = train_private(
                run_cfg, model, train_set, context, epochs=epochs, lr=lr, seed=seed
            )
        else:  # FedRep: head, then body (features.local_train)
            loss, train_metrics = features.local_train(
                run_cfg,
                model,
                fit,
                epochs=epochs,
                proximal_mu=_number(conf, "proximal-mu", 0.0, float),
            )
        duration = time.perf_counter() - start
        if attacker is not None:
            sent = attacker.reply(
                received.to_numpy_ndarrays(),
                [t.detach().numpy() for t in model.state_dict().values()],
                context.state,
            )
            model.load_state_dict(
                {
                    k: torch.from_numpy(a)
                    for k, a in zip(model.state_dict(), sent, strict=True)
                }
            )
        upload = features.after_train(
            run_cfg,
            model,
            received,
            conf,
            context.state,
            build=lambda: _model(run_cfg, split, received),
            fit=fit,
            seed=seed,
        )
        metrics = MetricRecord(
            {
                "num-examples": len(split.train.y),
                "train-loss": loss,
                "train-duration": duration,
                "partition-id": pid,
                **train_metrics,
                **upload.metrics,
            }
        )
        content = RecordDict({**features.reply_records(upload), "metrics": metrics})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        """Evaluate the received model on the local test split."""
        run_cfg = resolve(context)
        pid, split = _client_data(run_cfg, context)
        received = msg.content.array_records["arrays"]
        model = _model(run_cfg, split, received)
        loss, acc = evaluate(model, split.test)
        metrics = MetricRecord(
            {
                "num-examples": len(split.test.y),
                "eval-loss": loss,
                "eval-acc": acc,
                "partition-id": pid,
                **features.personal_metrics(
                    run_cfg,
                    lambda: _model(run_cfg, split, received),
                    context.state,
                    split.test,
                ),
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
