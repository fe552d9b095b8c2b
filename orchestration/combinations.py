"""Which privacy features compose with which strategies: refused at start-up.

One rule per function, each raising ``ValueError`` (turned into a ``ConfigError`` by
the schema) whose message names the keys and says *why* the combination cannot work.
The table in ``docs/privacy.md`` lists the same rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig

#: Strategies whose rule needs every individual update (order statistics, distances).
ROBUST_RULES = frozenset({"fedmedian", "fedtrimmedavg", "multikrum"})


def check_combinations(cfg: RunConfig) -> None:
    """Raise ``ValueError`` naming the keys if ``cfg`` combines incompatible parts."""
    _secagg_needs_the_agent_adapter(cfg)
    _secagg_protocol_sizes(cfg)
    _client_dp_needs_a_mean(cfg)
    _dp_needs_noise(cfg)
    _resume_needs_server_side_state(cfg)
    _client_features_need_the_agent(cfg)
    _secagg_sums_dense_full_updates(cfg)
    _secagg_hides_updates_from_the_defense(cfg)
    _client_dp_clips_dense_updates(cfg)
    _fedrep_head_phase_is_not_private(cfg)


def _resume_needs_server_side_state(cfg: RunConfig) -> None:
    if not cfg.resume:
        return
    if cfg.secagg.enabled:
        raise ValueError(
            "resume does not compose with secagg.enabled=true: the SecAgg+ workflow "
            "runs its own round loop, which cannot start at a checkpoint's round"
        )
    lost = []
    if cfg.compression.keeps_residuals():
        lost.append("compression error feedback (the residuals)")
    if cfg.personalization.mode != "none":
        lost.append(f"personalization.mode={cfg.personalization.mode!r} (the models)")
    if cfg.attack.kind == "stale":
        lost.append("attack.kind='stale' (the replayed model)")
    if lost:
        raise ValueError(
            "resume does not compose with " + " or ".join(lost) + ": that client "
            "state lives in the clients' context.state, which a restarted "
            "simulation does not have, so the resumed run would not equal an "
            "uninterrupted one"
        )
    if cfg.dp.mode != "none":
        raise ValueError(
            f"resume does not compose with dp.mode={cfg.dp.mode!r}: the privacy "
            "accountants' state (on the clients for 'sample', in the DP wrapper for "
            "'client') is not in the server's checkpoint, so a resumed run would "
            "under-report epsilon"
        )


def _secagg_needs_the_agent_adapter(cfg: RunConfig) -> None:
    if not cfg.secagg.enabled or cfg.strategy.name == "agent":
        return
    if cfg.strategy.name in ROBUST_RULES:
        why = (
            "a robust rule needs every individual update (coordinate order "
            "statistics or pairwise distances), and under SecAgg+ the server only "
            "ever sees the masked sum"
        )
    else:
        why = (
            "SecAgg+ runs through the agent strategy's legacy-API adapter "
            "(fl_server.secagg_strategy); Flower's Message-API baselines have no "
            "SecAgg+ workflow"
        )
    raise ValueError(
        f"secagg.enabled=true does not compose with strategy.name="
        f"{cfg.strategy.name!r}: {why}. Use strategy.name='agent' or "
        "secagg.enabled=false"
    )


def _secagg_protocol_sizes(cfg: RunConfig) -> None:
    s = cfg.secagg
    if not s.enabled:
        return
    if cfg.clients_per_round < 3:
        raise ValueError(
            f"secagg.enabled=true needs clients_per_round >= 3 (got "
            f"{cfg.clients_per_round}): with two clients each one could subtract its "
            "own update from the sum and learn the other's"
        )
    if s.num_shares > 1:
        if s.num_shares != int(s.num_shares) or s.num_shares < 3:
            raise ValueError(
                f"secagg.num_shares={s.num_shares:g}: above 1 it is a count and must "
                "be an integer >= 3 (at most 1 it is a share of the selected clients)"
            )
        if s.num_shares > cfg.clients_per_round:
            raise ValueError(
                f"secagg.num_shares={s.num_shares:g} must be at most "
                f"clients_per_round={cfg.clients_per_round}"
            )
    if s.reconstruction_threshold > 1:
        t = s.reconstruction_threshold
        if t != int(t):
            raise ValueError(
                f"secagg.reconstruction_threshold={t:g}: above 1 it is a count and "
                "must be an integer (at most 1 it is a share of num_shares)"
            )
        shares = s.num_shares if s.num_shares > 1 else cfg.clients_per_round
        if t >= shares:
            raise ValueError(
                f"secagg.reconstruction_threshold={t:g} must be below the number of "
                f"shares ({shares:g}): otherwise no client may drop out"
            )


def _client_dp_needs_a_mean(cfg: RunConfig) -> None:
    if cfg.dp.mode != "client" or cfg.strategy.name not in ROBUST_RULES:
        return
    raise ValueError(
        f"dp.mode='client' does not compose with strategy.name="
        f"{cfg.strategy.name!r}: the Gaussian noise is calibrated to the sensitivity "
        "of a mean of clipped updates (clipping_norm / clients), which a median, "
        "trimmed mean or Krum selection does not have. Use strategy.name='agent' or "
        "'fedavg', or dp.mode='sample' (DP-SGD on each client composes with any rule)"
    )


def _dp_needs_noise(cfg: RunConfig) -> None:
    if cfg.dp.mode != "none" and cfg.dp.noise_multiplier <= 0:
        raise ValueError(
            f"dp.mode={cfg.dp.mode!r} needs dp.noise_multiplier > 0 (got "
            f"{cfg.dp.noise_multiplier:g}): without noise clipping alone gives no "
            "differential privacy (epsilon is infinite)"
        )


def _client_features_need_the_agent(cfg: RunConfig) -> None:
    """Compression and personalization need the agent strategy's server side."""
    if cfg.strategy.name == "agent":
        return
    if cfg.compression.compresses():
        raise ValueError(
            f"{cfg.compression.describe()} needs strategy.name='agent': "
            f"Flower's {cfg.strategy.name} cannot decode compressed updates (use "
            "compression.codec='none', compression.adaptive=false)"
        )
    p = cfg.personalization
    if p.mode != "none" or p.evaluate_clients:
        raise ValueError(
            f"personalization (mode={p.mode!r}, evaluate_clients="
            f"{p.evaluate_clients}) needs strategy.name='agent': Flower's "
            f"{cfg.strategy.name} neither keeps personal layers nor gathers "
            "per-client evaluations"
        )


