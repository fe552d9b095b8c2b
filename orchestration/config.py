"""The one typed run configuration shared by ``flwr run``, Hydra and the tests.

``flwr run`` hands the ServerApp and the ClientApp a flat ``UserConfig`` (keys such as
``dataset.alpha``) read from ``[tool.flwr.app.config]`` and ``--run-config``; Hydra
composes the same keys as nested groups from ``conf/``. Both are validated here, by one
pydantic schema, so that a typo or an out-of-range value fails at start-up with a
message that names the key and the allowed values or range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, cast, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DatasetName = Literal["mnist5k", "digits", "mnist", "cifar10"]
PartitionerName = Literal["iid", "dirichlet", "pathological"]
ModelName = Literal["cnn", "mlp"]
StrategyName = Literal[
    "agent", "fedavg", "fedprox", "fedtrimmedavg", "multikrum", "fedmedian"
]
PolicyName = Literal["deterministic", "llm"]
StructuredMode = Literal["auto", "json_schema", "json_object", "tool", "none"]
RouteTarget = Literal["llm", "deterministic"]
AutoRouteTarget = Literal["auto", "llm", "deterministic"]
# CodecName and AggregationRule repeat agent_strategy.types (Compression,
# AggregationRule), which the ClientApp must not import; tests/test_config.py keeps
# the copies equal.
CodecName = Literal["none", "q8", "q4", "topk", "topk_q8"]
PersonalMode = Literal["none", "fedper", "fedrep", "ditto"]
AttackName = Literal[
    "none",
    "sign_flip",
    "scaling",
    "noise",
    "label_flip",
    "free_ride",
    "stale",
    "collude",
]
AggregationRule = Literal["weighted", "trimmed", "median", "krum"]


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names key and range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    """Which data, and how it is split between clients and the server."""

    name: DatasetName = "mnist5k"
    partitioner: PartitionerName = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1, description="pathological partitioner")
    client_test_fraction: float = Field(0.2, gt=0, lt=1)
    central_test_fraction: float = Field(0.2, gt=0, lt=1)


class ModelConfig(_Section):
    """The network trained by every client."""

    name: ModelName = "cnn"


class TrainConfig(_Section):
    """Local training defaults; a policy may change epochs and lr per client."""

    local_epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, le=4096)


class ClientConfig(_Section):
    """ClientApp settings; a SuperNode's ``--node-config`` may override them."""

    threads: int = Field(
        1, ge=1, le=1024, description="torch threads; node-config 'threads' overrides"
    )


class StrategyConfig(_Section):
    """Which server strategy runs, and the knobs of Flower's baselines."""

    name: StrategyName = "agent"
    proximal_mu: float = Field(0.01, ge=0, description="fedprox")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, description="fedtrimmedavg")
    krum_byzantine: int = Field(2, ge=0, description="multikrum: assumed attackers")
    krum_keep: int = Field(6, ge=1, description="multikrum: updates averaged")


class PolicyConfig(_Section):
    """The agent strategy's policy and the hard limits its guard enforces."""

    name: PolicyName = Field(
        "llm", description="llm: the agent (see agent.*); deterministic: no LLM"
    )
    exploration: float = Field(0.2, ge=0, le=1, description="share of explored slots")
    deadline_s: float = Field(60.0, gt=0, description="slower replies are stragglers")
    min_epochs: int = Field(1, ge=1)
    max_epochs: int = Field(5, ge=1)
    lr_factor_min: float = Field(
        0.5, gt=0, le=1, description="guard: lr at least this times train.lr"
    )
    lr_factor_max: float = Field(
        2.0, ge=1, description="guard: lr at most this times train.lr"
    )
    min_selection_share: float = Field(
        0.5, gt=0, le=1, description="guard: select at least this share of the target"
    )
    max_staleness: int = Field(
        5, ge=0, description="guard: clients left out longer are added; 0 = off"
    )
    max_flag_share: float = Field(
        0.5, gt=0, le=1, description="guard: largest share of replies flagged a round"
    )
    max_weight_share: float = Field(
        0.5, gt=0, le=1, description="trust region: largest share one update may get"
    )
    duration_quantile: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Oort's preferred round time: this quantile of clients' expected "
        "durations; slower clients' utility is cut; 0 = the deadline",
    )
    weight_trust: float = Field(
        3.0, ge=1, description="trust region: weight <= this x its examples share"
    )


