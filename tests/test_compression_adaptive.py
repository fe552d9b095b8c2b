"""Bandwidth-aware upload codecs: the policy's choice, the guard's bound, the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.client_runs import tiny_config
from support.factories import limits, plain_train_obs

from agent_strategy import (
    Allocation,
    ClientState,
    Decision,
    DeterministicPolicy,
    Observation,
    guard,
)
from agent_strategy.codecs import bandwidth_codecs, upload_ratio
from agent_strategy.deterministic import cannot_meet_deadline, with_codec_times
from agent_strategy.llm.prompt import render_prompt
from fl_client.client_app import make_client_app
from fl_server.server_app import run_server
from orchestration.config import ConfigError, RunConfig

ALL = ("q8", "q4", "topk", "topk_q8")


def _obs(
    comm: list[float | None], codecs: tuple[str, ...] = ALL, default: str = "none"
) -> Observation:
    clients = tuple(
        ClientState(id=f"c{i}", num_examples=100, comm_s=t, epoch_s=0.1)
        for i, t in enumerate(comm)
    )
    return plain_train_obs(
        clients=clients,
        target=len(comm),
        default_compression=default,
        limits=limits(max_clients=len(comm), codecs=codecs, deadline_s=1e6),
    )


def test_slower_links_get_stronger_codecs() -> None:
    # median comm_s is 2: slowdowns 0.5 .. 200.
    comm = [1.0, 2.0, 2.0, 2.0, 5.0, 10.0, 40.0, 400.0, 1.0]
    obs = _obs(comm, codecs=("q8", "q4", "topk"))

    got = bandwidth_codecs(obs)

    assert got == {
        "c0": "none",
        "c1": "none",  # at the median: its dense upload is the budget
        "c2": "none",
        "c3": "none",
        "c4": "q8",  # 2.5x slower: 1/4 fits
        "c5": "q4",  # 5x: 1/4 does not fit, 1/8 does
        "c6": "topk",  # 20x: top-k 1% (2% of the bytes)
        "c7": "topk",  # 200x: nothing fits; the strongest allowed
        "c8": "none",
    }


@pytest.mark.parametrize("seed", range(5))
def test_codec_strength_never_falls_as_bandwidth_falls(seed: int) -> None:
    rng = np.random.default_rng(seed)
    comm = list(np.exp(rng.normal(0, 1.5, 30)))
    obs = _obs(comm)

    got = bandwidth_codecs(obs)
    ratios = [upload_ratio(got[f"c{i}"]) for i in np.argsort(comm)]

    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))
    # Every client's upload fits the median client's dense upload, unless even the
    # strongest codec does not.
    median = float(np.median(comm))
    for i, t in enumerate(comm):
        ratio = upload_ratio(got[f"c{i}"])
        assert t / median * ratio <= 1 + 1e-9 or got[f"c{i}"] == "topk_q8"


def test_topk_fraction_ranks_topk_among_the_quantizers() -> None:
    # At 10% top-k sends 20% of the bytes: stronger than q8 (25%), weaker than q4.
    obs = _obs([1.0, 1.0, 4.5], codecs=("q8", "q4", "topk"))
    at = {f: obs.model_copy(update={"topk_fraction": f}) for f in (0.1, 0.01)}
    assert bandwidth_codecs(at[0.1])["c2"] == "topk"
    assert bandwidth_codecs(at[0.01])["c2"] == "q4"


def _deadline_obs(codecs: tuple[str, ...]) -> Observation:
    # Deadline 30 s; c0-c3 move the dense model in 2 s, c4 in 40 s (20x slower:
    # hopeless uncompressed, 20.4 s with top-k's 2% upload). c4 is the stalest.
    clients = tuple(
        ClientState(
            id=f"c{i}",
            num_examples=100,
            comm_s=2.0 if i < 4 else 40.0,
            epoch_s=1.0,
            last_selected_round=5 if i < 4 else 1,
            rounds_selected=1,
            last_loss=1.0,
            last_duration_s=3.0,
        )
        for i in range(5)
    )
    return plain_train_obs(
        clients=clients,
        target=1,
        round_=8,
        limits=limits(min_clients=1, max_clients=1, codecs=codecs, deadline_s=30.0),
    )


def test_codec_times_use_each_clients_upload_ratio() -> None:
    obs = _deadline_obs(("q8", "q4", "topk"))
    codecs = bandwidth_codecs(obs)
    assert codecs["c4"] == "topk" and codecs["c0"] == "none"

    planned = with_codec_times(obs, codecs)

    comm = {c.id: c.comm_s for c in planned.clients}
    assert comm["c0"] == pytest.approx(2.0)  # none: the dense round trip
    assert comm["c4"] == pytest.approx(20.0 * (1 + upload_ratio("topk")))
    assert cannot_meet_deadline(obs).tolist() == [False] * 4 + [True]
    assert not cannot_meet_deadline(planned).any()
    assert with_codec_times(obs, {}) is obs


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_slow_link_that_fits_once_compressed_is_not_taken_for_hopeless(
    adaptive: bool,
) -> None:
    obs = _deadline_obs(("q8", "q4", "topk") if adaptive else ())
    policy = DeterministicPolicy(seed=0, exploration=1.0)

    d = policy.decide(obs)

    if adaptive:  # the stalest client, fitting with top-k: explored, with top-k
        assert d.selected == ("c4",)
        assert d.allocations["c4"].compression == "topk"
    else:  # 40 s > 30 s whatever it does: explored last
        assert d.selected != ("c4",)
        assert d.allocations[d.selected[0]].compression == "none"


def test_unmeasured_clients_keep_the_default_codec() -> None:
    obs = _obs([None, 1.0, 1.0, 8.0], default="q8", codecs=("q4",))

    decision = DeterministicPolicy(seed=0).decide(obs)

    codecs = {cid: a.compression for cid, a in decision.allocations.items()}
    # The fast ones get the weakest allowed codec: the run's q8 ('none' is not allowed).
    assert codecs == {"c0": "q8", "c1": "q8", "c2": "q8", "c3": "q4"}
    assert "codecs by bandwidth" in decision.rationale


@pytest.mark.parametrize("measured", [True, False])
def test_off_by_default_every_client_gets_the_run_codec(measured: bool) -> None:
    comm = [1.0, 3.0, 30.0] if measured else [None, None, None]
    obs = _obs(comm, codecs=())  # the default Limits allow no other codec

    decision = DeterministicPolicy(seed=0).decide(obs)

    assert {a.compression for a in decision.allocations.values()} == {"none"}
    assert "codecs" not in decision.rationale
    assert bandwidth_codecs(obs) == {}


@pytest.mark.parametrize("topk_fraction", [0.01, 0.1])
def test_a_client_the_guard_adds_gets_the_codec_of_its_bandwidth(
    topk_fraction: float,
) -> None:
    # c4 (a 20x slower link) is overdue: the guard adds it to a selection of c0 and
    # gives it the default allocation, with the bandwidth rule's codec.
    clients = tuple(
        ClientState(
            id=f"c{i}",
            num_examples=100,
            comm_s=2.0 if i < 4 else 40.0,
            last_selected_round=7 if i < 4 else 1,
        )
        for i in range(5)
    )
    obs = plain_train_obs(
        clients=clients,
        target=2,
        round_=8,
        topk_fraction=topk_fraction,
        limits=limits(
            min_clients=1, max_clients=2, codecs=("q8", "q4", "topk"), max_staleness=5
        ),
    )
    alloc = Allocation(local_epochs=1, lr=0.05, compression="none", deadline_s=60.0)
    policy_pick = Decision(selected=("c0",), allocations={"c0": alloc})

    guarded = guard(policy_pick, obs)

    assert guarded.decision.selected == ("c0", "c4")
    want = bandwidth_codecs(obs)["c4"]
    # 20x slower: top-k at 1% (2% of the bytes) fits; at 10% nothing does, and q4
    # (1/8) is then the strongest
    assert want == ("topk" if topk_fraction == 0.01 else "q4")
    assert guarded.decision.allocations["c4"].compression == want
    assert f"default allocation for c4 (codec {want!r} by its bandwidth)" in (
        guarded.changes
    )
    assert guarded.decision.allocations["c0"].compression == "none"


def test_guard_replaces_a_codec_outside_the_allowed_set() -> None:
    obs = _obs([1.0, 1.0, 1.0], codecs=("q8",), default="none")

    def alloc(codec: str) -> Allocation:
        return Allocation(
            local_epochs=1,
            lr=0.05,
            compression=codec,  # type: ignore[arg-type]
            deadline_s=10.0,
        )

    d = Decision(
        selected=("c0", "c1", "c2"),
        allocations={"c0": alloc("topk"), "c1": alloc("q8"), "c2": alloc("none")},
    )

    g = guard(d, obs)

    codecs = {cid: a.compression for cid, a in g.decision.allocations.items()}
    assert codecs == {"c0": "none", "c1": "q8", "c2": "none"}
    assert any("codec 'topk' of c0 not allowed" in c for c in g.changes)
    assert not any("clamped" in c for c in g.changes)  # only the codec changed


def test_guard_keeps_the_default_codec_allowed_without_limits() -> None:
    obs = _obs([1.0, 1.0], codecs=(), default="q4")
    d = Decision(
        selected=("c0", "c1"),
        allocations={
            c: Allocation(local_epochs=1, lr=0.05, compression=x, deadline_s=10.0)
            for c, x in (("c0", "q4"), ("c1", "q8"))
        },
    )

    g = guard(d, obs)

    assert {a.compression for a in g.decision.allocations.values()} == {"q4"}


def test_prompt_renders_with_allowed_codecs() -> None:
    obs = _obs([1.0, 2.0])
    prompt = render_prompt(obs)
    body = json.loads(prompt.messages[1]["content"])
    # The limits table carries numbers only; the task text offers the codecs.
    assert "codecs" not in body["limits"]
    assert (
        "compression (each allocation's upload codec): none = "
        in (prompt.messages[0]["content"])
    )


def test_config_bounds_the_codecs() -> None:
    off = RunConfig()
    assert off.compression.allowed_codecs() == ()
    assert not off.compression.compresses()
    on = RunConfig.from_flat(
        {"compression.adaptive": True, "compression.allowed": "q8, q4,q8"}
    )
    assert on.compression.allowed_codecs() == ("q8", "q4")
    assert on.compression.compresses()
    assert not on.compression.keeps_residuals()
    with pytest.raises(ConfigError, match="compression.allowed must list"):
        RunConfig.from_flat({"compression.allowed": "q8,gzip"})


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"secagg.enabled": True}, "cannot be summed under masks"),
        ({"strategy.name": "fedavg"}, "cannot decode"),
        ({"dp.mode": "client"}, "fixedclipping_mod"),
        ({"resume": "runs/x", "compression.allowed": "topk"}, "the residuals"),
    ],
)
def test_adaptive_codecs_are_refused_where_compression_is(
    flat: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"compression.adaptive": True, **flat})


def test_adaptive_run_sends_each_client_its_codec(tmp_path: Path) -> None:
    from inprocess import InProcessGrid

    cfg = tiny_config(
        tmp_path,
        "adaptive",
        **{
            "devices.enabled": True,
            "devices.bandwidth_sigma": 2.0,
            "compression.adaptive": True,
        },
    )
    run_server(InProcessGrid(make_client_app(cfg), cfg.num_clients), cfg)
    run = tmp_path / "adaptive"
    train = [
        json.loads(line)
        for line in (run / "decisions.jsonl").read_text().splitlines()
        if json.loads(line)["phase"] == "train"
    ]
    first = {a["compression"] for a in train[0]["decision"]["allocations"].values()}
    later = {a["compression"] for a in train[-1]["decision"]["allocations"].values()}
    assert first == {"none"}  # nothing measured yet
    assert len(later) > 1 and later <= {"none", "q8", "q4", "topk"}
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert all(r["failures"] == 0 for r in rows[1:])  # every codec decoded
    assert rows[-1]["bytes_up"] < rows[1]["bytes_up"]
