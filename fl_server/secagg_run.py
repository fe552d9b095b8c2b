"""Run the agent under Flower's SecAgg+ workflow (legacy API), as the config says.

``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` drives the rounds: setup,
key sharing, masked training, unmasking, then the central evaluation. The strategy is
:class:`~fl_server.secagg_strategy.SecAggStrategy` around the run's
:class:`~fl_server.strategy.AgentStrategy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import Scalar
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from orchestration.config import RunConfig

from .secagg_strategy import WEIGHT_SCALE, ClientDPNoise, SecAggStrategy
from .strategy import AgentStrategy

log = logging.getLogger("agentfl.secagg")


def _count_or_share(value: float) -> int | float:
    """SecAgg+ reads an int as a count and a float as a share."""
    return int(value) if value > 1 else float(value)


def build_workflow(cfg: RunConfig) -> DefaultWorkflow:
    """Return Flower's default workflow with the SecAgg+ fit workflow of ``cfg``."""
    s = cfg.secagg
    return DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=_count_or_share(s.num_shares),
            reconstruction_threshold=_count_or_share(s.reconstruction_threshold),
            max_weight=float(WEIGHT_SCALE),
            clipping_range=s.clipping_range,
            quantization_range=s.quantization_range,
            timeout=s.timeout_s or None,
        )
    )


def run_secagg(
    grid: Grid,
    cfg: RunConfig,
    agent: AgentStrategy,
    initial: ArrayRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    train_config: Mapping[str, Scalar],
) -> tuple[ArrayRecord, list[dict[str, Any]]]:
    """Run ``cfg.num_rounds`` SecAgg+ rounds; return the final model and round log."""
    dp = None
    if cfg.dp.mode == "client":
        dp = ClientDPNoise(
            noise_multiplier=cfg.dp.noise_multiplier,
            clipping_norm=cfg.dp.clipping_norm,
            num_sampled=cfg.clients_per_round,
            delta=cfg.dp.delta,
            seed=cfg.seed,
        )
    strategy = SecAggStrategy(
        agent,
        grid=grid,
        initial=initial,
        evaluate_fn=evaluate_fn,
        train_config=dict(train_config),
        client_dp=dp,
    )
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.num_rounds),
        strategy=strategy,
    )
    log.info(
        "SecAgg+: shares %s, threshold %s, clipping +-%g, quantization %d",
        cfg.secagg.num_shares,
        cfg.secagg.reconstruction_threshold,
        cfg.secagg.clipping_range,
        cfg.secagg.quantization_range,
    )
    build_workflow(cfg)(grid, legacy)
    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    from flwr.compat.common import recorddict_compat as compat

    params = compat.arrayrecord_to_parameters(final, keep_input=True)
    return strategy.named(params), strategy.rounds