class DevicesConfig(_Section):
    """Simulated device heterogeneity and deadline rounds (``fl_server.devices``).

    Applied by the server to every strategy alike: profiles and dropouts are fixed by
    ``seed`` and the client's partition id. Off by default.
    """

    enabled: bool = False
    speed_sigma: float = Field(
        1.0, ge=0, le=5, description="log-normal sigma of compute speed (median 1)"
    )
    bandwidth_median_mbps: float = Field(
        10.0, gt=0, description="median bandwidth, megabits per second"
    )
    bandwidth_sigma: float = Field(0.5, ge=0, le=5, description="log-normal sigma")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="probability a client is gone in a round"
    )
    example_cost_s: float = Field(
        0.01, gt=0, description="compute seconds per example and epoch at speed 1"
    )
    deadline_s: float = Field(
        0.0, ge=0, description="simulated round deadline; 0 = none"
    )
    partial_work: bool = Field(
        False, description="late clients train the epochs that fit instead of dropping"
    )


class CompressionConfig(_Section):
    """Upload compression (agent strategy only); the agent may vary it per client."""

    codec: CodecName = Field(
        "none", description="default allocation: none, q8, q4, topk, topk_q8"
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="share of entries kept")
    error_feedback: bool = Field(True, description="top-k: keep the residual")
    adaptive: bool = Field(
        False,
        description="the policy picks each client's codec among codec and allowed: "
        "the deterministic one from its measured bandwidth (devices.enabled "
        "measures it), an LLM in its allocations (else the fallback's codec)",
    )
    allowed: str = Field(
        "none,q8,q4,topk",
        description="adaptive: comma-separated codecs the policy may allocate "
        "besides codec; the guard replaces any other by codec",
    )

    @field_validator("allowed")
    @classmethod
    def _check_allowed(cls, v: str) -> str:
        names = [x.strip() for x in v.split(",") if x.strip()]
        valid = get_args(CodecName)
        bad = [x for x in names if x not in valid]
        if not names or bad:
            raise ValueError(
                f"compression.allowed must list some of {', '.join(valid)}; got {v!r}"
            )
        return ",".join(dict.fromkeys(names))

    def allowed_codecs(self) -> tuple[CodecName, ...]:
        """Return the codecs a policy may allocate besides ``codec`` (none if fixed)."""
        if not self.adaptive:
            return ()
        names = [cast(CodecName, c) for c in self.allowed.split(",")]
        return tuple(c for c in names if c != self.codec)

    def codecs_in_use(self) -> tuple[CodecName, ...]:
        """Return every codec a client of the run may be asked for, ``codec`` first."""
        return (self.codec, *self.allowed_codecs())

    def compresses(self) -> bool:
        """Whether some client may upload a compressed update."""
        return any(c != "none" for c in self.codecs_in_use())

    def keeps_residuals(self) -> bool:
        """Whether some client may keep a top-k error-feedback residual."""
        return self.error_feedback and any(
            c in ("topk", "topk_q8") for c in self.codecs_in_use()
        )

    def describe(self) -> str:
        """Return the keys that set the run's codecs, for error messages."""
        if not self.allowed_codecs():
            return f"compression.codec={self.codec!r}"
        return (
            f"compression.codec={self.codec!r} with compression.adaptive=true "
            f"(allowed {self.allowed!r})"
        )


class PersonalizationConfig(_Section):
    """Personalized models on the clients (agent strategy only)."""

    mode: PersonalMode = Field(
        "none",
        description="fedper: personal layers stay local; fedrep: as fedper, the head "
        "trained first with the body frozen, then the body with the head frozen; "
        "ditto: personal model",
    )
    personal_layers: str = Field(
        "last",
        description="fedper, fedrep: comma-separated name prefixes; last = final layer",
    )
    head_epochs: int = Field(
        2, ge=1, le=100, description="fedrep: epochs of the head before the body's"
    )
    ditto_lambda: float = Field(0.1, ge=0, description="ditto: proximal weight")
    ditto_epochs: int = Field(1, ge=1, le=100, description="ditto: personal epochs")
    evaluate_clients: bool = Field(
        False, description="federated evaluation on clients' test splits (any mode)"
    )
    eval_every: int = Field(1, ge=1, description="federated evaluation every N rounds")


