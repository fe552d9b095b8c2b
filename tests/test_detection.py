"""Detectors, update features, reputation and the guard's exclusion, on known data."""

from __future__ import annotations

import numpy as np
import pytest
from support.factories import limits, plain_aggregate_obs, plain_train_obs

from agent_strategy import (
    ClientState,
    Decision,
    DetectionParams,
    DeterministicPolicy,
    ReplyFeatures,
    ReputationParams,
    detect,
    guard,
    is_excluded,
    next_state,
)
from agent_strategy.detection import core_mask, reference, robust_z, scaled_norms
from fl_server.attack_report import detection_scores
from fl_server.features import duplicate_counts, krum_ratios, update_features


def _reply(
    cid: str, norm: float = 1.0, cos: float = 0.6, **kw: object
) -> ReplyFeatures:
    fields: dict[str, object] = dict(
        id=cid,
        num_examples=100,
        train_loss=0.5,
        duration_s=1.0,
        update_norm=norm,
        cosine_to_median=cos,
    )
    return ReplyFeatures.model_validate({**fields, **kw})


def _honest(n: int = 8) -> list[ReplyFeatures]:
    norms = [0.9, 1.0, 1.1, 1.05, 0.95, 1.2, 0.85, 1.0][:n]
    cos = [0.6, 0.55, 0.7, 0.65, 0.5, 0.6, 0.58, 0.62][:n]
    krum = [0.9, 1.0, 1.2, 1.1, 0.8, 1.3, 0.95, 1.0][:n]
    return [_reply(f"c{i}", norms[i], cos[i], krum_ratio=krum[i]) for i in range(n)]


def test_robust_z_known_values() -> None:
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))

    # median 3, MAD 1 -> 0.6745 * (x - 3)
    np.testing.assert_allclose(z, 0.6745 * np.array([-2, -1, 0, 1, 97]))
    assert robust_z(np.array([2.0, 2.0, 2.0]))[0] == 0.0
    z2 = robust_z(np.array([1.0, 1.0, 1.0, 5.0]))  # MAD 0: mean abs deviation
    assert z2[0] == 0.0 and z2[3] == pytest.approx(0.7979 * 4)


def test_honest_round_raises_no_flag() -> None:
    assert detect(_honest()) == ()
    # a small honest client pointing elsewhere (one-class data) is not flagged
    assert detect([*_honest(7), _reply("c9", norm=0.5, cos=-0.1)]) == ()


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (dict(norm=8.0), "robust SDs above"),
        (dict(norm=0.0, cos=0.0), "little or no work"),
        (dict(cos=-0.5), "cosine to the coordinate median -0.50 < -0.30"),
        (dict(cos=-0.1, norm=2.0), "-0.10 < 0.00 with a norm 1.95x the reference norm"),
    ],
)
def test_each_detector_flags_its_outlier_with_a_reason(
    bad: dict[str, float], words: str
) -> None:
    replies = [*_honest(7), _reply("c9", **bad)]

    flags = detect(replies)

    assert [f.id for f in flags] == ["c9"]
    assert flags[0].kind == "malicious" and words in flags[0].reason


@pytest.mark.parametrize(
    "honest",
    [
        dict(norm=3.5, cos=0.4),  # a large aligned norm (99% of honest are < 3x)
        dict(norm=2.8, cos=0.0),  # orthogonal, large, under the unaligned test's 3x
        dict(norm=1.2, cos=-0.1),  # slightly reversed, ordinary norm (non-IID)
        dict(norm=1.6, cos=-0.02),  # larger, but hardly reversed
        dict(norm=0.6, cos=-0.45),  # strongly reversed but small
        dict(krum_ratio=50.0),  # far from the others, ordinary norm and direction
    ],
)
def test_one_odd_feature_of_an_honest_client_is_not_enough(
    honest: dict[str, float],
) -> None:
    assert detect([*_honest(7), _reply("c9", **honest)]) == ()


def test_duplicates_are_flagged_first_and_flags_are_ordered_by_severity() -> None:
    replies = [
        *_honest(6),
        _reply("c7", norm=7.0),
        _reply("c8", duplicates=1),
        _reply("c9", duplicates=1),
    ]

    flags = detect(replies)

    assert [f.id for f in flags] == ["c8", "c9", "c7"]
    assert "identical to 1 other reply" in flags[0].reason


