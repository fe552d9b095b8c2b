"""Server-checked loss: the validation set, the candidate evaluation, the detector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from inprocess import InProcessGrid
from support.client_runs import tiny_config
from support.factories import plain_aggregate_obs
from torch import nn

from agent_strategy import (
    Decision,
    DetectionParams,
    DeterministicPolicy,
    Flag,
    Observation,
    Policy,
    ReplyFeatures,
    detect,
)
from agent_strategy.detection import loss_reference
from fl_client.attacks import malicious_partitions
from fl_client.client_app import make_client_app
from fl_client.task import (
    ArrayDataset,
    build_model,
    evaluate,
    load_dataset,
    split_for,
)
from fl_server.aggregation import flatten_arrays
from fl_server.loss_check import LossChecker, top_class_share, validation_set
from fl_server.server_app import build_strategy, run_server
from fl_server.strategy import AgentStrategy
from fl_server.validation import ModelSpec
from orchestration.config import RunConfig


def _reply(cid: str, loss: float, acc: float, **kw: object) -> ReplyFeatures:
    return ReplyFeatures.model_validate(
        dict(
            id=cid,
            num_examples=100,
            train_loss=0.3,
            duration_s=1.0,
            update_norm=1.0,
            cosine_to_median=0.6,
            checked_loss=loss,
            checked_accuracy=acc,
            loss_gap=loss - 0.3,
        )
        | kw
    )


# Honest candidates under non-IID data: losses 0.3-1.9 (up to 6x the centre, as
# measured on MNIST-5k at Dirichlet 0.5), accuracies 0.45-0.93.
_LOSSES = [0.3, 0.35, 0.4, 0.5, 0.7, 1.1, 1.9, 0.45]
_ACCS = [0.93, 0.91, 0.9, 0.88, 0.8, 0.7, 0.45, 0.89]


def _honest(n: int = 8) -> list[ReplyFeatures]:
    return [_reply(f"c{i}", _LOSSES[i], _ACCS[i]) for i in range(n)]


# ------------------------------------------------------------------- detector
def test_loss_reference_is_the_better_half_of_losses_and_accuracies() -> None:
    replies = _honest(8)

    centre = loss_reference(replies)

    # the 4 lowest losses 0.3 0.35 0.4 0.45 -> 0.375; 4 best accuracies
    # 0.93 0.91 0.9 0.89 -> 0.905
    assert centre == pytest.approx((0.375, 0.905))
    assert loss_reference(replies[:3]) is None  # fewer than min_replies_for_z
    unchecked = [r.model_copy(update={"checked_loss": None}) for r in replies]
    assert loss_reference(unchecked) is None  # no loss check in this run
    with pytest.raises(ValueError, match="only some of the replies"):
        loss_reference([*unchecked[:2], *replies[2:]])


def test_honest_non_iid_spread_is_not_flagged() -> None:
    assert detect(_honest()) == ()


def test_a_model_wrong_on_the_servers_data_is_flagged_with_its_numbers() -> None:
    replies = [*_honest(7), _reply("c9", loss=3.2, acc=0.21)]

    flags = detect(replies)

    assert [f.id for f in flags] == ["c9"]
    # centre: the 4 lowest of 0.3 .35 .4 .5 .7 1.1 1.9 3.2 -> 0.375; the 4 best
    # accuracies .93 .91 .9 .88 -> 0.905; 0.21 / 0.905 = 0.23
    assert "server-checked accuracy 0.21 is 0.23x the round's 0.91" in flags[0].reason
    assert "loss 3.20 vs 0.38, +2.90 vs reported" in flags[0].reason


@pytest.mark.parametrize(
    ("loss", "acc"),
    [
        (3.2, 0.5),  # a high loss with a fair accuracy: an honest non-IID client
        (0.7, 0.2),  # a low accuracy but an ordinary loss (under centre + 0.5)
    ],
)
def test_one_bad_checked_number_alone_is_not_enough(loss: float, acc: float) -> None:
    assert detect([*_honest(7), _reply("c9", loss=loss, acc=acc)]) == ()


def test_attackers_that_are_a_majority_of_the_round_are_still_flagged() -> None:
    honest = _honest(4)
    bad = [_reply(f"c{10 + i}", loss=4.0 + i, acc=0.1) for i in range(6)]

    flags = detect([*honest, *bad])

    # the better halves (5 of 10) are 4 honest replies and one attacker
    assert loss_reference([*honest, *bad]) == pytest.approx((0.4, 0.9))
    assert sorted(f.id for f in flags) == sorted(r.id for r in bad)
    # most suspicious first: at equal accuracy the larger loss
    assert flags[0].id == "c15"


def test_a_candidate_that_overflowed_is_flagged() -> None:
    flags = detect([*_honest(7), _reply("c9", loss=math.inf, acc=0.1)])

    assert [f.id for f in flags] == ["c9"] and "loss inf" in flags[0].reason


def test_detection_params_refuse_a_ratio_outside_0_1() -> None:
    with pytest.raises(ValueError, match="checked_accuracy_ratio"):
        DetectionParams(checked_accuracy_ratio=1.0)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="collapse_share"):
            DetectionParams(collapse_share=share)


# ------------------------------------------------- collapsed: faulty, not malicious
@pytest.mark.parametrize(
    ("share", "kind"),
    [
        (None, "malicious"),  # not measured: as before
        (0.45, "malicious"),  # spread predictions: a flipped, working classifier
        (0.69, "malicious"),
        (0.7, "faulty"),  # at the threshold (DetectionParams.collapse_share)
        (1.0, "faulty"),  # every example in one class
    ],
)
def test_a_collapsed_candidate_flagged_by_the_loss_alone_is_faulty(
    share: float | None, kind: str
) -> None:
    replies = [*_honest(7), _reply("c9", loss=3.2, acc=0.12, checked_top_share=share)]

    (flag,) = detect(replies)

    assert (flag.id, flag.kind) == ("c9", kind)
    assert ("collapsed model" in flag.reason) == (kind == "faulty")


def test_a_collapsed_candidate_a_geometry_detector_flags_too_is_malicious() -> None:
    big = _reply(
        "c9", loss=9.0, acc=0.1, checked_top_share=1.0, update_norm=10.0
    )  # 10x the reference norm: the norm detector fires as well
    dup = [
        _reply(c, loss=9.0, acc=0.1, checked_top_share=1.0, duplicates=1)
        for c in ("c10", "c11")
    ]  # identical updates: collusion

    flags = {f.id: f for f in detect([*_honest(7), big, *dup])}

    assert {c: f.kind for c, f in flags.items()} == {
        "c9": "malicious",
        "c10": "malicious",
        "c11": "malicious",
    }
    assert "update norm 10" in flags["c9"].reason
    assert "collapsed model" in flags["c9"].reason  # the loss check's reason stays


def test_a_collapsed_honest_looking_candidate_is_not_flagged_at_all() -> None:
    # Collapse alone is no detector: round 1 candidates are all near one class.
    replies = [
        _reply(f"c{i}", loss=2.3 + 0.1 * i, acc=0.1, checked_top_share=1.0)
        for i in range(8)
    ]

    assert detect(replies) == ()


# ---------------------------------------------------------------- top share
@pytest.mark.parametrize(
    ("predicted", "share"),
    [
        ([0, 1, 2, 3], 0.25),
        ([2, 2, 2, 2], 1.0),
        ([0, 5, 5, 1, 5], 0.6),
        ([7], 1.0),
    ],
)
def test_top_class_share_is_the_commonest_class_share(
    predicted: list[int], share: float
) -> None:
    assert top_class_share(np.array(predicted)) == pytest.approx(share)
    assert top_class_share(torch.tensor(predicted)) == pytest.approx(share)


@pytest.mark.parametrize(
    "bad", [np.array([], dtype=np.int64), np.array([[0, 1]]), np.array([0.5, 1.0])]
)
def test_top_class_share_refuses_what_is_not_class_indices(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="class indices"):
        top_class_share(bad)
    with pytest.raises(ValueError, match=">= 0"):
        top_class_share(np.array([0, -1]))


# ---------------------------------------------------------- the loss checker
class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.flatten(1))
        return out


def _data(n: int = 40, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 2, 2)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 3, size=n).astype(np.int64), 3)


def _spec(model: nn.Module) -> tuple[ModelSpec, np.ndarray]:
    arrays = ArrayRecord(model.state_dict())
    return ModelSpec.of(arrays), flatten_arrays(arrays.to_numpy_ndarrays())


@pytest.mark.parametrize("batch_size", [512, 16])  # one pass, and batches
def test_check_equals_evaluating_each_candidate_model(batch_size: int) -> None:
    torch.manual_seed(0)
    model, data = _Linear(), _data()
    spec, global_ = _spec(model)
    rng = np.random.default_rng(1)
    updates = rng.normal(0, 0.5, size=(3, global_.size)).astype(np.float32)
    updates[1] = 0.0

    checked = LossChecker(_Linear(), data, batch_size=batch_size).check(
        global_, updates, spec
    )

    for i in range(3):
        cand = _Linear()
        vec = torch.from_numpy(global_ + updates[i])
        torch.nn.utils.vector_to_parameters(vec, cand.parameters())
        loss, acc = evaluate(cand, data)
        assert checked.losses[i] == pytest.approx(loss, rel=1e-5)
        assert checked.accuracies[i] == pytest.approx(acc)
        with torch.no_grad():
            predicted = cand(torch.from_numpy(data.x)).argmax(1).numpy()
        top = np.bincount(predicted).max() / len(predicted)
        assert checked.top_shares is not None
        assert checked.top_shares[i] == pytest.approx(top)
    base = evaluate(model, data)
    assert (checked.base_loss, checked.base_accuracy) == pytest.approx(base)
    assert checked.losses[1] == pytest.approx(checked.base_loss)  # zero update
    assert checked.fields(2, 0.25) == {
        "checked_loss": checked.losses[2],
        "checked_accuracy": checked.accuracies[2],
        "loss_gap": checked.losses[2] - 0.25,
        "checked_top_share": checked.top_shares[2],
    }


def test_check_uses_the_servers_kept_arrays_and_scores_overflow_as_inf() -> None:
    torch.manual_seed(0)
    model, data = _Linear(), _data()
    state = model.state_dict()
    shared = ArrayRecord({"fc.weight": state["fc.weight"]})
    kept = {"fc.bias": Array(state["fc.bias"].numpy())}
    spec = ModelSpec.of(shared)
    global_ = flatten_arrays(shared.to_numpy_ndarrays())
    updates = np.stack([np.zeros_like(global_), np.full_like(global_, 3e38)])
    updates[1, ::2] = -3e38  # logits inf - inf: NaN

    checker = LossChecker(_Linear(), data)
    checked = checker.check(global_, updates, spec, kept)

    assert checked.losses[0] == pytest.approx(evaluate(model, data)[0], rel=1e-5)
    assert checked.losses[1] == math.inf
    assert checker.stats()["models_evaluated"] == 3 and checker.rounds == 1


def test_validation_set_is_a_seeded_sample_of_the_clients_held_out_splits(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(tmp_path, "v", **{"defense.loss_check_examples": 100})
    clients, central = split_for(cfg)

    val = validation_set(cfg)

    assert len(val.y) == 100 and val.x.shape[1:] == central.x.shape[1:]
    held_out = {x.tobytes() for c in clients for x in c.test.x}
    trained = {x.tobytes() for c in clients for x in c.train.x}
    rows = {x.tobytes() for x in val.x}
    assert rows <= held_out and not rows & trained
    assert not rows & {x.tobytes() for x in central.x}
    assert np.array_equal(validation_set(cfg).y, val.y)  # same seed, same set
    other = validation_set(cfg.model_copy(update={"seed": 1}))
    assert not np.array_equal(other.x, val.x)
    everything = cfg.model_copy(
        update={
            "defense": cfg.defense.model_copy(update={"loss_check_examples": 10**5})
        }
    )
    assert len(validation_set(everything).y) == len(held_out)


def test_the_checker_exists_only_with_defense_and_examples(tmp_path: Path) -> None:
    def cfg(**kw: object) -> RunConfig:
        return tiny_config(tmp_path, "x", **kw)

    assert LossChecker.from_config(cfg()) is None  # defense off: costs nothing
    off = cfg(**{"defense.enabled": True, "defense.loss_check_examples": 0})
    assert LossChecker.from_config(off) is None
    on = LossChecker.from_config(cfg(**{"defense.enabled": True}))
    assert on is not None and len(on.y) == 256


# ------------------------------------------------------------ a real run
def test_a_label_flipping_attacker_is_flagged_by_the_loss_check(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        "run",
        num_clients=5,
        clients_per_round=5,
        num_rounds=4,
        **{
            "attack.kind": "label_flip",
            "attack.fraction": 0.2,
            "defense.enabled": True,
        },
    )
    (bad,) = malicious_partitions(5, 0.2, cfg.seed)

    summary = run_server(InProcessGrid(make_client_app(cfg), 5), cfg)

    decisions = [
        json.loads(x)
        for x in (tmp_path / "run" / "decisions.jsonl").read_text().splitlines()
    ]
    flags = [
        (d["round"], f["id"], f["reason"])
        for d in decisions
        if d["phase"] == "aggregate"
        for f in d["decision"]["flags"]
    ]
    caught = [
        r for r, cid, why in flags if cid == f"c{bad}" and "server-checked" in why
    ]
    assert caught and caught[0] <= 3
    assert all(cid == f"c{bad}" for _, cid, _ in flags)  # no honest client flagged
    stats = summary["loss_check"]
    assert isinstance(stats, dict) and stats["rounds"] == 4
    # each round: every reply's candidate and the global model (an excluded
    # attacker is not selected, so it sends nothing)
    sent = sum(
        len(d["decision"]["selected"]) for d in decisions if d["phase"] == "train"
    )
    assert stats["models_evaluated"] == sent + 4


# ----------------------------------------- a faulty flag in the strategy's books
class _FlagsFaultyAndMalicious:
    """The deterministic policy, plus c0 flagged faulty and c1 malicious each round."""

    name = "flags"

    def __init__(self, inner: Policy) -> None:
        self.inner = inner

    def decide(self, obs: Observation) -> Decision:
        d = self.inner.decide(obs)
        if obs.phase == "train":
            ids = ("c0", "c1", *(c for c in d.selected if c not in ("c0", "c1")))
            return d.model_copy(update={"selected": ids[: len(d.selected)]})
        flags = [
            Flag(id=c, kind=k, reason="test")
            for c, k in (("c0", "faulty"), ("c1", "malicious"))
            if any(r.id == c for r in obs.replies)
        ]
        weights = {c: w for c, w in d.weights.items() if c not in ("c0", "c1")}
        return d.model_copy(update={"flags": tuple(flags), "weights": weights})


def test_a_faulty_flag_drops_the_reply_but_leaves_the_reputation(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        "run",
        num_clients=4,
        clients_per_round=4,
        num_rounds=1,
        **{"defense.enabled": True, "defense.loss_check_examples": 0},
    )
    strategy = build_strategy(cfg, tmp_path)
    assert isinstance(strategy, AgentStrategy)
    strategy.policy = _FlagsFaultyAndMalicious(strategy.policy)
    grid = InProcessGrid(make_client_app(cfg), 4)
    data = load_dataset(cfg.dataset.name)
    model = build_model(cfg.model.name, data.input_shape, 10)

    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1
    )

    (row,) = strategy.history
    assert row["faulty"] == ["c0"] and row["flagged"] == ["c1"]
    assert {"c0", "c1"} <= set(row["replied"])
    states = {c: cl.state for c, cl in strategy.clients.items()}
    assert states["c0"].reputation == 1.0  # neither a bad nor a good round
    assert states["c0"].consecutive_flags == 0
    assert states["c1"].reputation == 0.5 and states["c1"].consecutive_flags == 1
    assert states["c0"].times_flagged == 1  # still on the client's file
    assert "c0" not in strategy.info.accepted and "c1" not in strategy.info.accepted


def test_the_policy_drops_a_faulty_update_and_says_so() -> None:
    replies = [*_honest(7), _reply("c9", loss=3.2, acc=0.12, checked_top_share=1.0)]
    obs = plain_aggregate_obs(replies)
    policy = DeterministicPolicy(seed=0, detection=DetectionParams())

    d = policy.decide(obs)

    assert "c9" not in d.weights and [f.kind for f in d.flags] == ["faulty"]
    assert "0 suspect(s) flagged, 1 faulty update(s) dropped" in d.rationale