class AttackConfig(_Section):
    """Simulated adversaries (client side; ``fl_client/attacks.py``). Off by default.

    The malicious partitions are a deterministic function of ``seed`` and
    ``fraction`` (``fl_client.attacks.malicious_partitions``), recorded in the run's
    summary so that detection can be scored.
    """

    kind: AttackName = "none"
    fraction: float = Field(0.2, ge=0, le=1, description="share of malicious clients")
    start_round: int = Field(1, ge=1, description="first round the attackers attack")
    scale: float = Field(
        4.0, gt=0, le=1e6, description="sign_flip / collude: -scale x update; scaling"
    )
    noise_std: float = Field(1.0, gt=0, le=1e6, description="noise: update ~ N(0, s)")


class DefenseConfig(_Section):
    """The agent's adversary detection, reputation and robust aggregation.

    Off by default (existing runs unchanged); ``+experiment=robustness`` turns it on.
    """

    enabled: bool = Field(False, description="deterministic detectors + reputation")
    z_threshold: float = Field(
        3.5, gt=0, description="robust z-score (median/MAD) beyond which a reply is odd"
    )
    min_cosine: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="cosine to the median below which an amplified reply (norm >= "
        "1.5x the reference) is flagged; 0.3 lower, any norm >= the reference",
    )
    norm_examples_exponent: float = Field(
        0.5,
        ge=0,
        le=1,
        description="update norms are compared per (registered examples)^this: a "
        "client with more data takes more local steps; 0 = raw norms",
    )
    record_below: float = Field(
        0.8,
        gt=0,
        le=1,
        description="a client whose reputation is under this has a record: a norm 2x "
        "the reference (and z_threshold robust SDs above it) is enough to flag it "
        "(after one flag, 4 good rounds clear it)",
    )
    loss_check_examples: int = Field(
        256,
        ge=0,
        le=100_000,
        description="server validation examples on which each reply's candidate "
        "model is evaluated (fl_server.loss_check); 0 = no loss check",
    )
    exclude_after: int = Field(
        2, ge=1, description="consecutive flags (or rejections) before exclusion"
    )
    probation_rounds: int = Field(
        5, ge=1, description="first exclusion length; doubles on each re-exclusion"
    )
    rules: str = Field(
        "weighted,trimmed,median,krum",
        description="comma-separated aggregation rules the policy may choose; the "
        "guard replaces any other choice by the first",
    )

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, v: str) -> str:
        names = [x.strip() for x in v.split(",") if x.strip()]
        valid = get_args(AggregationRule)
        bad = [x for x in names if x not in valid]
        if not names or bad:
            raise ValueError(
                f"defense.rules must list some of {', '.join(valid)}; got {v!r}"
            )
        return ",".join(names)

    def allowed_rules(self) -> tuple[str, ...]:
        """Return the allowed aggregation rules, the default first."""
        return tuple(self.rules.split(","))


class RouteConfig(_Section):
    """Which policy answers each decision type when ``policy.name=llm``.

    ``auto`` means the LLM (for detection: the union of both policies' flags), except
    with ``agent.model=local``: the 135M local model's aggregate-phase answers were
    invalid in every measured call, so the deterministic policy weights and detects
    and the local model selects and allocates.
    """

    selection: RouteTarget = "llm"
    allocation: RouteTarget = "llm"
    weighting: AutoRouteTarget = "auto"
    detection: Literal["auto", "union", "llm", "deterministic"] = Field(
        "auto", description="union: the flags of both policies"
    )