def test_few_replies_compare_with_the_median_without_z_scores() -> None:
    replies = [_reply("c0", 1.0), _reply("c1", 9.0), _reply("c2", 1.0, cos=-0.2)]

    # median norm 1: c1 is 9x (>= 6x), c2 is reversed but not amplified
    assert [f.id for f in detect(replies)] == ["c1"]
    assert detect(replies[:1]) == ()


def test_reference_is_the_central_half_and_ignores_duplicates() -> None:
    replies = [
        _reply("c0", 1.0, distance_rank=1),
        _reply("c1", 2.0, distance_rank=2),
        _reply("c2", 4.0, distance_rank=3, duplicates=1),
        _reply("c3", 50.0, distance_rank=4),
        _reply("c4", 60.0, distance_rank=5),
        _reply("c5", 70.0, distance_rank=6),
    ]

    assert core_mask(replies).tolist() == [True, True, False, False, False, False]
    ref, spread, use_z, far = reference(replies)
    # core log-norms 0 and log 2: median log 2 / 2, MAD log 2 / 2; the round's
    # median (27) is over 2x the core's (1.41): far-away replies are a majority
    assert ref == pytest.approx(2**0.5) and use_z and far
    assert spread == pytest.approx(np.log(2) / 2 / 0.6745)
    assert reference(replies[:3]) == (2.0, np.inf, False, False)
    # an ordinary round: the reference is the round's median (non-IID clients with
    # more data have larger norms and are less central)
    ordinary = [_reply(f"c{i}", 1.0 + 0.1 * i, distance_rank=i + 1) for i in range(6)]
    assert reference(ordinary)[0] == pytest.approx(1.25)
    assert not reference(ordinary)[3]
    dups = [_reply(f"c{i}", 1.0, duplicates=1) for i in range(4)]
    assert core_mask(dups).all()


def test_attackers_that_are_a_majority_of_the_round_are_still_caught() -> None:
    """6 of 10 replies are noise: the round's median is theirs, the core's is not."""
    rng = np.random.default_rng(5)
    direction = rng.normal(size=300)
    honest = 0.05 * (direction + 0.8 * rng.normal(size=(4, 300)))
    noise = rng.normal(size=(6, 300))
    replies = _from_features(np.vstack([honest, noise]))

    assert sorted(f.id for f in detect(replies)) == [f"c{i}" for i in range(4, 10)]
    # the honest ones are not taken for free-riders (they are 1/20 of the median)
    assert all("little or no work" not in f.reason for f in detect(replies))


def test_far_away_replies_that_are_exactly_half_the_round_are_a_majority() -> None:
    """5 of 10 far away: the round's median is the midpoint of the two halves."""
    norms = [0.75, 0.8, 0.85, 0.85, 1.05, 1.8, 2.0, 2.8, 3.1, 3.6]
    replies = [
        _reply(f"c{i}", n, 0.5, distance_rank=i + 1, krum_ratio=1.0)
        for i, n in enumerate(norms)
    ]
    # the plain median, (1.05 + 1.8) / 2, is under 2x the core's 0.85 ...
    assert np.median(norms) < 2 * 0.85
    ref, _, _, far = reference(replies)
    # ... the upper median (1.8) is over it: half the round is far away
    assert far and ref == pytest.approx(0.85)

    # the reference is the core's, so 3x it (majority_norm_ratio) is enough
    assert sorted(f.id for f in detect(replies)) == ["c7", "c8", "c9"]
    # nine replies: the upper median is the median, and 4 of 9 far away are not
    # half the round
    assert not reference(replies[:-1])[3]
    # a round of four: two ordinary large norms are half of it, and a core of two
    # is too small to stand for the round
    small = [
        _reply(f"c{i}", n, 0.5, distance_rank=i + 1, krum_ratio=1.0)
        for i, n in enumerate([0.5, 0.6, 1.3, 1.7])
    ]
    assert not reference(small)[3]
    assert detect(small) == ()


def test_reversed_attackers_that_are_a_majority_are_caught_by_their_norm() -> None:
    """6 of 10 send -4x their update: the coordinate median points their way."""
    rng = np.random.default_rng(6)
    direction = rng.normal(size=300)
    honest = direction + 1.5 * rng.normal(size=(10, 300))
    u = np.vstack([honest[:4], -4 * honest[4:]])
    replies = _from_features(u)
    assert min(r.cosine_to_median for r in replies[4:]) > 0  # direction is useless

    assert sorted(f.id for f in detect(replies)) == [f"c{i}" for i in range(4, 10)]


