from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.run import to_run_config
from orchestration.config import ConfigError, RunConfig, choices, flatten, unflatten

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_schema_defaults() -> None:
    flat = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]

    assert flat == RunConfig().to_flat()


def test_flat_roundtrip() -> None:
    cfg = RunConfig.from_flat(
        {"dataset.alpha": 0.1, "strategy.name": "fedavg", "seed": 3}
    )

    assert cfg.dataset.alpha == 0.1
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert unflatten(flatten({"a": {"b": 1}, "c": 2})) == {"a": {"b": 1}, "c": 2}


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"dataset.name": "imagenet"}, "'mnist5k', 'digits', 'mnist' or 'cifar10'"),
        ({"model.name": "resnet"}, "'cnn' or 'mlp'"),
        ({"strategy.name": "fedfoo"}, "'agent', 'fedavg'"),
        ({"dataset.alpha": 0.0}, "dataset.alpha.*greater than 0"),
        ({"dataset.alpha": -1}, "dataset.alpha"),
        ({"num_rounds": 0}, "num_rounds.*greater than or equal to 1"),
        (
            {"clients_per_round": 30},
            "clients_per_round=30 must be at most num_clients=20",
        ),
        ({"min_replies": 11}, "min_replies=11"),
        ({"train.lr": float("nan")}, "train.lr"),
        ({"bogus": 1}, "unknown config key 'bogus'; valid keys:"),
        ({"dataset": 3}, "dataset"),
        ({"dataset.alpha": 0.1, "dataset": 1}, "section"),
    ],
)
def test_bad_config_names_the_key_and_the_range(
    flat: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


def test_choices_lists_valid_names() -> None:
    assert "fedmedian" in choices("strategy")
    assert choices("dataset")[0] == "mnist5k"


def _compose(overrides: list[str]) -> RunConfig:
    # output_dir is Hydra's runtime directory, which only exists inside a Hydra job.
    base = ["output_dir=runs", "run_name="]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_run_config(compose(config_name="config", overrides=base + overrides))


def test_hydra_defaults_equal_the_schema_defaults() -> None:
    cfg = _compose([])

    assert cfg == RunConfig()


def test_hydra_overrides_reach_the_schema() -> None:
    cfg = _compose(["strategy=fedavg", "dataset.alpha=0.1", "seed=1", "model=mlp"])

    assert (cfg.strategy.name, cfg.dataset.alpha, cfg.seed, cfg.model.name) == (
        "fedavg",
        0.1,
        1,
        "mlp",
    )


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
)
def test_every_experiment_preset_composes(preset: str) -> None:
    cfg = _compose([f"+experiment={preset}"])

    assert isinstance(cfg, RunConfig)


def test_hydra_bad_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dataset.alpha"):
        _compose(["dataset.alpha=-1"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"secagg.enabled": True, "clients_per_round": 5}, "SecAgg"),
        ({"dp.mode": "sample"}, "under-report epsilon"),
        ({"dp.mode": "client"}, "under-report epsilon"),
        ({"compression.codec": "topk"}, "the residuals"),
        ({"personalization.mode": "ditto"}, "the models"),
        ({"attack.kind": "stale"}, "the replayed model"),
    ],
)
def test_resume_is_refused_where_state_lives_outside_the_checkpoint(
    tmp_path: Path, extra: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"resume": str(tmp_path), **extra})


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        (
            {"secagg.enabled": True, "compression.codec": "q8"},
            "cannot be summed under masks",
        ),
        (
            {"secagg.enabled": True, "personalization.mode": "fedper"},
            "SecAgg\\+ adapter sums every array",
        ),
        (
            {"dp.mode": "client", "compression.codec": "topk"},
            "fixedclipping_mod clips",
        ),
        ({"strategy.name": "fedavg", "compression.codec": "q4"}, "cannot decode"),
    ],
)
def test_features_that_do_not_compose_are_refused(
    flat: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"clients_per_round": 5, **flat})


def test_names_shared_by_config_and_policy_types_agree() -> None:
    """The config's names are repeated in ``agent_strategy.types``, which the ClientApp
    must not import (tests/test_client_install.py): the copies must not drift."""
    from typing import get_args

    from agent_strategy import types as policy_types
    from orchestration import config, topics

    assert get_args(config.AggregationRule) == get_args(policy_types.AggregationRule)
    assert get_args(config.CodecName) == get_args(policy_types.Compression)
    # Every monitor event can be the planner's reason to re-plan.
    assert set(get_args(topics.EventKind)) <= set(get_args(policy_types.PlanReason))