class AgentConfig(_Section):
    """The LLM agent (used when ``policy.name=llm``)."""

    model: str = Field(
        "local",
        min_length=1,
        description="'local' (SmolLM2 served here) or any litellm model string",
    )
    api_base: str = Field("", description="OpenAI-compatible endpoint; '' = default")
    api_key_env: str = Field("", description="environment variable holding the key")
    timeout_s: float = Field(20.0, gt=0, le=600)
    max_attempts: int = Field(2, ge=1, le=10)
    max_calls: int = Field(0, ge=0, description="per run; 0 = no cap")
    max_tokens: int = Field(0, ge=0, description="per run; 0 = no cap")
    max_cost_usd: float = Field(0.0, ge=0, description="per run; 0 = no cap")
    history_len: int = Field(5, ge=0, le=100)
    max_prompt_chars: int = Field(12_000, ge=1_000)
    structured: StructuredMode = "auto"
    temperature: float = Field(0.0, ge=0, le=2)
    max_answer_tokens: int = Field(800, ge=16)
    route: RouteConfig = RouteConfig()


class CheckpointConfig(_Section):
    """Per-round checkpoints (``<run dir>/checkpoints``), for ``resume=<run dir>``."""

    enabled: bool = Field(True, description="write a checkpoint after every round")
    keep: int = Field(2, ge=2, le=1000, description="latest checkpoints kept")


class PlannerConfig(_Section):
    """The planner and the monitor's thresholds (``orchestration.planner``)."""

    enabled: bool = Field(False, description="re-plan on monitor events")
    target_accuracy: float = Field(0.0, ge=0, le=1, description="stop; 0 = none")
    warmup_rounds: int = Field(0, ge=0, description="broad exploration phase")
    finetune_rounds: int = Field(0, ge=0, description="final phase, half the lr")
    plateau_window: int = Field(5, ge=2, le=1000)
    plateau_delta: float = Field(0.002, ge=0, le=1)
    divergence_window: int = Field(3, ge=2, le=1000)
    collapse_drop: float = Field(0.2, gt=0, le=1, description="accuracy drop")
    attack_flag_share: float = Field(0.3, gt=0, le=1)
    storm_failure_share: float = Field(0.5, gt=0, le=1)
    lr_backoff: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=0)
    budget_bytes: int = Field(0, ge=0, description="0 = no cap")
    budget_llm_cost_usd: float = Field(0.0, ge=0, description="0 = no cap")
    budget_wall_s: float = Field(0.0, ge=0, description="0 = no cap")


class HubConfig(_Section):
    """The comm hub's queues and the optional loggers."""

    queue_size: int = Field(64, ge=1, le=100_000)
    tensorboard: bool = Field(False, description="needs the tensorboard package")


class SecAggConfig(_Section):
    """Flower's SecAgg+ (``secaggplus_mod``, ``SecAggPlusWorkflow``): docs/privacy.md.

    Off by default. On, the agent strategy runs through its legacy-API adapter
    (``fl_server.secagg_strategy``) and the server only ever holds the aggregate.
    """

    enabled: bool = False
    num_shares: float = Field(
        1.0, gt=0, description="shares per secret: >1 a count, <=1 a share of clients"
    )
    reconstruction_threshold: float = Field(
        0.5, gt=0, description="shares needed: >1 a count, <=1 a share of num_shares"
    )
    clipping_range: float = Field(
        8.0, gt=0, description="each weighted update coordinate is clipped to +-this"
    )
    quantization_range: int = Field(4_194_304, ge=2, le=2**30)
    timeout_s: float = Field(0.0, ge=0, description="per protocol stage; 0 = none")


DPMode = Literal["none", "client", "sample"]


