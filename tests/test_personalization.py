"""FedRep: head then body on the client, the head never uploaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from inprocess import InProcessGrid
from support.client_runs import capture_train_replies, tiny_config

from fl_client.client_app import make_client_app
from fl_client.personal import LAYERS_KEY, personal_keys, train_rep
from fl_client.task import ArrayDataset, build_model, train
from fl_server.client_features import ClientFeatures
from fl_server.server_app import run_server
from orchestration.config import ConfigError, RunConfig

Mod = Callable[[Message, Context, ClientAppCallable], Message]
HEAD = ("net.5.weight", "net.5.bias")
BODY = ("net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias")


def _data(n: int = 64, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(
        x=rng.normal(size=(n, 1, 8, 8)).astype(np.float32),
        y=rng.integers(0, 10, n),
        num_classes=10,
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fedrep_trains_the_head_then_the_body() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    names = list(model.state_dict())
    assert personal_keys(names, "last") == HEAD
    fit = partial(train, data=_data(), lr=0.1, momentum=0.9, batch_size=16, seed=0)
    phases: list[tuple[dict[str, bool], dict[str, torch.Tensor]]] = []

    def spy(m: torch.nn.Module, **kw: object) -> float:
        trainable = {n: p.requires_grad for n, p in m.named_parameters()}
        before = _snapshot(m)
        loss = fit(m, **kw)  # type: ignore[arg-type]
        after = _snapshot(m)
        phases.append(
            (trainable, {n: after[n] - before[n] for n in after})  # the change
        )
        return loss

    head_loss, body_loss = train_rep(model, HEAD, spy, head_epochs=2, body_epochs=1)

    assert len(phases) == 2
    (head_on, head_delta), (body_on, body_delta) = phases
    assert {n for n, on in head_on.items() if on} == set(HEAD)
    assert {n for n, on in body_on.items() if on} == set(BODY)
    for name in names:  # each phase moved exactly its own arrays
        moved_in_head = bool(head_delta[name].abs().sum() > 0)
        moved_in_body = bool(body_delta[name].abs().sum() > 0)
        assert moved_in_head == (name in HEAD), name
        assert moved_in_body == (name in BODY), name
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert np.isfinite(head_loss) and np.isfinite(body_loss)


def test_fedrep_restores_trainability_when_training_fails() -> None:
    model = build_model("mlp", (1, 8, 8), 10)

    def boom(m: torch.nn.Module, **kw: object) -> float:
        raise FloatingPointError("diverged")

    with pytest.raises(FloatingPointError):
        train_rep(model, HEAD, boom, head_epochs=1, body_epochs=1)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("keys", "head", "body", "match"),
    [(("nope",), 1, 1, "no parameter"), (HEAD, 0, 1, "must be >= 1")],
)
def test_fedrep_refuses_bad_arguments(
    keys: tuple[str, ...], head: int, body: int, match: str
) -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=match):
        train_rep(
            model,
            keys,
            lambda m, **kw: 0.0,
            head_epochs=head,
            body_epochs=body,
        )


def test_server_keeps_its_copy_of_the_head_under_fedrep() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    arrays = ArrayRecord(model.state_dict())
    shared, kept = ClientFeatures(personal_mode="fedrep").split(arrays)
    assert tuple(shared.keys()) == BODY
    assert tuple(kept) == HEAD


def test_fedrep_head_never_leaves_the_client(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "fedrep",
        **{"personalization.mode": "fedrep", "personalization.head_epochs": 2},
    )
    replies: list[Message] = []
    grid = InProcessGrid(make_client_app(cfg, mods=[capture_train_replies(replies)]), 4)
    run_server(grid, cfg)

    assert len(replies) == 12
    for reply in replies:
        assert tuple(reply.content.array_records["arrays"].keys()) == BODY
        metrics = reply.content.metric_records["metrics"]
        assert np.isfinite(float(metrics["head-loss"]))  # type: ignore[arg-type]
    for ctx in grid.contexts.values():
        assert tuple(ctx.state.array_records[LAYERS_KEY].keys()) == HEAD
    path = tmp_path / "fedrep" / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["failures"] == 0 for r in rows[1:])
    last = rows[-1]
    assert last["client_personalized"] == 4
    assert float(last["client_personal_acc"]) > 0.5


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"dp.mode": "sample"}, "FedRep's head phase trains outside Opacus"),
        ({"secagg.enabled": True}, "SecAgg\\+ adapter sums every array"),
        ({"strategy.name": "fedavg"}, "neither keeps personal layers"),
        ({"personalization.head_epochs": 0}, "head_epochs"),
    ],
)
def test_fedrep_is_refused_where_it_cannot_work(
    flat: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"personalization.mode": "fedrep", **flat})


def test_benchmark_reuses_stored_runs_of_the_same_length(tmp_path: Path) -> None:
    from experiments.bench_personalization import reused_runs

    path = tmp_path / "old.json"
    run = {"mode": "fedper", "seed": 1, "rounds": 30, "per_round": {"5": 0.8}}
    path.write_text(json.dumps({"runs": [run]}))

    got = reused_runs(path, 30)

    assert list(got) == [("fedper", 1)]
    assert got[("fedper", 1)]["per_round"] == {5: 0.8}  # keys back to int rounds
    with pytest.raises(ValueError, match="has 30 rounds, this benchmark 20"):
        reused_runs(path, 20)
    # Runs stored without a dataset are MNIST-5k's: refused for another dataset.
    with pytest.raises(ValueError, match="is on mnist5k, this benchmark on cifar10"):
        reused_runs(path, 30, "cifar10")
    run["dataset"] = "cifar10"
    path.write_text(json.dumps({"runs": [run]}))
    assert list(reused_runs(path, 30, "cifar10")) == [("fedper", 1)]