def test_a_client_with_a_record_is_flagged_for_a_smaller_outsized_update() -> None:
    replies = [*_honest(7), _reply("c9", norm=2.5, cos=0.3)]

    assert detect(replies) == ()  # a one-off 2.5x update
    (flag,) = detect(replies, record={"c9", "c1"})
    assert flag.id == "c9" and "from a client flagged before" in flag.reason
    assert detect([*_honest(7), _reply("c9", norm=1.5)], record={"c9"}) == ()


def test_a_repeat_must_also_be_far_above_the_round() -> None:
    # a round whose norms spread widely: 2.5x the median is ordinary here
    norms = [0.3, 0.5, 0.7, 1.0, 1.0, 1.4, 2.0, 3.0]
    wide = [_reply(f"c{i}", n, 0.5, krum_ratio=1.0) for i, n in enumerate(norms)]
    replies = [*wide, _reply("c9", norm=2.5, cos=0.3, krum_ratio=1.0)]
    ref, spread, use_z, _ = reference(replies)
    assert use_z and np.log(2.5 / ref) / spread < DetectionParams().z_threshold

    assert detect(replies, record={"c9"}) == ()
    # the same client and norm in a tight round is a repeat
    (flag,) = detect([*_honest(7), _reply("c9", norm=2.5, cos=0.3)], record={"c9"})
    assert flag.id == "c9" and "from a client flagged before" in flag.reason


def test_the_policy_passes_the_clients_with_a_record() -> None:
    clients = tuple(
        ClientState(id=f"c{i}", num_examples=100, reputation=0.5 if i == 9 else 1.0)
        for i in range(10)
    )
    obs = plain_aggregate_obs([*_honest(7), _reply("c9", norm=2.5)])
    obs = obs.model_copy(update={"clients": clients})

    flags = DeterministicPolicy(detection=DetectionParams()).decide(obs).flags

    assert [f.id for f in flags] == ["c9"]


@pytest.mark.parametrize(
    ("reputation", "flagged"),
    [(0.5, True), (0.79, True), (0.85, False), (1.0, False)],
)
def test_a_record_expires_when_reputation_recovers_past_record_below(
    reputation: float, flagged: bool
) -> None:
    # One flag halves the reputation; four good rounds bring 0.5 back to 0.84,
    # over the default record_below 0.8: the record is gone.
    recovered = ClientState(id="c9", reputation=0.5)
    for _ in range(4):
        recovered = next_state(
            recovered, round_=1, bad=False, params=ReputationParams()
        )
    assert 0.8 < recovered.reputation < 0.85
    clients = tuple(
        ClientState(id=f"c{i}", reputation=reputation if i == 9 else 1.0)
        for i in range(10)
    )
    obs = plain_aggregate_obs([*_honest(7), _reply("c9", norm=2.5)])
    obs = obs.model_copy(update={"clients": clients})

    flags = DeterministicPolicy(detection=DetectionParams()).decide(obs).flags

    assert [f.id for f in flags] == (["c9"] if flagged else [])