def _secagg_sums_dense_full_updates(cfg: RunConfig) -> None:
    if not cfg.secagg.enabled:
        return
    if cfg.compression.compresses():
        raise ValueError(
            f"secagg.enabled=true does not compose with "
            f"{cfg.compression.describe()}: SecAgg+ masks and sums one dense vector "
            "per client (it quantizes it itself); quantized codes or top-k indices "
            "cannot be summed under masks. Use compression.codec='none' and "
            "compression.adaptive=false"
        )
    p = cfg.personalization
    if p.mode != "none" or p.evaluate_clients:
        raise ValueError(
            f"secagg.enabled=true does not compose with personalization (mode="
            f"{p.mode!r}, evaluate_clients={p.evaluate_clients}): the SecAgg+ "
            "adapter sums every array of the model and runs no federated "
            "evaluation. Use personalization.mode='none'"
        )


def _secagg_hides_updates_from_the_defense(cfg: RunConfig) -> None:
    if cfg.secagg.enabled and cfg.defense.enabled:
        raise ValueError(
            "secagg.enabled=true does not compose with defense.enabled=true: the "
            "detectors measure each client's update (norm, cosine to the median, "
            "Krum distances, the server-checked loss of global + update), and under "
            "SecAgg+ the server only ever holds the masked sum. Use "
            "defense.enabled=false (straggler and malformed-metric flags still "
            "apply) or secagg.enabled=false"
        )


def _client_dp_clips_dense_updates(cfg: RunConfig) -> None:
    if cfg.dp.mode == "client" and cfg.compression.compresses():
        raise ValueError(
            f"dp.mode='client' does not compose with "
            f"{cfg.compression.describe()}: Flower's fixedclipping_mod clips the "
            "reply's arrays, which would be the compact encoding, not the update. "
            "Use compression.codec='none' (adaptive=false) or dp.mode='sample'"
        )


def _fedrep_head_phase_is_not_private(cfg: RunConfig) -> None:
    if cfg.dp.mode == "sample" and cfg.personalization.mode == "fedrep":
        raise ValueError(
            "dp.mode='sample' does not compose with personalization.mode='fedrep': "
            "FedRep's head phase trains outside Opacus, and the uploaded body is "
            "then trained through that head, so DP-SGD's epsilon would not cover "
            "the upload. Use personalization.mode='fedper' (the whole model under "
            "DP-SGD)"
        )