class DPConfig(_Section):
    """Differential privacy; see docs/privacy.md.

    ``client``: client-level DP (Flower's ``fixedclipping_mod`` clips each update to
    ``clipping_norm``; the server adds Gaussian noise to the aggregate); ``sample``:
    DP-SGD with Opacus on every client (per-sample clipping and noise).
    """

    mode: DPMode = "none"
    noise_multiplier: float = Field(1.0, ge=0, le=100)
    clipping_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class RunConfig(_Section):
    """Everything one run needs; see the README for each key."""

    seed: int = Field(0, ge=0)
    num_rounds: int = Field(30, ge=1, le=100_000)
    num_clients: int = Field(20, ge=2, le=100_000)
    clients_per_round: int = Field(10, ge=1)
    min_replies: int = Field(
        2, ge=1, description="a round with fewer accepted replies fails (model kept)"
    )
    max_failed_rounds: int = Field(
        3, ge=1, description="this many failed rounds in a row stop the run"
    )
    round_timeout_s: float = Field(600.0, gt=0)
    output_dir: str = "runs"
    run_name: str = Field(
        "", description="sub-directory of output_dir; empty: <time>-<strategy>-s<seed>"
    )
    client_cpus: float = Field(1.0, gt=0, description="Ray CPUs per client actor")
    resume: str = Field(
        "", description="run directory of a killed run to continue; '' = new run"
    )
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    client: ClientConfig = ClientConfig()
    strategy: StrategyConfig = StrategyConfig()
    policy: PolicyConfig = PolicyConfig()
    agent: AgentConfig = AgentConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    planner: PlannerConfig = PlannerConfig()
    hub: HubConfig = HubConfig()
    devices: DevicesConfig = DevicesConfig()
    secagg: SecAggConfig = SecAggConfig()
    dp: DPConfig = DPConfig()
    compression: CompressionConfig = CompressionConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    attack: AttackConfig = AttackConfig()
    defense: DefenseConfig = DefenseConfig()

    @model_validator(mode="after")
    def _check_cross_field(self) -> RunConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} must be at most "
                f"num_clients={self.num_clients} (allowed range 1..num_clients)"
            )
        if self.min_replies > self.clients_per_round:
            raise ValueError(
                f"min_replies={self.min_replies} must be at most "
                f"clients_per_round={self.clients_per_round}"
            )
        if self.policy.min_epochs > self.policy.max_epochs:
            raise ValueError("policy.min_epochs must be at most policy.max_epochs")
        p, t = self.policy, self.train
        if not p.min_epochs <= t.local_epochs <= p.max_epochs:
            raise ValueError(
                f"train.local_epochs={t.local_epochs} must be within "
                f"policy.min_epochs..policy.max_epochs ({p.min_epochs}..{p.max_epochs})"
            )
        if self.strategy.name == "multikrum" and (
            self.strategy.krum_keep > self.clients_per_round
        ):
            raise ValueError(
                f"strategy.krum_keep={self.strategy.krum_keep} must be at most "
                f"clients_per_round={self.clients_per_round}"
            )
        pl = self.planner
        if pl.warmup_rounds + pl.finetune_rounds > self.num_rounds:
            raise ValueError(
                f"planner.warmup_rounds + planner.finetune_rounds = "
                f"{pl.warmup_rounds + pl.finetune_rounds} must be at most "
                f"num_rounds={self.num_rounds}"
            )
        from .combinations import check_combinations

        check_combinations(self)
        return self

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_nested(cls, data: Mapping[str, Any]) -> RunConfig:
        """Validate a nested mapping (Hydra, JSON); raise ``ConfigError`` if bad."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(_explain(e)) from e

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Validate Flower's flat ``run_config`` (keys like ``dataset.alpha``)."""
        return cls.from_nested(unflatten(flat))

    def to_flat(self) -> dict[str, Any]:
        """Return the flat form Flower's run config and pyproject use."""
        return flatten(self.model_dump())


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten ``{"a": {"b": 1}}`` to ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Invert :func:`flatten`; a key that is both a leaf and a section is an error."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is not a section")
            node = child
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"config key {key!r} names a section, not a value")
        node[leaf] = value
    return out


def _explain(error: ValidationError) -> str:
    """Turn pydantic's errors into one line per key, with the allowed values."""
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown config key {key!r}; valid keys: {_valid_keys()}")
            continue
        msg = err["msg"]
        if isinstance(err.get("input"), float) and not math.isfinite(err["input"]):
            msg = f"{msg} (got {err['input']})"
        lines.append(f"config key {key!r}: {msg} (got {err.get('input')!r})")
    return "invalid run configuration:\n  " + "\n  ".join(lines)


def _valid_keys() -> str:
    return ", ".join(sorted(RunConfig().to_flat()))


def choices(name: str) -> tuple[str, ...]:
    """Return the allowed values of a name-typed key, e.g. ``choices("dataset")``."""
    literal = {
        "dataset": DatasetName,
        "partitioner": PartitionerName,
        "model": ModelName,
        "strategy": StrategyName,
        "policy": PolicyName,
        "structured": StructuredMode,
        "codec": CodecName,
        "personalization": PersonalMode,
    }[name]
    return tuple(get_args(literal))