def test_norms_are_scaled_per_square_root_of_registered_examples() -> None:
    reps = [
        _reply("c0", 1.0, registered_examples=100),
        _reply("c1", 2.0, registered_examples=400),
        _reply("c2", 3.0, num_examples=900),  # registered unknown: reported stands in
    ]

    # median examples 400: c0 x sqrt(4), c1 x 1, c2 x sqrt(400/900)
    np.testing.assert_allclose(scaled_norms(reps, 0.5), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(scaled_norms(reps, 0.0), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(scaled_norms(reps, 1.0), [4.0, 2.0, 3.0 * 4 / 9])


def test_an_honest_client_with_much_more_data_is_not_flagged_for_its_norm() -> None:
    # The benchmark's case: a client with 9x the median's examples takes 9x the
    # local steps and sends a 4.5x update; per sqrt(examples) it is ordinary.
    reps = [
        _reply(r.id, r.update_norm, r.cosine_to_median or 0.0, registered_examples=100)
        for r in _honest()
    ]
    big = _reply("c9", 4.5, 0.6, registered_examples=900)
    attacker = _reply("c10", 4.5, 0.6, registered_examples=100)

    assert detect([*reps, big]) == ()
    raw = DetectionParams(norm_examples_exponent=0.0)
    assert [f.id for f in detect([*reps, big], raw)] == ["c9"]
    flags = detect([*reps, big, attacker])
    assert [f.id for f in flags] == ["c10"]
    assert "per its examples" not in flags[0].reason  # median count: unscaled
    boosted = _reply("c11", 20.0, 0.6, registered_examples=400)  # 10 per sqrt
    (flag,) = detect([*reps, boosted])
    assert flag.id == "c11" and "update norm 20 (10 per its examples)" in flag.reason


def test_a_large_update_barely_aligned_with_the_median_is_flagged() -> None:
    honest = _honest()  # norms 0.85-1.2, cosines 0.5-0.7
    aligned = _reply("c8", norm=3.5, cos=0.4)  # large but aligned: a big honest one
    flipped = _reply("c9", norm=3.5, cos=0.05)  # -4x an update orthogonal to it

    flags = detect([*honest, aligned, flipped])

    assert [f.id for f in flags] == ["c9"]
    assert "cosine to the coordinate median only 0.05" in flags[0].reason
    off = DetectionParams(unaligned_norm_ratio=100.0)
    assert detect([*honest, aligned, flipped], off) == ()
    # under 3x the reference it is not enough
    assert detect([*honest, aligned, _reply("c9", norm=2.5, cos=0.05)]) == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("low_norm_ratio", 1.5),
        ("big_norm_ratio", 0.5),
        ("majority_norm_ratio", 0.9),
        ("z_threshold", 0.0),
        ("norm_examples_exponent", 1.5),
        ("unaligned_norm_ratio", 0.5),
        ("unaligned_max_cosine", 2.0),
        ("record_below", 0.0),
    ],
)
def test_invalid_parameters_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DetectionParams(**{field: value})  # type: ignore[arg-type]


def test_duplicate_counts_and_krum_ratios_on_known_rows() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(6, 50))
    u[4] = u[3]  # collusion
    u[5] = 30 * rng.normal(size=50)  # far away

    dup = duplicate_counts(u)
    ratios, ranks = krum_ratios(u)

    assert dup.tolist() == [0, 0, 0, 1, 1, 0]
    assert duplicate_counts(np.zeros((3, 4))).tolist() == [2, 2, 2]
    assert ranks[5] == 6 and ratios[5] > 10 * np.median(ratios)
    assert sorted(ranks.tolist()) == [1, 2, 3, 4, 5, 6]
    feats = update_features(u)
    assert set(feats) == {
        "update_norm",
        "cosine_to_median",
        "krum_ratio",
        "distance_rank",
        "duplicates",
    }


def _from_features(u: np.ndarray) -> list[ReplyFeatures]:
    feats = update_features(u)
    return [
        _reply(
            f"c{i}",
            float(feats["update_norm"][i]),
            float(feats["cosine_to_median"][i]),
            krum_ratio=float(feats["krum_ratio"][i]),
            distance_rank=int(feats["distance_rank"][i]),
            duplicates=int(feats["duplicates"][i]),
        )
        for i in range(u.shape[0])
    ]


def test_features_of_a_sign_flip_are_detected_end_to_end() -> None:
    rng = np.random.default_rng(1)
    direction = rng.normal(size=200)
    honest = direction + 0.8 * rng.normal(size=(8, 200))
    u = np.vstack([honest, -4 * honest[0], -4 * honest[1]])

    assert sorted(f.id for f in detect(_from_features(u))) == ["c8", "c9"]


def test_reputation_excludes_after_repeated_flags_and_readmits_on_probation() -> None:
    p = ReputationParams(exclude_after=2, probation_rounds=3)
    s = ClientState(id="c1")

    s = next_state(s, round_=1, bad=True, params=p)
    assert s.reputation == 0.5 and not is_excluded(s, 2)
    s = next_state(s, round_=2, bad=True, params=p)
    assert s.excluded_until == 5 and is_excluded(s, 3) and is_excluded(s, 5)
    assert not is_excluded(s, 6)  # readmitted after the probation period
    s = next_state(s, round_=6, bad=True, params=p)  # one more flag: out again
    assert s.times_excluded == 2 and s.excluded_until == 6 + 6
    good = next_state(s, round_=13, bad=False, params=p)
    assert good.consecutive_flags == 0 and good.reputation > s.reputation
    assert next_state(good, round_=14, bad=True, params=p).excluded_until == 12


def test_guard_never_selects_excluded_clients_unless_short() -> None:
    clients = tuple(
        ClientState(id=f"c{i}", num_examples=100, excluded_until=9 if i < 2 else 0)
        for i in range(5)
    )
    obs = plain_train_obs(clients=clients, target=3, round_=4)

    g = guard(Decision(selected=("c0", "c2", "c3")), obs)
    assert "c0" not in g.decision.selected
    assert any("c0: excluded until round 9" in c for c in g.changes)

    short = plain_train_obs(
        clients=clients[:3], target=3, round_=4, limits=limits(min_clients=3)
    )
    g2 = guard(Decision(selected=("c2",)), short)
    assert sorted(g2.decision.selected) == ["c0", "c1", "c2"]


def test_deterministic_policy_skips_excluded_and_flags_with_detection() -> None:
    clients = tuple(
        ClientState(id=f"c{i}", num_examples=100, excluded_until=9 if i == 0 else 0)
        for i in range(6)
    )
    policy = DeterministicPolicy(detection=DetectionParams())
    train = policy.decide(plain_train_obs(clients=clients, target=5, round_=3))
    assert "c0" not in train.selected

    obs = plain_aggregate_obs([*_honest(7), _reply("c7", norm=20.0)])
    agg = policy.decide(obs)
    assert [f.id for f in agg.flags] == ["c7"] and "c7" not in agg.weights
    assert agg.aggregation == "weighted"
    assert DeterministicPolicy().decide(obs).flags == ()  # detection off by default


def test_guard_bounds_the_aggregation_rule() -> None:
    obs = plain_aggregate_obs(_honest(4), limits=limits(rules=("median", "weighted")))

    g = guard(Decision(weights={"c0": 1.0}, aggregation="krum"), obs)

    assert g.decision.aggregation == "median"
    assert any("aggregation 'krum' not allowed" in c for c in g.changes)


def test_detection_scores_count_replies_and_excluded_clients() -> None:
    history = [
        {
            "round": 1,
            "replied": ["c0", "c1", "c2"],
            "flagged": ["c0"],
            "rejected": [],
            "excluded": [],
        },
        {
            "round": 2,
            "replied": ["c0", "c1", "c3"],
            "flagged": ["c1"],
            "rejected": ["c0"],
            "excluded": ["c0"],
        },
    ]

    s = detection_scores(history, ["c0", "c3"])

    assert s["replies"] == {
        "tp": 2,
        "fp": 1,
        "fn": 1,
        "tn": 2,
        "faulty_honest": 0,  # history rows from before faulty flags existed
        "faulty_malicious": 0,
    }
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(
        2 / 3
    )
    assert s["clients_excluded"] == ["c0"] and s["client_recall"] == 0.5
    assert detection_scores(history, ["c0"], start_round=2)["replies"]["tp"] == 1


def test_a_faulty_flag_is_no_detection_and_is_counted_apart() -> None:
    history = [
        {
            "round": 1,
            "replied": ["c0", "c1", "c2", "c3"],
            "flagged": ["c0"],
            "faulty": ["c1", "c2"],  # c1 honest, c2 an attacker
            "rejected": [],
            "excluded": [],
        },
        {
            "round": 2,
            "replied": ["c1", "c2", "c3"],
            "flagged": [],
            "faulty": ["c1", "c3"],  # c3 an attacker, but rejected as well
            "rejected": ["c3"],
            "excluded": [],
        },
    ]

    s = detection_scores(history, ["c0", "c2", "c3"])

    # malicious replies: c0 r1 (flagged), c2 r1 (faulty: missed), c3 r1 (missed),
    # c2 r2 (missed), c3 r2 (rejected); honest: c1 r1, c1 r2 (both faulty)
    assert s["replies"] == {
        "tp": 2,
        "fp": 0,
        "fn": 3,
        "tn": 2,
        "faulty_honest": 2,
        "faulty_malicious": 1,
    }
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(2 / 5)


def test_duplicates_within_tolerance_are_found_and_near_ones_are_not() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=1000)
    u = np.stack([base, base * (1 + 1e-8), base * (1 + 1e-4), rng.normal(size=1000)])

    assert duplicate_counts(u).tolist() == [1, 1, 0, 0]
    # Precomputed norms give the same answer.
    assert duplicate_counts(u, norms=np.linalg.norm(u, axis=1)).tolist() == [1, 1, 0, 0]
